"""The FP8 + 2:4 numerics-study reference (either order, any per-tensor recipe); not public API.

An e4m3 2:4 weight and an e4m3 input with per-tensor scales from megasparse.fp8.scaling: current
scaling, or delayed scaling over an amax history (`Fp8Recipe`, e.g. `Fp8Recipe.from_te(recipe)`).
The order is configurable (megasparse.config.Fp8Order): "prune-then-quantize" masks the dense
weight and quantizes W*M; "quantize-then-prune" quantizes W and masks the quantized values (FP8's
coarse grid creates more ties, which the lower-index rule breaks). Either way the FP8 weight is
exactly 2:4.

`Fp8NumericsStudy` is a configuration of the FP8 training op (megasparse.fp8.linear): the forward
GEMM in FP8 (cuSPARSELt where the device runs it, else the emulation), the input gradient in the
input's precision on the dequantized 2:4 weight (a straight-through quantizer), the weight
gradient in fp32 cast to the weight's dtype, and the weight scaled by
the recipe (its own amax history under delayed scaling) and masked afresh at every call. For
training, use megasparse.Fp8SparseLinear or the sparse Megatron / TE linears.
"""

from typing import Optional

from megasparse.config import FP8_ORDERS, Fp8Order, SparsityConfig
from megasparse.core.backends import BACKENDS
from megasparse.core.masks import pack_mask, weight_mask
from megasparse.core.weight_state import WeightStep
from megasparse.fp8 import gemm
from megasparse.fp8.linear import Fp8LinearPlan, fp8_sparse_linear_step
from megasparse.fp8.scaling import E4M3, Fp8Recipe, amax_of, quantize_with, scale_from_amax


def _order(order) -> Fp8Order:
    if order not in FP8_ORDERS:
        raise ValueError(f"megasparse: FP8 order must be one of {list(FP8_ORDERS)}, got {order!r}")
    return Fp8Order(order)


def _scale_of(scale):
    """The function of a tensor that gives its scale: `scale` itself, current scaling (None), or
    the given tensor."""
    if callable(scale):
        return scale
    if scale is None:
        return lambda t: scale_from_amax(amax_of(t))
    return lambda t: scale


def sparse_fp8_weight(
    weight,
    scale=None,
    mask_kind="1d",
    order=Fp8Order.PRUNE_THEN_QUANTIZE,
    nonfinite="propagate",
):
    """(e4m3 2:4 weight, its scale, the mask).

    scale: a tensor, None (current scaling), or a function of the tensor the order quantizes
    (e.g. a scaler's `scale`), so the mask is computed once.
    """
    mask, scale, source = _mask_and_scale(weight, scale, mask_kind, order, nonfinite)
    if _order(order) == Fp8Order.PRUNE_THEN_QUANTIZE:
        return quantize_with(source, scale), scale, mask  # source: W*M
    return (source * mask).to(E4M3), scale, mask  # source: W's e4m3 values


def _mask_and_scale(weight, scale, mask_kind, order, nonfinite="propagate"):
    """(mask, scale, what the mask applies to): W*M's scale and W*M under prune-then-quantize (no
    cast: the FP8 op casts W*M once per step), W's scale and W's e4m3 values (as float) under
    quantize-then-prune (the mask is taken of them)."""
    order, scale_of = _order(order), _scale_of(scale)
    if order == Fp8Order.PRUNE_THEN_QUANTIZE:
        mask = weight_mask(weight, mask_kind, nonfinite)
        pruned = weight * mask
        return mask, scale_of(pruned), pruned
    scale = scale_of(weight)
    q = quantize_with(weight, scale).float()
    return weight_mask(q, mask_kind, nonfinite), scale, q


class Fp8NumericsStudy:
    """y = x (M*W)^T with e4m3 operands and bf16 output; scales per the recipe (one scaler per operand)."""

    def __init__(
        self,
        recipe: Optional[Fp8Recipe] = None,
        mask_kind="1d",
        order=Fp8Order.PRUNE_THEN_QUANTIZE,
        gradient="ste",
    ):
        self.order = _order(order)
        self.recipe = recipe or Fp8Recipe()  # current scaling
        self.mask_kind, self.gradient = mask_kind, gradient
        self.x_scaler = self.recipe.own_scaler(E4M3)
        self.w_scaler = self.recipe.own_scaler(E4M3)

    def __call__(self, x, weight):
        # the mask and the weight scale; W*M is cast once, by the op's per-step FP8 weight
        mask, w_scale, _ = _mask_and_scale(
            weight.detach(), self.w_scaler.scale, self.mask_kind, self.order
        )
        # a step of this call's own: its mask, no transposed operand (the dgrad is not FP8), and
        # the gradient rule of `gradient` with zero decay factors. The study's forward weight is
        # always the FP8 2:4 weight, so sste keeps only its straight-through gradient: ste's
        gradient = "ste" if self.gradient == "sste" else self.gradient
        rule_config = SparsityConfig(gradient=gradient, srste_decay=0.0, masked_decay_factor=0.0)
        step = WeightStep(
            weight,
            pack_mask(mask),
            BACKENDS["dense"],
            False,
            hold_backward=False,
            sparsity=rule_config,
        )
        plan = Fp8LinearPlan(
            self.x_scaler,
            None,  # no FP8 gradient: the backward runs in x's precision
            use_cusparselt=gemm.fp8_cusparselt_ok(weight.device),
            fp8_wgrad=False,
            order=self.order,
            fp8_dgrad=False,
            weight_scale=w_scale,
        )
        return fp8_sparse_linear_step(x, weight, None, step, plan)
