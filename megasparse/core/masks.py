"""The 2:4 weight mask of a tensor: the Triton kernel on CUDA, the torch reference elsewhere."""

import torch

from megasparse import kernels

_MASK_KERNELS = {
    "1d": (kernels.mask_1d_triton, kernels.mask_1d_reference),
    "transposable": (kernels.mask_transposable_triton, kernels.mask_transposable_reference),
}


def weight_mask(
    weight: torch.Tensor, kind: str = "1d", nonfinite: str = "propagate"
) -> torch.Tensor:
    """The 2:4 mask of `weight` ([out, in]) as a bool tensor of the same shape."""
    if nonfinite == "error":
        check_finite(weight)
    triton_kernel, reference = _MASK_KERNELS[kind]
    if weight.is_cuda and kernels.HAVE_TRITON:
        return triton_kernel(weight)
    return reference(weight)


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
