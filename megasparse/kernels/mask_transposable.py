"""Exact optimal transposable 2:4 mask: per 4x4 tile, the best of the 90 patterns with 2 kept per row and column.

Both W*M and (W*M)^T are then 2:4, so the backward dX = dY (W*M) can run on sparse tensor
cores too. Each tile's score is the kept sum of |w|, accumulated in float32 in a fixed order
(tile positions 0..15, row-major) by both the reference and the kernel, so the two agree bit
for bit; ties go to the lowest pattern index. `mask_transposable_greedy` is the greedy
heuristic other libraries use, kept here only to measure how much the exact search gains.

Non-finite weights score as 2**120 (finite, so sums never overflow or tie at inf): a pattern
keeps as many of them as it can, and they reach the output as in the dense layer.
"""

import itertools

import torch

from .common import HAVE_TRITON, check_2d, compile_spec, magnitude, mask_operands

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .common import magnitude_triton, split4


def _enumerate_patterns() -> torch.Tensor:
    """All 4x4 0/1 matrices with two ones in every row and column, as [90, 16] bool, fixed order."""
    pairs = list(itertools.combinations(range(4), 2))
    patterns = []
    for rows in itertools.product(pairs, repeat=4):
        tile = torch.zeros(4, 4, dtype=torch.bool)
        for r, cols in enumerate(rows):
            tile[r, list(cols)] = True
        if bool((tile.sum(0) == 2).all()):
            patterns.append(tile.flatten())
    return torch.stack(patterns)


PATTERNS = _enumerate_patterns()
N_PATTERNS = PATTERNS.shape[0]  # 90
_NONFINITE_SCORE = 2.0**120  # 16 of them still sum below float32 max


def _tiles(a: torch.Tensor) -> torch.Tensor:
    """[R, C] -> [R/4 * C/4, 16], each row one 4x4 tile in row-major order."""
    rows, cols = a.shape
    return a.reshape(rows // 4, 4, cols // 4, 4).permute(0, 2, 1, 3).reshape(-1, 16)


def _untile(t: torch.Tensor, shape) -> torch.Tensor:
    rows, cols = shape
    return t.reshape(rows // 4, cols // 4, 4, 4).permute(0, 2, 1, 3).reshape(rows, cols)


def mask_transposable_reference(weight: torch.Tensor) -> torch.Tensor:
    """Pure-torch reference. weight [out, in], both multiples of 4 -> bool mask of the same shape."""
    check_2d(weight, "the transposable 2:4 mask", 4, 4)
    tiles = _tiles(magnitude(weight).clamp(max=_NONFINITE_SCORE))
    patterns = PATTERNS.to(tiles.device)
    included = patterns.t().to(torch.float32).contiguous()  # [16, 90]: 1.0 where pattern keeps k
    tiles = tiles.to(torch.float32)
    score = torch.zeros(tiles.shape[0], N_PATTERNS, dtype=torch.float32, device=tiles.device)
    for k in range(16):  # fixed order, shared with the kernel, so float sums match exactly
        score.addcmul_(tiles[:, k : k + 1], included[k])  # in place; |w| * 1 or * 0 is exact
    best = score.argmax(dim=1)  # first maximum: lowest pattern index wins ties
    return _untile(patterns[best], weight.shape)


def mask_transposable_greedy(weight: torch.Tensor) -> torch.Tensor:
    """Greedy heuristic (for comparison only): visit |w| from the largest, keep it while the kept set
    still completes to one of the 90 patterns. Always ends on a valid pattern, rarely the best.

    (Without the completion check a greedy can stop at 7 kept in a tile: still hardware-valid,
    but no longer 50% dense; the contract here is exactly 2 per row and column.)
    """
    check_2d(weight, "the transposable 2:4 mask", 4, 4)
    tiles = _tiles(magnitude(weight).clamp(max=_NONFINITE_SCORE))
    patterns = PATTERNS.to(tiles.device)
    order = tiles.argsort(dim=1, descending=True, stable=True)
    keep = torch.zeros_like(tiles, dtype=torch.bool)
    for step in range(16):
        candidate = keep.clone()
        candidate.scatter_(1, order[:, step : step + 1], True)
        completes = ~(candidate[:, None, :] & ~patterns[None]).any(
            -1
        )  # [tiles, 90]: candidate within pattern
        keep = torch.where(completes.any(-1, keepdim=True), candidate, keep)
    return _untile(keep, weight.shape)


# Launch: one program scores a band of 4 rows x BLOCK_TILES tiles, one tile per thread.
BLOCK_TILES = 128
NUM_WARPS = 4

if HAVE_TRITON:

    @triton.constexpr_function
    def _row3_column(i0, j0, i1, j1, i2, j2, k):
        """The k-th (0 or 1) column row 3 must keep so every column keeps 2; -1 if none can."""
        used = (
            (1 << 4 * i0)
            + (1 << 4 * j0)
            + (1 << 4 * i1)
            + (1 << 4 * j1)
            + (1 << 4 * i2)
            + (1 << 4 * j2)
        )
        need = 0x2222 - used  # hex digit c: how many more column c needs; two 1s when feasible
        if need not in (0x0011, 0x0101, 0x1001, 0x0110, 0x1010, 0x1100):
            return -1
        if k == 0:
            return 0 if need & 0xF else (1 if need & 0xF0 else 2)
        return 3 if need & 0xF000 else (2 if need & 0xF00 else 1)

    @triton.constexpr_function
    def _pattern_bits(i0, j0, i1, j1, i2, j2):
        """The pattern's kept positions as bits 4 * row + col (row 3 completes the columns)."""
        i3, j3 = _row3_column(i0, j0, i1, j1, i2, j2, 0), _row3_column(i0, j0, i1, j1, i2, j2, 1)
        rows = (
            (1 << i0) + (1 << j0),
            (1 << i1) + (1 << j1),
            (1 << i2) + (1 << j2),
            (1 << i3) + (1 << j3),
        )
        return rows[0] + (rows[1] << 4) + (rows[2] << 8) + (rows[3] << 12)

    @triton.jit
    def _load_row(ptr, cols, valid, NONFINITE_SCORE: tl.constexpr):
        """One row of BLOCK tiles: 4 consecutive elements per tile (one vector load per thread)."""
        a = tl.minimum(
            magnitude_triton(tl.load(ptr + cols, mask=valid, other=0.0)), NONFINITE_SCORE
        )
        return split4(a)

    @triton.jit
    def _mask_transposable_kernel(
        w_ptr, mask_ptr, n_cols, BLOCK: tl.constexpr, NONFINITE_SCORE: tl.constexpr
    ):
        band = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        cols = tile[:, None] * 4 + tl.arange(0, 4)[None, :]  # [BLOCK, 4]
        valid = cols < n_cols
        w_ptr += band * 4 * n_cols
        r0 = _load_row(w_ptr, cols, valid, NONFINITE_SCORE)
        r1 = _load_row(w_ptr + n_cols, cols, valid, NONFINITE_SCORE)
        r2 = _load_row(w_ptr + 2 * n_cols, cols, valid, NONFINITE_SCORE)
        r3 = _load_row(w_ptr + 3 * n_cols, cols, valid, NONFINITE_SCORE)
        # The 90 patterns in PATTERNS order (row pairs (i, j), i < j, row 0 slowest). A pattern's
        # score is its 8 kept |w| summed in row-major order, as in the reference (adding the
        # reference's zeros is exact), so partial sums of shared prefixes are computed once.
        # A strict > keeps the first maximum: the lowest pattern index wins ties.
        best = tl.full([BLOCK], -1.0, tl.float32)
        bits = tl.zeros([BLOCK], tl.int32)  # kept positions of the best pattern, bit 4 * row + col
        for i0 in tl.static_range(4):
            for j0 in tl.static_range(i0 + 1, 4):
                s0 = r0[i0] + r0[j0]
                for i1 in tl.static_range(4):
                    s1i = s0 + r1[i1]
                    for j1 in tl.static_range(i1 + 1, 4):
                        s1 = s1i + r1[j1]
                        for i2 in tl.static_range(4):
                            s2i = s1 + r2[i2]
                            for j2 in tl.static_range(i2 + 1, 4):
                                s2 = s2i + r2[j2]
                                # row 3 must keep the 2 columns still used once
                                # (constexpr calls inline: an assigned constexpr becomes a tensor)
                                if _row3_column(i0, j0, i1, j1, i2, j2, 0) >= 0:
                                    score = (
                                        s2
                                        + r3[_row3_column(i0, j0, i1, j1, i2, j2, 0)]
                                        + r3[_row3_column(i0, j0, i1, j1, i2, j2, 1)]
                                    )
                                    better = score > best
                                    best = tl.where(better, score, best)
                                    bits = tl.where(
                                        better, _pattern_bits(i0, j0, i1, j1, i2, j2), bits
                                    )
        lane = tl.arange(0, 4)[None, :]
        mask_ptr += band * 4 * n_cols
        for r in tl.static_range(4):
            kept = (bits[:, None] >> (4 * r + lane)) & 1
            tl.store(mask_ptr + r * n_cols + cols, kept.to(tl.int8), mask=valid)


def mask_transposable_triton(weight: torch.Tensor, block: int = BLOCK_TILES) -> torch.Tensor:
    """Triton kernel (GPU, or CPU under TRITON_INTERPRET=1); same result as the reference."""
    w, mask = mask_operands(weight, "the transposable 2:4 mask", 4, 4)
    if w.numel():
        grid = (w.shape[0] // 4, triton.cdiv(w.shape[1] // 4, block))
        _mask_transposable_kernel[grid](
            w,
            mask,
            w.shape[1],
            BLOCK=block,
            NONFINITE_SCORE=_NONFINITE_SCORE,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
    return mask.view(torch.bool)


def compile_specs(dtype: torch.dtype) -> list:
    """The launch above, described for the offline compile report."""
    arguments = "w_ptr:*T/16 mask_ptr:*i8/16 n_cols:i32/16"
    constexprs = {"BLOCK": BLOCK_TILES, "NONFINITE_SCORE": _NONFINITE_SCORE}
    kernel = _mask_transposable_kernel
    return [
        compile_spec(
            "mask_transposable", kernel, dtype, arguments, constexprs, 16 * BLOCK_TILES, NUM_WARPS
        )
    ]
