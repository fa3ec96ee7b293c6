"""Mask kernels: the Triton source (interpreted on CPU) against its torch reference, and the numerics."""

import pytest
import torch

from devices import on_triton_device
from megasparse import kernels
from megasparse.kernels import (
    N_PATTERNS,
    PATTERNS,
    mask_1d_reference,
    mask_transposable_greedy,
    mask_transposable_reference,
)
from reference import brute_force_transposable

mask_1d_triton = on_triton_device(kernels.mask_1d_triton)
mask_transposable_triton = on_triton_device(kernels.mask_transposable_triton)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    # Plant ties and repeated values: the deterministic tie rule must hold on them too.
    if shape[0] >= 2 and shape[1] >= 8:
        w[0, :8] = torch.tensor([1.0, -1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
        w[1, :4] = torch.tensor([0.5, 2.0, -0.5, 0.5])
    return w.to(dtype)


def _tiles(m):
    r, c = m.shape
    return m.reshape(r // 4, 4, c // 4, 4).permute(0, 2, 1, 3).reshape(-1, 4, 4)


def test_pattern_table_is_all_90_transposable_patterns():
    assert N_PATTERNS == 90 and len({tuple(p.tolist()) for p in PATTERNS}) == 90
    tiles = PATTERNS.reshape(-1, 4, 4)
    assert (tiles.sum(1) == 2).all() and (tiles.sum(2) == 2).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 16), (36, 64), (3, 4)])
def test_mask_1d_triton_matches_reference(shape, dtype):
    w = _weight(shape, dtype, seed=shape[0])
    assert torch.equal(mask_1d_triton(w), mask_1d_reference(w))


def test_mask_1d_keeps_two_largest_with_lower_index_on_ties():
    w = _weight((8, 16), torch.float32)
    m = mask_1d_reference(w)
    assert (m.reshape(-1, 4).sum(1) == 2).all()
    assert m[0, :4].tolist() == [True, True, False, False]  # four equal magnitudes
    assert m[0, 4:8].tolist() == [True, True, False, False]  # four zeros
    assert m[1, :4].tolist() == [True, True, False, False]  # 2.0 and the first 0.5 (lower index)
    # Against an independent rule: kept values are never smaller than dropped ones in a group.
    a = w.abs().reshape(-1, 4)
    mg = m.reshape(-1, 4)
    kept_min = torch.where(mg, a, float("inf")).min(1).values
    dropped_max = torch.where(~mg, a, -1.0).max(1).values
    assert (kept_min >= dropped_max).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 16), (32, 64), (4, 4)])
def test_mask_transposable_triton_matches_reference(shape, dtype):
    w = _weight(shape, dtype, seed=7 + shape[1])
    assert torch.equal(mask_transposable_triton(w), mask_transposable_reference(w))


def test_mask_transposable_is_2_4_both_ways_and_optimal():
    w = _weight((16, 32), torch.float32, seed=3)
    m = mask_transposable_reference(w)
    assert (m.reshape(-1, 4).sum(1) == 2).all() and (m.t().reshape(-1, 4).sum(1) == 2).all()
    tiles_abs = _tiles(w.abs().double())
    kept = (tiles_abs * _tiles(m)).sum((1, 2))
    for t in range(tiles_abs.shape[0]):
        assert kept[t].item() == pytest.approx(brute_force_transposable(tiles_abs[t]), rel=1e-6)


def test_transposable_optimum_beats_greedy_on_every_tile():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(11))
    opt, greedy = mask_transposable_reference(w), mask_transposable_greedy(w)
    g = _tiles(greedy)
    assert (g.sum(1) == 2).all() and (g.sum(2) == 2).all()
    a = _tiles(w.abs().double())
    kept_opt, kept_greedy = (a * _tiles(opt)).sum((1, 2)), (a * g).sum((1, 2))
    assert (kept_opt >= kept_greedy - 1e-9).all()
    assert (kept_opt > kept_greedy + 1e-9).any()  # the exact search does win somewhere
    kept_1d = (w.abs() * mask_1d_reference(w)).sum()
    assert kept_1d >= kept_opt.sum()  # 1d is the looser constraint


@pytest.mark.parametrize(
    "kernel",
    [mask_1d_reference, mask_1d_triton, mask_transposable_reference, mask_transposable_triton],
)
def test_nonfinite_weights_are_kept_and_mask_stays_2_4(kernel):
    w = _weight((8, 16), torch.float32)
    w[2, 1], w[3, 2], w[5, 5] = float("nan"), float("inf"), float("-inf")
    m = kernel(w)
    assert m[2, 1] and m[3, 2] and m[5, 5]
    assert (m.reshape(-1, 4).sum(1) == 2).all()


@pytest.mark.parametrize(
    "kernel,shape",
    [
        (mask_1d_reference, (4, 6)),
        (mask_1d_triton, (4, 6)),
        (mask_transposable_reference, (6, 8)),
        (mask_transposable_triton, (8, 6)),
        (mask_1d_reference, (16,)),
    ],
)
def test_bad_shapes_raise_clear_errors(kernel, shape):
    with pytest.raises(ValueError, match="megasparse: .*(multiple of|2-D weight)"):
        kernel(torch.randn(shape))


def test_mask_report_orders_the_masks():
    from megasparse.tools.mask_report import report

    r = report(128, seed=5)
    kept = r["kept"]
    assert kept["1d"] > kept["transposable (exact)"] > kept["transposable (greedy)"] > 0.5
    assert r["greedy_beats_exact_tiles"] == 0.0 < r["exact_beats_greedy_tiles"]


def test_mask_transposable_triton_finds_every_one_of_the_90_patterns():
    """Tile p holds pattern p as 1s on 0s: pattern p is the unique optimum, so the kernel's
    unrolled pattern enumeration must reproduce PATTERNS in order and position."""
    w = torch.cat([PATTERNS[p].reshape(4, 4).float() for p in range(N_PATTERNS)], 1)
    assert torch.equal(mask_transposable_triton(w), w.bool())


@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_transposable_triton_ties_and_nonfinite_match_reference(dtype):
    g = torch.Generator().manual_seed(4)
    w = torch.randint(-2, 3, (8, 1040), generator=g).float()  # many equal scores: tie rule decides
    w[0, :4] = float("nan")
    w[1, :4] = float("inf")
    w[4, 9], w[6, 30] = float("-inf"), float("nan")
    w = w.to(dtype)
    assert torch.equal(mask_transposable_triton(w), mask_transposable_reference(w))
    assert torch.equal(
        mask_transposable_triton(torch.zeros(4, 8, dtype=dtype)),
        mask_transposable_reference(torch.zeros(4, 8, dtype=dtype)),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 1000), (1, 2052)])  # several programs, ragged last one
def test_mask_1d_triton_matches_reference_with_ties_and_nonfinite(shape, dtype):
    g = torch.Generator().manual_seed(2)
    w = torch.randint(-2, 3, shape, generator=g).float()
    flat = w.view(-1)
    flat[5], flat[10], flat[11], flat[-1] = float("nan"), float("inf"), float("-inf"), float("nan")
    w = w.to(dtype)
    assert torch.equal(mask_1d_triton(w), mask_1d_reference(w))


@pytest.mark.parametrize("kernel", [mask_1d_reference, mask_1d_triton])
def test_mask_1d_ranks_nan_as_inf_with_ties_to_the_lower_index(kernel):
    """NaN, +Inf and -Inf tie (all rank as +inf), above the largest finite float32."""
    nan, inf, big = float("nan"), float("inf"), torch.finfo(torch.float32).max
    w = torch.tensor(
        [
            [inf, inf, nan, 0.0],
            [big, nan, -inf, 1.0],
            [nan, big, inf, 2.0],
            [1.0, nan, nan, nan],
        ]
    )
    expected = torch.tensor(
        [[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.bool
    )
    assert torch.equal(kernel(w), expected)
