"""The 2:4 weight mask of a tensor (Triton on CUDA, the torch reference elsewhere) and its bit packing."""

import torch

from megasparse import kernels

_MASK_KERNELS = {
    "1d": (kernels.mask_1d_triton, kernels.mask_1d_reference),
    "transposable": (kernels.mask_transposable_triton, kernels.mask_transposable_reference),
}
_BIT_WEIGHTS = {}  # 1, 2, 4, ... 128 as uint8, per device


def weight_mask(
    weight: torch.Tensor, kind: str = "1d", nonfinite: str = "propagate"
) -> torch.Tensor:
    """The 2:4 mask of `weight` ([out, in]) as a bool tensor of the same shape."""
    if not isinstance(kind, str) or kind not in _MASK_KERNELS:
        raise ValueError(
            f"megasparse: weight_mask(weight, kind) takes kind '1d' or 'transposable', got {kind!r}"
        )
    if nonfinite == "error":
        check_finite(weight)
    return kernels.pick(*_MASK_KERNELS[kind], weight)(weight)


def check_finite(weight: torch.Tensor) -> None:
    """FloatingPointError naming the count when `weight` holds NaN/Inf (one host sync)."""
    bad = int((~torch.isfinite(weight.detach())).sum())
    if bad:
        raise FloatingPointError(
            f"megasparse: the weight {tuple(weight.shape)} holds {bad} NaN/Inf values, so its 2:4 mask "
            "is meaningless. The dense master weight is corrupt: resume from the last good checkpoint "
            "or lower the learning rate (nonfinite_weights='propagate' lets the NaN reach the loss instead)."
        )


def follows_pattern(mask: torch.Tensor, kind: str = "1d") -> bool:
    """Whether a bool mask [out, in] keeps exactly 2 of every 4 along `in` ("1d"), and for
    "transposable" also 2 of every 4 along `out` in every 4x4 tile. One host sync."""
    rows, cols = mask.shape
    if cols % 4 or (kind == "transposable" and rows % 4):
        return False
    kept = mask.to(torch.int8)
    ok = (kept.reshape(rows, cols // 4, 4).sum(-1) == 2).all()
    if kind == "transposable":
        ok = ok & (kept.reshape(rows // 4, 4, cols).sum(1) == 2).all()
    return bool(ok)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bits, 8 elements per byte (the flattened tensor, zero-padded)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    key = mask.device
    if key not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[key] = 2 ** torch.arange(8, device=mask.device, dtype=torch.uint8)
    return (flat.view(-1, 8).to(torch.uint8) * _BIT_WEIGHTS[key]).sum(-1, dtype=torch.uint8)


def unpack_mask(bits: torch.Tensor, shape) -> torch.Tensor:
    """The bool tensor of `shape` that `pack_mask` packed into `bits`."""
    numel = 1
    for size in shape:
        numel *= size
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return ((bits.unsqueeze(-1) >> shifts) & 1).bool().reshape(-1)[:numel].reshape(shape)
