"""Pieces shared by the mask kernels: the magnitude every mask ranks by, and Triton import.

Masks rank elements by |w| in float32 (exact for fp16/bf16/fp32 weights). NaN ranks as +inf:
a non-finite weight is always kept, so it reaches the output and the loss exactly as in the
dense layer (where Megatron's NaN checks see it) and the mask stays exactly 2:4.
"""

import torch

try:  # Triton is optional: CPU-only installs use the torch references.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton ships with every Linux torch install we test
    triton = None
    tl = None
    HAVE_TRITON = False


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    """|w| in float32 with NaN mapped to +inf (the ranking key of every mask)."""
    return weight.detach().abs().float().nan_to_num(nan=float("inf"))


def require_triton() -> None:
    if not HAVE_TRITON:
        raise RuntimeError(
            "megasparse: Triton is not installed; use the *_reference functions or `pip install triton`"
        )


def check_2d(weight: torch.Tensor, what: str, rows_multiple: int, cols_multiple: int) -> None:
    """Raise a clear error when a weight cannot be cut into the mask's groups."""
    if weight.dim() != 2:
        raise ValueError(f"megasparse: {what} needs a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if rows % rows_multiple or cols % cols_multiple:
        raise ValueError(
            f"megasparse: {what} needs a weight whose [out, in] shape is a multiple of "
            f"[{rows_multiple}, {cols_multiple}], got {tuple(weight.shape)}; "
            "choose layer sizes (per tensor-parallel rank) that are multiples of 4"
        )


if HAVE_TRITON:

    @triton.jit
    def magnitude_triton(x):
        a = tl.abs(x.to(tl.float32))
        return tl.where(a != a, float("inf"), a)
