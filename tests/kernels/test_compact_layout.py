"""The compact layout's data movement: compact_triton / scatter_triton (interpreted on CPU) vs the
torch references vs an independent loop, bit for bit."""

import pytest
import torch

from devices import on_triton_device
from megasparse import kernels
from megasparse.kernels import compact, scatter

compact_triton = on_triton_device(kernels.compact_triton)
scatter_triton = on_triton_device(kernels.scatter_triton)

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
CASES = [  # (V, M, tokens, ffn)
    (16, 8, 37, 64),  # ragged last block of 5 rows
    (16, 8, 21, 1040),  # 130 groups: two programs along ffn, the second partial
    (64, 16, 64, 48),  # exact blocks
    (64, 32, 5, 64),  # one block shorter than V
    (16, 32, 0, 64),  # no tokens
]


def _columns(tokens, ffn, v, m, seed):
    """Random ascending choices of 4 of M per block and group (the selection's output format)."""
    g = torch.Generator().manual_seed(seed)
    blocks, groups = -(-tokens // v), ffn // m
    scores = torch.rand(blocks, groups, m, generator=g)
    return scores.topk(4, dim=-1).indices.sort(dim=-1).values.to(torch.int16)


def _dense(tokens, ffn, dtype, seed):
    """Gaussian values with NaN, +-Inf and -0.0 in the first rows (moved bit for bit)."""
    x = torch.randn(tokens, ffn, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if tokens >= 2:
        x[0, :8] = torch.tensor([float("nan"), -0.0, float("inf"), float("-inf"), -0.0, 0.0, 1, 2])
        x[1] = -0.0
    return x.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _loop_compact(dense, columns, v, m):
    """Independent compact: one element at a time, from the definition."""
    tokens, ffn = dense.shape
    out = dense.new_zeros(tokens, ffn // m * 4)
    for t in range(tokens):
        for g in range(ffn // m):
            for j in range(4):
                out[t, 4 * g + j] = dense[t, g * m + int(columns[t // v, g, j])]
    return out


def _chosen_mask(columns, v, m, tokens, ffn):
    """Bool [tokens, ffn]: the chosen columns of each row's block, built by a loop."""
    mask = torch.zeros(tokens, ffn, dtype=torch.bool)
    for t in range(tokens):
        for g in range(ffn // m):
            for j in range(4):
                mask[t, g * m + int(columns[t // v, g, j])] = True
    return mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v,m,tokens,ffn", CASES)
def test_compact_and_scatter_kernels_match_references_bit_for_bit(v, m, tokens, ffn, dtype):
    columns = _columns(tokens, ffn, v, m, seed=v + m + tokens)
    dense = _dense(tokens, ffn, dtype, seed=tokens)
    values_c = compact(dense, columns, v, m)
    got_c = compact_triton(dense, columns, v, m)
    assert got_c.shape == (tokens, ffn // m * 4) and got_c.dtype == dtype
    assert torch.equal(_bits(got_c), _bits(values_c))  # NaN payloads and -0.0 included
    got_dense = scatter_triton(values_c, columns, v, m, ffn)
    assert got_dense.shape == (tokens, ffn) and got_dense.dtype == dtype
    assert torch.equal(_bits(got_dense), _bits(scatter(values_c, columns, v, m, ffn)))


@pytest.mark.parametrize("v,m,tokens,ffn", [(16, 8, 21, 32), (4, 16, 9, 48), (8, 32, 0, 32)])
def test_references_match_an_independent_loop(v, m, tokens, ffn):
    columns = _columns(tokens, ffn, v, m, seed=5)
    dense = _dense(tokens, ffn, torch.float64, seed=6)
    values_c = compact(dense, columns, v, m)
    assert torch.equal(_bits(values_c), _bits(_loop_compact(dense, columns, v, m)))
    mask = _chosen_mask(columns, v, m, tokens, ffn)
    expected = torch.where(mask, dense, torch.zeros_like(dense))
    assert torch.equal(_bits(scatter(values_c, columns, v, m, ffn)), _bits(expected))
    assert (mask.reshape(tokens, ffn // m, m).sum(-1) == 4).all()  # 4 columns per group and row


def test_kernels_read_strided_rows_in_place():
    """A row slice of a wider tensor (row stride != F) and a compact view are read as they are."""
    v, m, tokens, ffn = 16, 8, 19, 32
    columns = _columns(tokens, ffn, v, m, seed=1)
    wide = _dense(tokens, 2 * ffn, torch.float32, seed=2)
    dense = wide[:, ffn:]
    assert torch.equal(compact_triton(dense, columns, v, m), compact(dense, columns, v, m))
    wide_c = torch.randn(tokens, ffn, generator=torch.Generator().manual_seed(3))
    values_c = wide_c[:, : ffn // 2]
    got = scatter_triton(values_c, columns, v, m, ffn)
    assert torch.equal(got, scatter(values_c, columns, v, m, ffn))


@pytest.mark.parametrize(
    "shape,dtype,v,m,match",
    [
        ((2, 8, 4), torch.int16, 16, 8, "columns"),  # one block too many
        ((1, 8, 4), torch.int64, 16, 8, "int16"),
        ((1, 8, 4), torch.int16, 16, 6, "powers of two"),
        ((1, 8, 4), torch.int16, 12, 8, "powers of two"),
    ],
)
def test_bad_layouts_name_the_problem(shape, dtype, v, m, match):
    columns = torch.zeros(shape, dtype=dtype)
    dense = torch.zeros(10, 64)
    values_c = torch.zeros(10, 32)
    for fn in (compact, kernels.compact_triton):
        with pytest.raises(ValueError, match=match):
            fn(dense, columns, v, m)
    for fn in (scatter, kernels.scatter_triton):
        with pytest.raises(ValueError, match=match):
            fn(values_c, columns, v, m, 64)
    with pytest.raises(ValueError, match="values_c"):
        kernels.scatter_triton(
            torch.zeros(10, 16), torch.zeros(1, 8, 4, dtype=torch.int16), 16, 8, 64
        )
