"""FP8 + 2:4: e4m3 operands with per-tensor scales, bf16 output, for speed (cuSPARSELt) and numerics.

Scaling follows the recipe's math: scale = 448 / amax / 2**margin, with amax either of the current
tensor (current/tensorwise scaling, amax_history_len = 1) or the max / most recent of a rolling
history of past amaxes (delayed scaling). `Fp8Scaling.from_recipe` reads those fields from a
Transformer Engine recipe object (duck-typed, so TE is not needed).

The order is configurable: "prune-then-quantize" masks the dense weight and quantizes W*M;
"quantize-then-prune" quantizes W and masks the quantized values (FP8's coarse grid creates more
ties, which the lower-index rule breaks). Either way the FP8 weight is exactly 2:4.

The GEMM runs on cuSPARSELt (torch._cslt_sparse_mm with an e4m3 sparse operand, sm90 only:
see megasparse.fp8.gemm) where available, else on torch._scaled_mm (CUDA, or the CPU emulation:
same operands, same scales, fp32 accumulation, bf16 output). The backward runs in the input's
precision on the dequantized sparse weight (a straight-through quantizer); only the forward GEMM is FP8.
This standalone class studies numerics (both orders); for training, Megatron's sparse TE linears
run megasparse.fp8.linear (forward and input gradient on FP8 2:4, per-step cached FP8 weight).
"""

from collections import deque
from dataclasses import dataclass

import torch

from megasparse.fp8 import gemm as fp8_gemm_ops
from megasparse.core.backends import BACKENDS
from megasparse.core.masks import pack_mask, weight_mask
from megasparse.core.linear_op import gradient_term
from megasparse.core.weight_state import WeightStep

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
ORDERS = ("prune-then-quantize", "quantize-then-prune")


@dataclass
class Fp8Scaling:
    margin: int = 0
    amax_history_len: int = 1  # 1: current scaling; > 1: delayed scaling over this many steps
    amax_compute_algo: str = "max"  # or "most_recent"

    def __post_init__(self):
        if self.amax_history_len < 1 or self.amax_compute_algo not in ("max", "most_recent"):
            raise ValueError(
                "Fp8Scaling: amax_history_len >= 1 and amax_compute_algo 'max' or 'most_recent'"
            )

    @classmethod
    def from_recipe(cls, recipe) -> "Fp8Scaling":
        """The scaling math of a TE recipe: DelayedScaling has a history; current scaling has none."""
        if hasattr(recipe, "amax_history_len"):
            algo = getattr(recipe, "amax_compute_algo", "max")
            return cls(
                margin=getattr(recipe, "margin", 0),
                amax_history_len=recipe.amax_history_len,
                amax_compute_algo=algo if isinstance(algo, str) else "max",
            )
        return cls(margin=getattr(recipe, "margin", 0))


class AmaxTracker:
    """Per-tensor amax history and the scale it gives (delayed scaling uses past steps only)."""

    def __init__(self, scaling: Fp8Scaling):
        self.scaling = scaling
        self.history = deque(maxlen=scaling.amax_history_len)

    def scale(self, tensor: torch.Tensor) -> torch.Tensor:
        amax = tensor.detach().abs().max().float()
        if self.scaling.amax_history_len == 1 or not self.history:
            used = amax  # current scaling (and the first delayed step)
        elif self.scaling.amax_compute_algo == "most_recent":
            used = self.history[-1]
        else:
            used = torch.stack(list(self.history)).max()
        self.history.append(amax)
        return scale_for(used, self.scaling.margin)


def scale_for(amax: torch.Tensor, margin: int = 0) -> torch.Tensor:
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return torch.where(amax > 0, E4M3_MAX / amax / 2.0**margin, torch.ones_like(amax))


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * scale saturated to the e4m3 range, cast to float8_e4m3fn."""
    return (x.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def sparse_fp8_weight(
    weight, scale=None, mask_kind="1d", order="prune-then-quantize", nonfinite="propagate"
):
    """(e4m3 2:4 weight, its scale, the mask).

    scale: a tensor, None (current scaling), or a function of the tensor the order quantizes
    (e.g. an AmaxTracker's `scale`), so the mask is computed once.
    """
    if order not in ORDERS:
        raise ValueError(f"megasparse: FP8 order must be one of {list(ORDERS)}, got {order!r}")
    scale_of = (
        scale
        if callable(scale)
        else (lambda t: scale_for(t.detach().abs().max()) if scale is None else scale)
    )
    if order == "prune-then-quantize":
        mask = weight_mask(weight, mask_kind, nonfinite)
        pruned = weight * mask
        scale = scale_of(pruned)
        return quantize(pruned, scale), scale, mask
    scale = scale_of(weight)
    q = quantize(weight, scale)
    mask = weight_mask(q.float(), mask_kind, nonfinite)
    return (q.float() * mask).to(E4M3), scale, mask


def _fp8_cusparselt_ok(device) -> bool:
    """sm90 with cuSPARSELt 0.6.2+ (megasparse.fp8.gemm.fp8_cusparselt_reason says why not)."""
    return fp8_gemm_ops.fp8_cusparselt_ok(device)


def fp8_gemm(x_q, scale_x, w_q, scale_w, out_dtype=torch.bfloat16, sparse=True):
    """(x_q / scale_x) @ (w_q / scale_w)^T with fp32 accumulation; cuSPARSELt when it can, else
    _scaled_mm. No host sync (megasparse.fp8.gemm applies the scale); tokens padded to 16.
    Compresses w_q per call: layers cache the compressed weight per step (megasparse.fp8.linear)."""
    inv_x, inv_w = (1.0 / scale_x).float(), (1.0 / scale_w).float()
    if sparse and _fp8_cusparselt_ok(w_q.device):
        packed = fp8_gemm_ops.compress(w_q)
        return fp8_gemm_ops.sparse_fp8_mm(
            x_q, inv_x, packed, w_q.shape[0], inv_w, out_dtype, use_cusparselt=True
        )
    return fp8_gemm_ops.dense_fp8_mm(x_q, inv_x, w_q, inv_w, out_dtype)


class _Fp8SparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scale_x, weight_scale, mask_kind, order, gradient):
        w_q, scale_w, mask = sparse_fp8_weight(weight, weight_scale, mask_kind, order)
        x2d = x.reshape(-1, x.shape[-1])
        y = fp8_gemm(quantize(x2d, scale_x), scale_x, w_q, scale_w)
        ctx.save_for_backward(x, weight, w_q, scale_w, mask)
        ctx.gradient = gradient
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, weight, w_q, scale_w, mask = ctx.saved_tensors
        dy2d = dy.reshape(-1, dy.shape[-1]).to(x.dtype)
        w_used = (w_q.float() / scale_w).to(x.dtype)  # the dequantized 2:4 weight the forward used
        grad_x = (dy2d @ w_used).reshape(x.shape)
        step = WeightStep(weight, pack_mask(mask), BACKENDS["dense"], False, hold_backward=False)
        grad_w = gradient_term(
            ctx.gradient, dy2d.t() @ x.reshape(-1, x.shape[-1]), weight, step, 0.0
        )
        return grad_x, grad_w.to(weight.dtype), None, None, None, None, None


class Fp8SparseLinear:
    """y = x (M*W)^T with e4m3 operands and bf16 output; scales per the recipe (one tracker per operand)."""

    def __init__(
        self,
        scaling: Fp8Scaling = None,
        mask_kind="1d",
        order="prune-then-quantize",
        gradient="ste",
    ):
        if order not in ORDERS:
            raise ValueError(f"megasparse: FP8 order must be one of {list(ORDERS)}, got {order!r}")
        self.scaling = scaling or Fp8Scaling()
        self.mask_kind, self.order, self.gradient = mask_kind, order, gradient
        self.x_amax, self.w_amax = AmaxTracker(self.scaling), AmaxTracker(self.scaling)

    def __call__(self, x, weight):
        scale_x = self.x_amax.scale(x)
        return _Fp8SparseLinear.apply(
            x, weight, scale_x, self.w_amax.scale, self.mask_kind, self.order, self.gradient
        )
