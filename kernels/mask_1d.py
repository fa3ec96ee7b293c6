"""1d 2:4 magnitude mask: in every 4 consecutive elements along the input dim keep the 2 largest |w|.

Ties go to the lower index, so the mask is deterministic and identical on every backend:
element i of a group is dropped when at least 2 others beat it, where j beats i if
|w_j| > |w_i|, or |w_j| == |w_i| and j < i.
"""

import torch

from .common import HAVE_TRITON, check_2d, magnitude, require_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .common import magnitude_triton


def mask_1d_reference(weight: torch.Tensor) -> torch.Tensor:
    """Pure-torch reference. weight [out, in] with in % 4 == 0 -> bool mask of the same shape."""
    check_2d(weight, "the 1d 2:4 mask", 1, 4)
    a = magnitude(weight).reshape(-1, 4)
    mine, other = a[:, :, None], a[:, None, :]  # [groups, i, j]
    lower_index = torch.ones(4, 4, dtype=torch.bool, device=a.device).tril(-1)  # [i, j]: j < i
    beaten_by = (other > mine) | ((other == mine) & lower_index)
    return (beaten_by.sum(-1) < 2).reshape(weight.shape)


if HAVE_TRITON:

    @triton.jit
    def _mask_1d_kernel(w_ptr, mask_ptr, n_groups, BLOCK: tl.constexpr):
        groups = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        lane = tl.arange(0, 4)
        offsets = groups.to(tl.int64)[:, None] * 4 + lane[None, :]
        valid = (groups < n_groups)[:, None]
        a = magnitude_triton(tl.load(w_ptr + offsets, mask=valid, other=0.0))  # [BLOCK, 4]
        mine = a[:, :, None]
        other = a[:, None, :]
        lower_index = lane[None, None, :] < lane[None, :, None]
        beaten_by = (other > mine) | ((other == mine) & lower_index)
        n_beaten = tl.sum(beaten_by.to(tl.int32), axis=2)
        tl.store(mask_ptr + offsets, (n_beaten < 2).to(tl.int8), mask=valid)


def mask_1d_triton(weight: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Triton kernel (GPU, or CPU under TRITON_INTERPRET=1); same result as the reference."""
    require_triton()
    check_2d(weight, "the 1d 2:4 mask", 1, 4)
    w = weight.detach().contiguous()
    mask = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    n_groups = w.numel() // 4
    _mask_1d_kernel[(triton.cdiv(n_groups, block),)](w, mask, n_groups, BLOCK=block)
    return mask.view(torch.bool)
