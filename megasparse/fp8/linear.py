"""The FP8 training op (y = x (M*W)^T + b, one autograd Function) and its per-step FP8 weight.

e4m3 operands, for training under an FP8 recipe:

- forward GEMM: e4m3 x and the e4m3 2:4 weight on cuSPARSELt (megasparse.fp8.gemm);
- input gradient: with transposable masks on cuSPARSELt too (the compressed e4m3 (W*M)^T, dY in
  e4m3: PyTorch's cuSPARSELt binding takes e4m3 only, so under HYBRID dY gets a second, e4m3 cast
  for this GEMM); with 1d masks a dense FP8 GEMM (`torch._scaled_mm`) on the e4m3 W*M, as TE;
- weight gradient: as TE does it: an FP8 GEMM of dY (the recipe's gradient format) and x (e4m3),
  fp32 output, or a high-precision GEMM when the recipe overrides wgrad precision. Under
  Megatron's main_grad fusion with an accumulating FP8 GEMM in the plan (TE's, on the TE route),
  dY^T X accumulates into main_grad inside the GEMM; elsewhere (the local path: torch 2.13 has no
  accumulating FP8 GEMM) the fp32 result is added to main_grad.
The e4m3 weight is pruned, then quantized with the amax of W*M ("amax after pruning"), and built
once per optimizer step with its compressed operands (`WeightStep.cached`), shared by every
micro-batch. x is saved for the backward in e4m3 (as TE saves it), as the weight-gradient GEMM's
operand: its transpose with tokens padded to 16, written by the same fused cast as the forward's
x_q (megasparse.kernels.fp8_cast); dY's transpose comes from the cast of dY that the input
gradient runs (one cast of dY serves both GEMMs where they take the same format). An input
without rows (an expert that got no tokens) runs no GEMM: zero output rows, zero gradients,
the per-step terms.
Gradient modes (the step's rule, megasparse.core.gradients), Megatron's main_grad fusion and a
column-parallel input communication inside the op (`Fp8LinearPlan.input_comm`: the SP all-gather
in the forward, the input gradient's all-reduce / reduce-scatter overlapped with the wgrad GEMM)
work as in megasparse.core.linear_op. Under sequence parallelism the op saves this rank's rows of
the total input's e4m3 cast (the total's scale, 1 byte/elem, T/TP rows) instead of the total's
transpose, and the backward all-gathers them during the dgrad GEMM, then transposes and pads them
for the wgrad (the values are the same: the wgrad is unchanged bit for bit).

Who runs it: the sparse TE linears under TE's fp8_autocast (megasparse.te.forward), and Megatron's
local sparse linears with SparsityConfig.fp8 (`local_plan`: megasparse's current scaling in TE's
formats). A step without a mask (a dense phase, weights=None) runs dense FP8 GEMMs on W, and
fp8_order="quantize-then-prune" quantizes W with its own amax (the mask is then taken of those
e4m3 values, megasparse.core.weight_state.compute_mask).
The numerics study (megasparse.fp8.study) runs the same op with its backward in the input's
precision on the dequantized W*M (`fp8_dgrad=False`, `fp8_wgrad=False`) and its own weight scale.
"""

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megasparse.config import Fp8Order
from megasparse.fp8 import gemm as fp8_gemm
from megasparse.fp8.scaling import (
    E4M3,
    E5M2,
    CurrentScaler,
    amax_of,
    scale_from_amax,
    quantize_with,
)
from megasparse.core.input_comm import column_backward, regathers
from megasparse.core.linear_op import gradient_went_to_main_grad, take_main_grad
from megasparse.core.weight_state import WeightStep
from megasparse.core.warn import warn_once


@dataclass(frozen=True)
class Fp8LinearPlan:
    x_scaler: object  # callable t -> (e4m3 q, scale_inv); `.quantize(t, transpose)` if it has one
    grad_scaler: object  # the recipe's gradient format (wgrad, dense dgrad)
    dgrad_scaler: object = None  # e4m3, for the sparse dgrad (None: grad_scaler, which is e4m3)
    use_cusparselt: bool = False
    fp8_wgrad: bool = True  # False: dY^T x in fp32 from x as given
    gradient_accumulation_fusion: bool = False
    out_dtype: torch.dtype = torch.bfloat16
    order: str = Fp8Order.PRUNE_THEN_QUANTIZE
    fp8_dgrad: bool = True  # False: dY @ the dequantized W*M in x's dtype (the numerics study)
    weight_scale: Optional[torch.Tensor] = None  # the weight's e4m3 scale; None: current, per step
    # main_grad += (dy_q_t dy_si) (x_q_t x_si)^T inside one FP8 GEMM (TE's general_gemm with
    # accumulate=True: megasparse.te.fp8_route.te_wgrad_into_main_grad); None: no such GEMM, the
    # wgrad is written in fp32 and added (torch 2.13's FP8 GEMMs cannot accumulate: `_wgrad_fp32`)
    wgrad_into_main_grad: Optional[Callable] = None
    # a column-parallel layer's input communication run inside the op, overlapped with the wgrad
    # (megasparse.core.input_comm.ColumnInputComm); None: the input arrives communicated
    input_comm: Optional[object] = None


class Fp8Weight:
    """This step's e4m3 weight: the forward operand, the input-gradient operand, the scale.

    prune-then-quantize: e4m3 of W*M with the amax of W*M ("amax after pruning");
    quantize-then-prune: e4m3 of W with the amax of W, masked by the step's mask, which
    `compute_mask` took from those e4m3 values. A dense step (no mask): e4m3 of W (dense FP8).
    """

    def __init__(
        self,
        step: WeightStep,
        use_cusparselt: bool,
        order: str = Fp8Order.PRUNE_THEN_QUANTIZE,
        scale: Optional[torch.Tensor] = None,
    ):
        weight = step.dense().detach()  # W*M of this step (W in a dense step)
        if scale is None:
            amax_from = step.weight.detach() if order == Fp8Order.QUANTIZE_THEN_PRUNE else weight
            scale = scale_from_amax(amax_of(amax_from))
        w_q = quantize_with(weight, scale)
        self.scale, self.scale_inv = scale, scale.reciprocal()
        self.rows, self.cols = w_q.shape
        sparse = use_cusparselt and step.pruned
        self.forward = fp8_gemm.compress(w_q) if sparse else w_q
        w_q_t = w_q.t().contiguous()  # [in, out]: (W*M)^T, 2:4 along out for transposable masks
        self.sparse_t = step.pruned and step.transposable
        self.compressed_t = sparse and self.sparse_t
        self.backward = fp8_gemm.compress(w_q_t) if self.compressed_t else w_q_t

    def dequantized(self) -> torch.Tensor:
        """W*M as float32 [out, in], the e4m3 values / scale: a high-precision dgrad's operand."""
        if self.compressed_t:
            raise ValueError(
                "megasparse: a high-precision input gradient (fp8_dgrad=False) needs the "
                "uncompressed e4m3 weight; build its step with transposable=False"
            )
        return (self.backward.float() / self.scale).t()

    def held_tensors(self):
        return [self.scale, self.scale_inv, self.forward, self.backward]


def fp8_weight(
    step: WeightStep,
    use_cusparselt: bool,
    order: str = Fp8Order.PRUNE_THEN_QUANTIZE,
    scale: Optional[torch.Tensor] = None,
) -> Fp8Weight:
    """This step's FP8 weight, built once (`scale`: a given weight scale, else current scaling)."""
    order = Fp8Order(order).value  # a member or its string: one cache entry
    return step.cached(
        ("fp8_weight", use_cusparselt, order),
        lambda: Fp8Weight(step, use_cusparselt, order, scale),
    )


@dataclass(frozen=True)
class _Fp8SavedForBackward:
    """What the backward needs besides the saved tensors (x's FP8 transpose or x, its scale, W)."""

    step: WeightStep
    plan: Fp8LinearPlan
    x_shape: torch.Size
    x_dtype: torch.dtype
    empty: bool  # no tokens (an expert without any): no quantization, no GEMM
    has_bias: bool
    main_grad: Optional[torch.Tensor]  # Megatron's fused wgrad accumulator, when fused


class _Fp8SparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, step: WeightStep, plan: Fp8LinearPlan):
        x_local, comm = x, plan.input_comm
        if comm is not None:
            x = comm.gather(x)  # the total input (SP)
        regather = regathers(comm)  # SP: the local shard is saved, all-gathered in the backward
        x2d = x.reshape(-1, x.shape[-1])
        empty = x2d.shape[0] == 0
        if empty:
            y, saved_x, x_si = x2d.new_empty(0, weight.shape[0], dtype=plan.out_dtype), None, None
        else:
            wq = fp8_weight(step, plan.use_cusparselt, plan.order, plan.weight_scale)
            x_t = plan.fp8_wgrad and ctx.needs_input_grad[1]  # the FP8 wgrad takes x^T: cast now
            # (under SP after the backward's gather: the total's transpose is not kept)
            x_q, x_si, x_q_t = quantize(plan.x_scaler, x2d, x_t and not regather)
            cusparselt = plan.use_cusparselt and step.pruned  # a dense step: the dense FP8 GEMM
            # the bias joins the pass that scales and casts the GEMM's output
            y = fp8_gemm.sparse_fp8_mm(
                x_q, x_si, wq.forward, wq.rows, wq.scale_inv, plan.out_dtype, cusparselt, bias
            )
            saved_x = x_q_t if plan.fp8_wgrad else x2d  # [in, tokens padded to 16] e4m3, or x
            if regather:  # this rank's rows: of x_q (the total's scale, 1 byte/elem) or of x
                if plan.fp8_wgrad:
                    saved_x = comm.own_shard(x_q) if x_t else None
                else:
                    saved_x = x_local.reshape(-1, x_local.shape[-1])
        ctx.save_for_backward(saved_x, x_si, weight)
        fused = plan.gradient_accumulation_fusion
        main_grad = getattr(weight, "main_grad", None) if fused else None
        ctx.saved = _Fp8SavedForBackward(
            step, plan, x.shape, x.dtype, empty, bias is not None, main_grad
        )
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        saved_x, x_si, weight = ctx.saved_tensors
        saved = ctx.saved
        step, plan = saved.step, saved.plan
        dy2d = dy.reshape(-1, dy.shape[-1])
        wgrad_t = plan.fp8_wgrad and ctx.needs_input_grad[1]  # the FP8 wgrad takes dY^T
        dy_q_t = dy_si = None  # the wgrad's dY operand, when the dgrad's cast already made it

        def input_grad():  # while the saved input shard is all-gathered (SP)
            nonlocal dy_q_t, dy_si
            if not ctx.needs_input_grad[0]:
                return None
            if saved.empty:  # no tokens: zero gradients (the weight still gets its per-step terms)
                return dy.new_zeros(saved.x_shape)
            wq = fp8_weight(step, plan.use_cusparselt, plan.order, plan.weight_scale)
            if not plan.fp8_dgrad:  # in x's precision on the weight the forward used
                grad_x = dy2d.to(saved.x_dtype) @ wq.dequantized().to(saved.x_dtype)
            elif wq.sparse_t:  # (W*M)^T is 2:4: the input gradient is a 2:4 GEMM too
                if plan.dgrad_scaler is None:  # the gradient format is e4m3: one cast for both
                    d_q, d_si, dy_q_t = quantize(plan.grad_scaler, dy2d, wgrad_t)
                    dy_si = d_si
                else:  # HYBRID: cuSPARSELt's e4m3 dY here, e5m2 for the wgrad
                    d_q, d_si = plan.dgrad_scaler(dy2d)
                grad_x = fp8_gemm.sparse_fp8_mm(
                    d_q,
                    d_si,
                    wq.backward,
                    wq.cols,
                    wq.scale_inv,
                    plan.out_dtype,
                    plan.use_cusparselt,
                )
            else:
                dy_q, dy_si, dy_q_t = quantize(plan.grad_scaler, dy2d, wgrad_t)
                # wq.backward is (W*M)^T [in, out] row-major: dense_fp8_mm's b_q_t
                grad_x = fp8_gemm.dense_fp8_mm(
                    dy_q, dy_si, wq.backward, wq.scale_inv, plan.out_dtype
                )
            return grad_x.reshape(saved.x_shape)

        def weight_and_bias_grads(x_saved):  # while the input gradient's reduction is in flight
            grad_w = grad_b = None
            if ctx.needs_input_grad[1]:
                if regathered and plan.fp8_wgrad:  # the gathered e4m3 rows -> the wgrad's x^T
                    x_saved = fp8_gemm.pad_rows(x_saved).t().contiguous()
                grad_w = _weight_gradient(dy2d, dy_q_t, dy_si, x_saved, x_si, weight, saved)
            if saved.has_bias and ctx.needs_input_grad[2]:
                grad_b = dy2d.sum(dim=0)
            return grad_w, grad_b

        regathered = regathers(plan.input_comm) and saved_x is not None
        grad_x, (grad_w, grad_b) = column_backward(
            plan.input_comm, saved_x, input_grad, weight_and_bias_grads
        )
        return grad_x, grad_w, grad_b, None, None


def quantize(scaler, t, transpose: bool):
    """(q, scale_inv, q_t) from a plan's scaler: q_t = pad_rows(q).t().contiguous() when
    `transpose` (None otherwise), from the scaler's fused cast where it has one (`.quantize`)."""
    fused = getattr(scaler, "quantize", None)
    if fused is not None:
        return fused(t, transpose)
    q, scale_inv = scaler(t)
    return q, scale_inv, fp8_gemm.pad_rows(q).t().contiguous() if transpose else None


def _weight_gradient(dy2d, dy_q_t, dy_si, saved_x, x_si, weight, saved: _Fp8SavedForBackward):
    """What the backward returns for the weight, after the step's gradient rule; under Megatron's
    main_grad fusion the gradient goes into main_grad (and the dummy gradient is returned).

    With an accumulating FP8 GEMM (`plan.wgrad_into_main_grad`), dY^T X goes straight into
    main_grad, no fp32 [out, in] temporary: the gradient under straight-through rules and dense
    steps; other rules then apply `main_grad_term` to the accumulated main_grad, as the TE
    linears' masked-weight path does after TE's fused accumulation (masked: idempotent mask
    multiply; srste / masked_decay: the decay term once per step)."""
    step, plan, main_grad = saved.step, saved.plan, saved.main_grad
    fused_gemm = plan.wgrad_into_main_grad if plan.fp8_wgrad else None
    if main_grad is not None and fused_gemm is not None:
        take_main_grad(weight, main_grad)
        if not saved.empty:
            if dy_q_t is None:
                _, dy_si, dy_q_t = quantize(plan.grad_scaler, dy2d, True)
            fused_gemm(main_grad, dy_q_t, dy_si, saved_x, x_si)
        step.rule.main_grad_term(weight, step)
        return gradient_went_to_main_grad(weight, dy2d.dtype)
    if saved.empty:
        grad32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    else:
        grad32 = _wgrad_fp32(dy2d, dy_q_t, dy_si, saved_x, x_si, plan)
    if main_grad is None:
        return step.rule.dense_gradient(grad32, weight, step).to(weight.dtype)
    take_main_grad(weight, main_grad)
    grad = step.rule.dense_gradient(grad32, weight, step)
    main_grad.add_(grad.to(main_grad.dtype))
    return gradient_went_to_main_grad(weight, dy2d.dtype)


def _wgrad_fp32(dy2d, dy_q_t, dy_si, saved_x, x_si, plan):
    """dY^T X in fp32: FP8 (as TE: dY in the recipe's gradient format, x in e4m3) or high precision.
    Tokens are the reduction dim: both FP8 operands come transposed with zero rows padded to a
    multiple of 16 (saved_x is x_q's [in, tokens], dy_q_t dY's [out, tokens] unless None).

    Why a temporary where no accumulating GEMM is given (the local path): torch 2.13's FP8 GEMMs
    cannot accumulate. `torch._scaled_mm(self, mat2, scale_a, scale_b, bias=None,
    scale_result=None, out_dtype=None, use_fast_accum=False, *, out)` and `torch._scaled_mm_v2`
    (the same plus per-operand recipes, swizzles, contraction_dim) overwrite `out` (no beta), and
    their bias is a 1-D row vector; `torch.nn.functional.scaled_mm` has no `out` at all."""
    if not plan.fp8_wgrad:
        return dy2d.t().float() @ saved_x.float()
    if dy_q_t is None:
        _, dy_si, dy_q_t = quantize(plan.grad_scaler, dy2d, True)
    return fp8_gemm.dense_fp8_mm(dy_q_t, dy_si, saved_x, x_si, torch.float32)


def fp8_sparse_linear_step(x, weight, bias, step: WeightStep, plan: Fp8LinearPlan) -> torch.Tensor:
    """y = x (M*W)^T + b in FP8 with this optimizer step's weight state (x W^T + b for a dense step:
    dense FP8 GEMMs; cuSPARSELt only where the step is pruned)."""
    device = x.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return _Fp8SparseLinear.apply(x, weight, bias, step, plan)
    with torch.autocast(device, enabled=False):  # FP8 operands: explicit dtypes, as TE
        return _Fp8SparseLinear.apply(x, weight, bias, step, plan)


def default_plan(recipe=None, use_cusparselt=False, **kwargs) -> Fp8LinearPlan:
    """A plan with megasparse's own scalers following `recipe` (Fp8Recipe; None: HYBRID current)."""
    from megasparse.fp8.scaling import Fp8Recipe

    recipe = recipe or Fp8Recipe()
    grad = recipe.own_scaler(recipe.grad_dtype)
    dgrad = None if recipe.grad_dtype == E4M3 else CurrentScaler(E4M3, recipe.margin)
    return Fp8LinearPlan(
        recipe.own_scaler(E4M3), grad, dgrad, use_cusparselt, recipe.fp8_wgrad, **kwargs
    )


def cusparselt_fp8_reason(weight: torch.Tensor) -> Optional[str]:
    """Why this weight (shard) cannot run its FP8 2:4 GEMMs on cuSPARSELt (None: it can)."""
    return _cusparselt_fp8_reason(weight.device, tuple(weight.shape))


@functools.lru_cache(maxsize=None)
def _cusparselt_fp8_reason(device, shape) -> Optional[str]:
    """Asked once per device and shape (device properties, cuSPARSELt version): not per call."""
    reason = fp8_gemm.fp8_cusparselt_reason(device)
    multiple = fp8_gemm.WEIGHT_MULTIPLE
    if reason is None and (shape[0] % multiple or shape[1] % multiple):
        reason = f"the weight shard {shape} is not a multiple of {multiple} in both dims"
    return reason


def check_shard_shape(layer: str, shape) -> None:
    """FP8 GEMMs (torch._scaled_mm, cuSPARSELt e4m3) need both weight dims multiples of 16."""
    multiple = fp8_gemm.TOKEN_MULTIPLE
    if shape[0] % multiple or shape[1] % multiple:
        raise ValueError(
            f"megasparse: {layer} with fp8 has a weight shard {tuple(shape)} (per tensor-parallel "
            f"rank); FP8 GEMMs need both dims multiples of {multiple} (cuSPARSELt's FP8 2:4 "
            f"GEMM wants {fp8_gemm.WEIGHT_MULTIPLE}). Change the layer sizes or set fp8=None."
        )


def local_plan(sparsity, weight, x, gradient_accumulation_fusion=False) -> Fp8LinearPlan:
    """The plan of the local FP8 path (SparsityConfig.fp8): current per-tensor scaling in the
    config's format; cuSPARSELt FP8 2:4 where the layer prunes and the device runs it (CPU and
    other devices: the emulation, the same math); output in x's dtype (autocast's under autocast)."""
    from megasparse.fp8.scaling import Fp8Recipe

    use_cusparselt = False
    if sparsity.prunes_weights and weight.is_cuda and sparsity.backend != "dense":
        reason = cusparselt_fp8_reason(weight)
        if reason is not None and sparsity.backend != "auto":
            raise ValueError(
                f"megasparse: backend={sparsity.backend!r} with fp8={sparsity.fp8!r} needs "
                f"cuSPARSELt's FP8 2:4 GEMM, which cannot run here: {reason}. Use backend='auto' "
                "(dense FP8 GEMMs on W*M there) or 'dense'"
            )
        if reason is not None:
            warn_once(f"megasparse: FP8 2:4 runs dense FP8 GEMMs on W*M ({reason})", stacklevel=1)
        use_cusparselt = reason is None
    device = x.device.type
    autocast = device in ("cpu", "cuda") and torch.is_autocast_enabled(device)
    recipe = Fp8Recipe(grad_dtype=E4M3 if sparsity.fp8 == "e4m3" else E5M2)
    return default_plan(
        recipe,
        use_cusparselt,
        gradient_accumulation_fusion=gradient_accumulation_fusion,
        out_dtype=torch.get_autocast_dtype(device) if autocast else x.dtype,
        order=sparsity.fp8_order,
    )
