"""The FP8 2:4 route of sparse Transformer Engine linears: when it runs (TE's fp8_autocast with a
per-tensor recipe, cuSPARSELt's e4m3 GEMM on this device or the CPU emulation, the layer prunes),
and the plan of each GEMM: the scales of x and dY from the module's own TE quantizers where it has
them (GEMM i's input at `quantizers["scaling_fwd"][3 i]`, its output gradient at
`quantizers["scaling_bwd"][2 i]`: FP8FwdTensorIdx.GEMM1_INPUT / FP8BwdTensorIdx.GRAD_OUTPUT1 of each
GEMM's tensors, indexed as TE's GroupedLinear._get_quantizers does), else megasparse's scalers
following the recipe; plans and scalers built once per module and recipe. Under TE's wgrad fusion
the FP8 weight gradient accumulates into main_grad inside TE's own FP8 GEMM (general_gemm,
accumulate=True), no fp32 temporary. The forwards that call it: megasparse.te.forward.
"""

import dataclasses
import functools
import inspect

import torch

from megasparse.fp8.linear import Fp8LinearPlan, cusparselt_fp8_reason, fp8_sparse_linear_step
from megasparse.fp8.scaling import E4M3, CurrentScaler, Fp8Recipe, te_scaler
from megasparse.core.warn import warn_once


def te_fp8_state():
    """(enabled, recipe) of Transformer Engine's fp8_autocast; (False, None) without TE."""
    try:
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
    except ImportError:
        try:
            from transformer_engine.pytorch.quantization import FP8GlobalStateManager
        except ImportError:
            return False, None
    if not FP8GlobalStateManager.is_fp8_enabled():
        return False, None
    return True, FP8GlobalStateManager.get_fp8_recipe()


def _route_reason(weights, recipe, te_recipe):
    """Why the FP8 2:4 GEMMs cannot run for these weights under this recipe (None: they can)."""
    if recipe is None:
        return (
            f"TE recipe {type(te_recipe).__name__} is block-scaled; cuSPARSELt takes "
            "per-tensor scales"
        )
    override = getattr(te_recipe, "backward_override", None)
    if override is not None:
        return f"TE recipe backward_override={override!r} (TE's own backward precision)"
    device = weights[0].device
    if device.type != "cuda":
        return None  # the CPU emulation
    return next(filter(None, (cusparselt_fp8_reason(w) for w in weights)), None)


def fp8_route(module, unsupported=None):
    """(Fp8Recipe, use_cusparselt) when the FP8 2:4 path runs for this call, else None.

    unsupported: the caller's reason this call needs TE's own forward (a TE option not reproduced)."""
    enabled, te_recipe = te_fp8_state()
    if not enabled or not module.sparsity.prunes_weights or module.sparsity.backend == "dense":
        return None
    recipe = Fp8Recipe.from_te(te_recipe)
    weights = [getattr(module, name) for name in module._sparse_weight_names()]
    reason = unsupported or _route_reason(weights, recipe, te_recipe)
    if reason is not None:
        warn_once(
            f"megasparse: FP8 2:4 is off for this layer ({reason}); TE's dense FP8 GEMM "
            "runs on W*M instead",
            stacklevel=4,
        )
        return None
    return recipe, weights[0].device.type == "cuda"


def _te_quantizers(module, gemm):
    """(x quantizer, dY quantizer) of GEMM `gemm` in the module's TE quantizer state, or (None,
    None): GEMM1_INPUT / GRAD_OUTPUT1 of each GEMM's tensors."""
    quantizers = getattr(module, "quantizers", None) if getattr(module, "fp8", False) else None
    if not quantizers:
        return None, None
    per_gemm = getattr(module, "_num_fp8_tensors_per_gemm", {"fwd": 3, "bwd": 2})
    return (
        quantizers["scaling_fwd"][per_gemm["fwd"] * gemm],
        quantizers["scaling_bwd"][per_gemm["bwd"] * gemm],
    )


def _scalers(recipe: Fp8Recipe, te_quantizers):
    """(x, dY, e4m3 dY for the sparse dgrad): the module's TE quantizer state where it exposes it,
    else megasparse's own scalers following the recipe."""
    x_q, grad_q = te_quantizers
    x_scaler = (te_scaler(x_q, E4M3) if x_q is not None else None) or recipe.own_scaler(E4M3)
    grad_scaler = (
        te_scaler(grad_q, recipe.grad_dtype) if grad_q is not None else None
    ) or recipe.own_scaler(recipe.grad_dtype)
    dgrad = None if recipe.grad_dtype == E4M3 else CurrentScaler(E4M3, recipe.margin)
    return x_scaler, grad_scaler, dgrad


def plan_for(module, route, out_dtype, gemm=0) -> Fp8LinearPlan:
    """GEMM `gemm`'s plan, built once per (module, recipe, output dtype, wgrad fusion) and kept on
    the module while TE keeps the same quantizer objects (TE makes new ones when the recipe
    changes): later micro-batches allocate no plan or scaler (megasparse's own delayed scalers keep
    their amax history in it)."""
    recipe, use_cusparselt = route
    fused = bool(getattr(module, "fuse_wgrad_accumulation", False))
    key = (recipe, use_cusparselt, out_dtype, fused)
    plans = module.__dict__.get("_megasparse_fp8_plans")
    if plans is None or plans[0] != key:
        plans = (key, {})
        module._megasparse_fp8_plans = plans
    te_quantizers = _te_quantizers(module, gemm)
    cached = plans[1].get(gemm)
    if cached is not None and cached[0][0] is te_quantizers[0] and cached[0][1] is te_quantizers[1]:
        return cached[1]
    wgrad_gemm = _te_wgrad_gemm(module) if fused else None
    plan = Fp8LinearPlan(
        *_scalers(recipe, te_quantizers),
        use_cusparselt,
        recipe.fp8_wgrad,
        fused,
        out_dtype,
        wgrad_into_main_grad=wgrad_gemm,
    )
    plans[1][gemm] = (te_quantizers, plan)
    return plan


def fp8_gemm(module, x, weight, bias, step, gemm, out_dtype, *, route, input_comm=None):
    """GEMM `gemm` of a TE forward call on the FP8 2:4 route: y = x (W*M)^T + b. `input_comm`:
    the column-parallel input communication the op runs on the local x, overlapped with the wgrad
    as TE's Linear does (megasparse.core.input_comm; None: x arrives communicated)."""
    plan = plan_for(module, route, out_dtype, gemm)
    if input_comm is not None:
        plan = _with_input_comm(module, gemm, plan, input_comm)
    return fp8_sparse_linear_step(x, weight, bias, step, plan)


def _with_input_comm(module, gemm, plan, input_comm) -> Fp8LinearPlan:
    """`plan` carrying `input_comm`, kept beside it: later micro-batches allocate no plan."""
    kept = module.__dict__.setdefault("_megasparse_fp8_comm_plans", {})
    cached = kept.get(gemm)
    if cached is None or cached[0] is not plan or cached[1] != input_comm:
        cached = (plan, input_comm, dataclasses.replace(plan, input_comm=input_comm))
        kept[gemm] = cached
    return cached[2]


def _te_wgrad_gemm(module):
    """TE's accumulating FP8 wgrad GEMM for this module's weights, or None (no TE, not CUDA)."""
    device = getattr(module, module._sparse_weight_names()[0]).device
    kernels = te_wgrad_kernels(device)
    return None if kernels is None else functools.partial(te_wgrad_into_main_grad, kernels=kernels)


def te_wgrad_kernels(device):
    """(general_gemm, Float8 storage class, TE_DType, cuBLAS workspace or None) of the installed
    TE; None off CUDA or without TE.

    Checked in TE 2.5, 2.8, 2.9, 2.10, 2.12, 2.18 and main: cpp_extensions/gemm.py
    `general_gemm(A, B, workspace, out_dtype=None, quantization_params=None, gelu=False,
    gelu_in=None, accumulate=False, layout="TN", out=None, bias=None, use_split_accumulator=False,
    grad=False, ub=None, ub_type=None, extra_output=None, bulk_overlap=False)` through 2.9 (the
    workspace from module/base.py get_workspace()); from 2.10 no workspace argument, `alpha=1.0,
    beta=None` before `accumulate`; returns (out, bias_grad, gelu_input, extra_output). The
    storage class holding FP8 data without a torch tensor of its own:
    tensor/_internal/float8_tensor_base.py Float8TensorBase through 2.8,
    tensor/storage/float8_tensor_storage.py Float8TensorStorage from 2.9, both
    `(data=, fp8_scale_inv=, fp8_dtype=, data_transpose=None, quantizer=None)`."""
    if torch.device(device).type != "cuda":
        return None
    try:
        from transformer_engine.pytorch.constants import TE_DType
        from transformer_engine.pytorch.cpp_extensions import general_gemm
    except ImportError:
        return None
    try:
        from transformer_engine.pytorch.tensor.storage import Float8TensorStorage as storage
    except ImportError:
        from transformer_engine.pytorch.tensor._internal.float8_tensor_base import (
            Float8TensorBase as storage,
        )
    workspace = None
    if "workspace" in inspect.signature(general_gemm).parameters:
        from transformer_engine.pytorch.module.base import get_workspace

        workspace = get_workspace()
    return general_gemm, storage, TE_DType, workspace


def _columnwise(storage, te_dtype, q_t, scale_inv):
    """FP8 data held column-wise only ([features, tokens], the transpose TE's wgrad reads), as TE's
    quantizers make it with set_usage(rowwise=False, columnwise=True)."""
    return storage(
        data=None,
        fp8_scale_inv=scale_inv.reshape(1).float(),
        fp8_dtype=te_dtype[q_t.dtype],
        data_transpose=q_t,
    )


def te_wgrad_into_main_grad(main_grad, dy_q_t, dy_si, x_q_t, x_si, *, kernels):
    """main_grad += (dY dy_si)^T (X x_si) inside TE's FP8 GEMM, as TE's Linear backward runs its
    wgrad (module/linear.py, TE 2.5 to main): general_gemm(x, dy, layout="NT", out=main_grad,
    accumulate=True, out_dtype=main_grad.dtype, use_split_accumulator=True (the recipes'
    fp8_gemm_wgrad default), grad=True), both operands column-wise FP8 data. dy_q_t [out, tokens],
    x_q_t [in, tokens], tokens zero-padded alike to 16 (zeros add nothing). Always accumulates:
    Megatron zeroes main_grad each step (TE overwrites on `is_first_microbatch`)."""
    general_gemm, storage, te_dtype, workspace = kernels
    extra = {} if workspace is None else {"workspace": workspace}
    general_gemm(
        _columnwise(storage, te_dtype, x_q_t, x_si),
        _columnwise(storage, te_dtype, dy_q_t, dy_si),
        out_dtype=main_grad.dtype,
        accumulate=True,
        layout="NT",
        out=main_grad,
        use_split_accumulator=True,
        grad=True,
        **extra,
    )
