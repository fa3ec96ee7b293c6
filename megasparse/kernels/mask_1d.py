"""1d 2:4 magnitude mask: in every 4 consecutive elements along the input dim keep the 2 largest |w|.

Ties go to the lower index, so the mask is deterministic and identical on every backend:
element i of a group is dropped when at least 2 others beat it, where j beats i if
|w_j| > |w_i|, or |w_j| == |w_i| and j < i.
"""

import torch

from .common import HAVE_TRITON, check_2d, compile_spec, magnitude, mask_operands

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .common import join4, magnitude_triton, split4, top2_of_4


def mask_1d_reference(weight: torch.Tensor) -> torch.Tensor:
    """Pure-torch reference. weight [out, in] with in % 4 == 0 -> bool mask of the same shape."""
    check_2d(weight, "the 1d 2:4 mask", 1, 4)
    columns = magnitude(weight).reshape(-1, 4).unbind(1)
    beaten = [
        torch.zeros(columns[0].shape, dtype=torch.uint8, device=weight.device) for _ in range(4)
    ]
    for i in range(4):  # the 6 pairs of a group, each compared once
        for j in range(i + 1, 4):
            j_wins = columns[j] > columns[i]  # a tie goes to the lower index i
            beaten[i] += j_wins
            beaten[j] += ~j_wins
    return (torch.stack(beaten, 1) < 2).reshape(weight.shape)  # kept: beaten by fewer than 2


# Launch: one program covers BLOCK consecutive elements (BLOCK / 4 groups), 16 per thread, so
# every thread issues 16-byte (fp32) or 2 x 16-byte (bf16/fp16) loads and 16-byte mask stores.
BLOCK = 2048
NUM_WARPS = 4

if HAVE_TRITON:

    @triton.jit
    def _mask_1d_kernel(w_ptr, mask_ptr, numel, BLOCK: tl.constexpr):
        # groups of 4 never cross rows (in % 4 == 0), so the weight is one flat run of groups
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offsets < numel
        a = magnitude_triton(tl.load(w_ptr + offsets, mask=valid, other=0.0))
        a0, a1, a2, a3 = split4(tl.reshape(a, [BLOCK // 4, 4]))
        k0, k1, k2, k3 = top2_of_4(a0, a1, a2, a3)
        keep = tl.reshape(join4(k0, k1, k2, k3), [BLOCK])
        tl.store(mask_ptr + offsets, keep.to(tl.int8), mask=valid)


def mask_1d_triton(weight: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Triton kernel (GPU, or CPU under TRITON_INTERPRET=1); same result as the reference."""
    w, mask = mask_operands(weight, "the 1d 2:4 mask", 1, 4)
    if w.numel():
        _mask_1d_kernel[(triton.cdiv(w.numel(), block),)](
            w, mask, w.numel(), BLOCK=block, num_warps=NUM_WARPS
        )
    return mask.view(torch.bool)


def compile_specs(dtype: torch.dtype) -> list:
    """The launch above, described for the offline compile report."""
    arguments = "w_ptr:*T/16 mask_ptr:*i8/16 numel:i32/16"
    return [
        compile_spec(
            "mask_1d", _mask_1d_kernel, dtype, arguments, {"BLOCK": BLOCK}, BLOCK, NUM_WARPS
        )
    ]
