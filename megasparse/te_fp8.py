"""FP8 2:4 in sparse Transformer Engine linears: under TE's fp8_autocast, the forward GEMM (and with
transposable masks the input-gradient GEMM) run as e4m3 2:4 cuSPARSELt GEMMs
(megasparse.fp8_linear).

Where it enters: `te_fp8_forward` replaces the forward of TE's own `Linear` class (it sits between
Megatron's TE wrapper and TE's Linear in the MRO, see megasparse.te), so it receives exactly what
TE's Linear.forward receives and returns what it returns. It runs when
  - TE's fp8_autocast is on with a per-tensor recipe (DelayedScaling, Float8CurrentScaling), and
  - the layer prunes its weights with backend "auto" or "cusparselt", and
  - the device runs cuSPARSELt's e4m3 GEMM (sm90; megasparse.fp8_gemm.fp8_cusparselt_reason), or
    the weight is not on CUDA (the CPU emulation: tests and the demo's stand-ins).
Otherwise TE's own forward runs its dense (FP8) GEMM on W*M, with one warning naming the reason on
a GPU. TE's LayerNormLinear and GroupedLinear keep TE's forward (no FP8 2:4 there yet).

What stays TE's and Megatron's: TE's `prepare_forward` (FP8 metadata, the amax buffers TE
reduces over its amax group and turns into scales at the end of fp8_autocast); the scales of
x and dY from the module's own TE quantizers where it has them (megasparse.fp8_recipe);
communication through Megatron's tensor-parallel mappings, as TE's Linear does it for its
parallel_mode (column: copy / sequence-parallel all-gather of x; row: all-reduce /
reduce-scatter of y, bias after it); main_grad accumulation when TE fuses wgrad accumulation.
"""

import contextlib
import warnings

from megasparse import fp8_gemm
from megasparse.fp8_gemm import E4M3
from megasparse.fp8_linear import Fp8LinearPlan, fp8_sparse_linear_step
from megasparse.fp8_recipe import CurrentScaler, Fp8Recipe, te_scaler

_warned = set()


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


def fp8_route(module):
    """(Fp8Recipe, use_cusparselt) when the FP8 2:4 path runs for this call, else None."""
    enabled, te_recipe = te_fp8_state()
    if not enabled or not module.sparsity.prunes_weights or module.sparsity.backend == "dense":
        return None
    recipe = Fp8Recipe.from_te(te_recipe)
    device = module.weight.device
    reason = None
    if recipe is None:
        reason = (
            f"TE recipe {type(te_recipe).__name__} is block-scaled; cuSPARSELt takes "
            "per-tensor scales"
        )
    elif device.type == "cuda":
        reason = fp8_gemm.fp8_cusparselt_reason(device)
    else:
        return recipe, False  # CPU emulation
    if reason is None:
        shape = tuple(module.weight.shape)
        multiple = fp8_gemm.WEIGHT_MULTIPLE
        if shape[0] % multiple or shape[1] % multiple:
            reason = f"the weight shard {shape} is not a multiple of {multiple} in both dims (e4m3)"
    if reason is not None:
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(
                f"megasparse: FP8 2:4 is off for this layer ({reason}); TE's dense FP8 "
                "GEMM "
                "runs on W*M instead",
                stacklevel=3,
            )
        return None
    return recipe, True


@contextlib.contextmanager
def _te_forward_context(module, inp):
    """TE's prepare_forward (a context manager in TE 2.5-2.x; prepare_forward_ctx later)."""
    if hasattr(module, "prepare_forward_ctx"):
        with module.prepare_forward_ctx(inp) as inp:
            yield inp
    elif hasattr(module, "prepare_forward"):
        with module.prepare_forward(inp) as inp:
            yield inp
    else:  # stand-ins
        yield inp


def _scalers(module, recipe: Fp8Recipe):
    """(x, dY, e4m3 dY for the sparse dgrad): the module's TE quantizer state where it exposes it,
    else megasparse's own scalers following the recipe (kept on the module across calls)."""
    quantizers = getattr(module, "quantizers", None) if getattr(module, "fp8", False) else None
    x_scaler = grad_scaler = None
    if quantizers:
        x_scaler = te_scaler(quantizers["scaling_fwd"][0], E4M3)  # FP8FwdTensorIdx.GEMM1_INPUT
        grad_scaler = te_scaler(quantizers["scaling_bwd"][0], recipe.grad_dtype)  # GRAD_OUTPUT1
    own = getattr(module, "_megasparse_fp8_scalers", None)
    if own is None or own[0] != recipe:
        own = (recipe, recipe.own_scaler(E4M3), recipe.own_scaler(recipe.grad_dtype))
        module._megasparse_fp8_scalers = own
    x_scaler = x_scaler or own[1]
    grad_scaler = grad_scaler or own[2]
    dgrad = None if recipe.grad_dtype == E4M3 else CurrentScaler(E4M3, recipe.margin)
    return x_scaler, grad_scaler, dgrad


def _comm():
    from megatron.core import tensor_parallel as tp

    return tp


def te_fp8_forward(module, inp, te_forward, *args, **kwargs):
    """TE Linear.forward's contract with the FP8 2:4 GEMMs; `te_forward` when the route is off."""
    route = fp8_route(module)
    if route is None:
        return te_forward(module, inp, *args, **kwargs)
    recipe, use_cusparselt = route
    mode, sp = getattr(module, "parallel_mode", None), getattr(module, "sequence_parallel", False)
    bias = getattr(module, "bias", None) if getattr(module, "use_bias", False) else None
    return_bias = getattr(module, "return_bias", False)
    s = module.sparsity
    with _te_forward_context(module, inp) as x:
        x_scaler, grad_scaler, dgrad_scaler = _scalers(module, recipe)
        plan = Fp8LinearPlan(
            x_scaler,
            grad_scaler,
            dgrad_scaler,
            use_cusparselt,
            recipe.fp8_wgrad,
            s.gradient,
            s.srste_decay,
            bool(getattr(module, "fuse_wgrad_accumulation", False)),
            x.dtype,
        )
        if mode == "column":
            x = (
                _comm().gather_from_sequence_parallel_region(x)
                if sp
                else _comm().copy_to_tensor_model_parallel_region(x)
            )
        (step,) = module.weight_steps()
        in_gemm_bias = bias if (bias is not None and not return_bias and mode != "row") else None
        out = fp8_sparse_linear_step(x, module.weight, in_gemm_bias, step, plan)
        if mode == "row":
            out = (
                _comm().reduce_scatter_to_sequence_parallel_region(out)
                if sp
                else _comm().reduce_from_tensor_model_parallel_region(out)
            )
            if bias is not None and not return_bias:
                out = out + bias
    if return_bias:
        return out, bias
    return out
