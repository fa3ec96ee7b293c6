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

from .common import HAVE_TRITON, check_2d, magnitude, require_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .common import magnitude_triton


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
_PATTERN_SLOTS = 128  # the kernel scores a power-of-two number of slots; slots >= 90 never win
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
    score = torch.zeros(tiles.shape[0], N_PATTERNS, dtype=torch.float32, device=tiles.device)
    for k in range(16):  # fixed order, shared with the kernel, so float sums match exactly
        score = score + torch.where(patterns[:, k], tiles[:, k : k + 1], 0.0)
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
        completes = ~(candidate[:, None, :] & ~patterns[None]).any(-1)  # [tiles, 90]: candidate within pattern
        keep = torch.where(completes.any(-1, keepdim=True), candidate, keep)
    return _untile(keep, weight.shape)


if HAVE_TRITON:

    @triton.jit
    def _mask_transposable_kernel(
        w_ptr, mask_ptr, patterns_ptr, n_cols, n_tiles, N_PATTERNS: tl.constexpr, SLOTS: tl.constexpr, NONFINITE_SCORE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        tiles = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        valid = tiles < n_tiles
        tiles_per_row = n_cols // 4
        row0 = (tiles // tiles_per_row).to(tl.int64) * 4
        col0 = (tiles % tiles_per_row).to(tl.int64) * 4
        slot = tl.arange(0, SLOTS)
        score = tl.zeros([BLOCK, SLOTS], dtype=tl.float32)
        for k in tl.static_range(16):
            w = tl.load(w_ptr + (row0 + k // 4) * n_cols + col0 + k % 4, mask=valid, other=0.0)
            a = tl.minimum(magnitude_triton(w), NONFINITE_SCORE)
            kept = tl.load(patterns_ptr + k * SLOTS + slot)  # [SLOTS] int8, pattern-major column k
            score = score + tl.where(kept[None, :] != 0, a[:, None], 0.0)
        score = tl.where(slot[None, :] < N_PATTERNS, score, -1.0)
        best = tl.argmax(score, axis=1, tie_break_left=True)
        for k in tl.static_range(16):
            kept = tl.load(patterns_ptr + k * SLOTS + best, mask=valid, other=0)
            tl.store(mask_ptr + (row0 + k // 4) * n_cols + col0 + k % 4, kept, mask=valid)


_pattern_table_cache = {}


def _pattern_table(device) -> torch.Tensor:
    """[16, SLOTS] int8: column p is pattern p; padding slots are all zero."""
    key = str(device)
    if key not in _pattern_table_cache:
        table = torch.zeros(16, _PATTERN_SLOTS, dtype=torch.int8)
        table[:, :N_PATTERNS] = PATTERNS.t().to(torch.int8)
        _pattern_table_cache[key] = table.to(device)
    return _pattern_table_cache[key]


def mask_transposable_triton(weight: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Triton kernel (GPU, or CPU under TRITON_INTERPRET=1); same result as the reference."""
    require_triton()
    check_2d(weight, "the transposable 2:4 mask", 4, 4)
    w = weight.detach().contiguous()
    mask = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    n_tiles = w.numel() // 16
    _mask_transposable_kernel[(triton.cdiv(n_tiles, block),)](
        w, mask, _pattern_table(w.device), w.shape[1], n_tiles,
        N_PATTERNS=N_PATTERNS, SLOTS=_PATTERN_SLOTS, NONFINITE_SCORE=_NONFINITE_SCORE, BLOCK=block,
    )
    return mask.view(torch.bool)
