"""FP8 formats, amax, scales and quantization; the per-tensor recipe and its scalers.

Per-tensor FP8 scaling of the runtime operands (x, dY) under a Transformer Engine recipe.
Every scale stays on the device (no `.item()`): amaxes, histories and scales are tensors.

- `Fp8Recipe.from_te(recipe)` reads a TE recipe (duck-typed, TE is not imported): the formats
  (E4M3: e4m3 everywhere; HYBRID: e4m3 forward, e5m2 gradients), margin, the delayed-scaling
  history, current scaling's power-of-2 option, and whether wgrad runs in FP8
  (`override_linear_precision.wgrad`). Only per-tensor recipes (DelayedScaling,
  Float8CurrentScaling) map onto the one scale of the cuSPARSELt GEMM; block recipes (MXFP8,
  Float8BlockScaling, NVFP4) return None and keep TE's own GEMM on W*M.
- Scalers quantize one tensor and return (q, scale_inv); `scaler.quantize(t, transpose=True)`
  also returns q's transpose with tokens zero-padded to 16 (the weight-gradient GEMM's operand),
  written by the same pass over t (the fused cast kernel, megasparse.kernels.fp8_cast):
  `TeQuantizerScaler`: the module's own TE delayed-scaling quantizer: its `scale` (from TE's amax
  history, reduced over TE's amax group at the end of fp8_autocast) and its `amax` buffer, into
  which this tensor's amax is recorded, so TE's bookkeeping runs unchanged.
  `CurrentScaler`: this tensor's amax (Float8CurrentScaling), max-reduced over a process group when
  TE's quantizer has one (sequence parallel), as TE does.
  `DelayedScaler`: megasparse's own device-side amax history (DelayedScaling's math) where no TE
  quantizer state exists (stand-ins, the local path).
  Under delayed scaling (TeQuantizerScaler, DelayedScaler after its first call) the scale comes
  from past amaxes, so this tensor's amax is only recorded: the cast kernel computes it in the same
  pass (`fp8_cast(..., amax=)`), no separate reduction. Current scaling needs the amax before the
  cast: one reduction (`amax_of`), then the cast.
  A NaN amax is recorded as torch's NaN (0x7FC00000) whatever NaN t holds.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from megasparse import kernels
from megasparse.fp8.gemm import pad_rows

E4M3 = torch.float8_e4m3fn  # forward operands (and gradients under the E4M3 format)
E5M2 = torch.float8_e5m2  # gradients under HYBRID
FP8_MAX = {E4M3: float(torch.finfo(E4M3).max), E5M2: float(torch.finfo(E5M2).max)}  # 448, 57344
_CAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CAST_KERNEL = (kernels.fp8_cast_triton, kernels.fp8_cast_reference)  # (CUDA, elsewhere)


def amax_of(t: torch.Tensor) -> torch.Tensor:
    """max |t| as a float32 device scalar in one reduction: bitwise `t.abs().amax()` (both are a
    max of |t|, exact; NaN propagates), without abs()'s full-size intermediate."""
    return torch.linalg.vector_norm(t.detach(), float("inf")).float()


def fused_amax(t: torch.Tensor) -> torch.Tensor:
    """The zeroed one-element float32 target of `fp8_cast(..., amax=)` (no host sync)."""
    return torch.zeros(1, dtype=torch.float32, device=t.device)


def fp8_cast(
    t: torch.Tensor,
    scale: torch.Tensor,
    dtype=E4M3,
    transpose: bool = False,
    amax: Optional[torch.Tensor] = None,
):
    """(q, q_t): q as `quantize_with`; q_t = pad_rows(q).t().contiguous() of a 2-D t when
    `transpose` (else None). One Triton pass over a 2-D float32/bf16/fp16 t on CUDA, the torch
    reference elsewhere (and for other shapes and dtypes). With `amax` (`fused_amax(t)`: one
    float32 element, zeroed), the same pass records max(amax, max |t|) into it in place."""
    if t.dim() != 2 or t.dtype not in _CAST_DTYPES:
        fmax = FP8_MAX[dtype]
        q = (t.float() * scale).clamp(-fmax, fmax).to(dtype)
        if amax is not None and t.numel():
            a = kernels.amax_reference(t).reshape(amax.shape)
            amax.copy_(torch.maximum(amax, a))
        return q, pad_rows(q).t().contiguous() if transpose else None
    kernel = kernels.pick(*_CAST_KERNEL, t)
    if amax is None:
        return kernel(t, scale, dtype, transpose)
    return kernel(t, scale, dtype, transpose, amax)


def quantize_with(t: torch.Tensor, scale: torch.Tensor, dtype=E4M3) -> torch.Tensor:
    """t * scale saturated to the format's range, cast to `dtype` (round to nearest even)."""
    return fp8_cast(t, scale, dtype)[0]


def scale_from_amax(
    amax: torch.Tensor, dtype=E4M3, margin: int = 0, pow2: bool = False, epsilon: float = 0.0
) -> torch.Tensor:
    """TE's per-tensor scale: fmax / amax / 2**margin (1 where amax is 0 or not finite)."""
    amax = torch.clamp_min(amax.float(), epsilon) if epsilon else amax.float()
    scale = FP8_MAX[dtype] / amax / 2.0**margin
    scale = torch.where(torch.isfinite(scale) & (amax > 0), scale, torch.ones_like(scale))
    if pow2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    return scale


def quantized_weight(weight: torch.Tensor) -> torch.Tensor:
    """The e4m3 values of W (per-tensor scale of its amax) as float: what quantize-then-prune masks."""
    return quantize_with(weight, scale_from_amax(amax_of(weight))).float()


@dataclass(frozen=True)
class Fp8Recipe:
    grad_dtype: torch.dtype = E5M2  # HYBRID
    margin: int = 0
    amax_history_len: int = 1  # 1: current scaling
    amax_compute_algo: str = "max"
    pow2_scales: bool = False
    fp8_wgrad: bool = True
    delayed: bool = False

    @classmethod
    def from_te(cls, recipe) -> Optional["Fp8Recipe"]:
        """The per-tensor recipe megasparse follows, or None for a block-scaled TE recipe."""
        kind = type(recipe).__name__
        if kind not in ("DelayedScaling", "Float8CurrentScaling"):
            return None
        fmt = getattr(getattr(recipe, "fp8_format", None), "name", "HYBRID")
        grad_dtype = E4M3 if fmt == "E4M3" else E5M2
        override = getattr(recipe, "override_linear_precision", None)
        fp8_wgrad = not bool(getattr(override, "wgrad", False))
        if kind == "DelayedScaling":
            algo = getattr(recipe, "amax_compute_algo", "max")
            return cls(
                grad_dtype,
                int(getattr(recipe, "margin", 0)),
                int(recipe.amax_history_len),
                algo if isinstance(algo, str) else "max",
                False,
                fp8_wgrad,
                True,
            )
        pow2 = bool(getattr(getattr(recipe, "fp8_quant_fwd_inp", None), "power_2_scale", False))
        return cls(grad_dtype, 0, 1, "max", pow2, fp8_wgrad, False)

    def own_scaler(self, dtype):
        """megasparse's scaler following this recipe (no TE state)."""
        if self.delayed and self.amax_history_len > 1:
            return DelayedScaler(dtype, self.margin, self.amax_history_len, self.amax_compute_algo)
        return CurrentScaler(dtype, self.margin, self.pow2_scales)


class _Scaler:
    """`scaler(t) -> (q, scale_inv)`; `scaler.quantize(t, transpose) -> (q, scale_inv, q_t)`;
    megasparse's own scalers also give `scaler.scale(t)`: t's scale alone, its amax recorded as
    `quantize` records it, without the cast (the numerics study scales a weight before pruning)."""

    def __call__(self, t: torch.Tensor):
        q, scale_inv, _ = self.quantize(t)
        return q, scale_inv


class CurrentScaler(_Scaler):
    def __init__(self, dtype=E4M3, margin=0, pow2=False, group=None, epsilon=0.0):
        self.dtype, self.margin, self.pow2 = dtype, margin, pow2
        self.group, self.epsilon = group, epsilon

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        amax = amax_of(t)
        if self.group is not None and torch.distributed.is_initialized():
            torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return scale_from_amax(amax, self.dtype, self.margin, self.pow2, self.epsilon)

    def quantize(self, t: torch.Tensor, transpose: bool = False):
        scale = self.scale(t)
        q, q_t = fp8_cast(t, scale, self.dtype, transpose)
        return q, scale.reciprocal(), q_t


class DelayedScaler(_Scaler):
    """The scale of past amaxes (max or most recent of the last `history_len`); the first call
    uses its own amax. Histories are device tensors; the bookkeeping is host-side counting only."""

    def __init__(self, dtype=E4M3, margin=0, history_len=16, algo="max"):
        if algo not in ("max", "most_recent"):
            raise ValueError(
                f"megasparse: amax_compute_algo must be 'max' or 'most_recent', got {algo!r}"
            )
        self.dtype, self.margin, self.history_len, self.algo = dtype, margin, history_len, algo
        self.history = None
        self.seen = 0

    def _past_amax(self, device) -> Optional[torch.Tensor]:
        """The amax the scale comes from (max or most recent of the window); None before the
        first record (on this device)."""
        if self.history is None or self.history.device != device:
            self.history = torch.zeros(self.history_len, dtype=torch.float32, device=device)
            self.seen = 0
        if self.seen == 0:
            return None
        if self.algo == "most_recent":
            return self.history[(self.seen - 1) % self.history_len]
        return self.history[: min(self.seen, self.history_len)].amax()

    def _record(self, amax: torch.Tensor) -> None:
        self.history[self.seen % self.history_len] = amax.reshape(())
        self.seen += 1

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        past, amax = self._past_amax(t.device), amax_of(t)
        self._record(amax)
        return scale_from_amax(amax if past is None else past, self.dtype, self.margin)

    def quantize(self, t: torch.Tensor, transpose: bool = False):
        past = self._past_amax(t.device)
        if past is None:  # no past amax: this one, before the cast (a separate reduction)
            amax = kernels.amax_reference(t)  # amax_of(t), a NaN as the kernel records it
            scale = scale_from_amax(amax, self.dtype, self.margin)
            q, q_t = fp8_cast(t, scale, self.dtype, transpose)
        else:  # the scale of past amaxes; this amax comes out of the cast itself
            scale = scale_from_amax(past, self.dtype, self.margin)
            amax = fused_amax(t)
            q, q_t = fp8_cast(t, scale, self.dtype, transpose, amax=amax)
        self._record(amax)
        return q, scale.reciprocal(), q_t


class TeQuantizerScaler(_Scaler):
    """A TE delayed-scaling quantizer's state: its scale; the tensor's amax goes into its buffer."""

    def __init__(self, quantizer, dtype=E4M3):
        self.quantizer, self.dtype = quantizer, dtype

    def quantize(self, t: torch.Tensor, transpose: bool = False):
        scale = self.quantizer.scale.reshape(()).float()
        amax = fused_amax(t)  # this tensor's amax, from the cast's own pass
        q, q_t = fp8_cast(t, scale, self.dtype, transpose, amax=amax)
        amax_buffer = self.quantizer.amax
        amax_buffer.copy_(torch.maximum(amax_buffer, amax.reshape(amax_buffer.shape)))
        return q, scale.reciprocal(), q_t


def te_scaler(quantizer, dtype):
    """The scaler for a TE quantizer object (duck-typed by class name), or None."""
    kind = type(quantizer).__name__
    if kind == "Float8Quantizer" and hasattr(quantizer, "scale") and hasattr(quantizer, "amax"):
        return TeQuantizerScaler(quantizer, dtype)
    if kind == "Float8CurrentScalingQuantizer":
        group = getattr(quantizer, "amax_reduction_group", None)
        group = group if getattr(quantizer, "with_amax_reduction", False) else None
        return CurrentScaler(
            dtype,
            0,
            bool(getattr(quantizer, "force_pow_2_scales", False)),
            group,
            float(getattr(quantizer, "amax_epsilon", 0.0)),
        )
    return None
