"""The compact layout's GEMMs: Triton (interpreted on CPU) vs a float64 masked dense matmul."""

import pytest
import torch

from devices import on_triton_device
from megasparse import kernels
from megasparse.kernels import activation_sparsify_reference, compact, gather_matmul

gather_k_matmul_triton = on_triton_device(kernels.gather_k_matmul_triton)
compact_matmul_triton = on_triton_device(kernels.compact_matmul_triton)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# bound on |got - ref| / |ref| from rounding the float32 accumulator to the output dtype (bf16:
# Triton's CPU interpreter truncates instead of rounding to nearest, one ulp)
OUTPUT_RTOL = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 2**-22}


@pytest.fixture
def small_tiles(monkeypatch):
    """16 x 16 tiles and 16-wide K steps, so tiny shapes cover several tiles, several K steps
    and partial tiles (the interpreter is slow); the shipped tiles run in the *_shipped_tiles tests."""
    for key in gather_matmul.CONFIGS:
        monkeypatch.setitem(gather_matmul.CONFIGS, key, gather_matmul.GemmConfig(16, 16, 4, 2))


def _sparse(tokens, width, v, m, n, dtype, seed, hot_from=None):
    """(masked dense a [tokens, width] in float64, a_c in dtype, columns) of relu(x)^2 under
    V:N:M, selected by the reference sparsifier. Columns from `hot_from` on are made large, so
    the selection picks them (the padding of a short last group along tokens)."""
    x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(seed))
    if hot_from is not None:
        x[:, hot_from:] = 4.0 + x[:, hot_from:].abs()
    values, _, columns, _ = activation_sparsify_reference(x.to(dtype), v, m, True, n)
    return values.double(), compact(values, columns, v, m), columns


def _matrix(rows, cols, dtype, layout, seed):
    """A [rows, cols] operand, row-major ("rows") or the transposed view of a row-major [cols,
    rows] tensor ("cols": unit stride down the columns, as W.t())."""
    g = torch.Generator().manual_seed(seed)
    if layout == "rows":
        return torch.randn(rows, cols, generator=g).to(dtype)
    return torch.randn(cols, rows, generator=g).to(dtype).t()


def _assert_matches(got, ref, bound, dtype):
    """|got - ref| <= output rounding of |ref| + float32 accumulation error (relative to
    sum |lhs| |rhs|, the bound of every partial sum)."""
    assert got.dtype == dtype and got.shape == ref.shape
    err = (got.double() - ref).abs()
    allowed = OUTPUT_RTOL[dtype] * ref.abs() + 1e-5 * bound + 1e-30
    assert torch.all(err <= allowed), (err - allowed).max()


def _check_gather_k(v, m, n, tokens, k, width, layout, dtype, hot_from=None):
    groups = -(-k // m)
    dense, a_c, columns = _sparse(tokens, groups * m, v, m, n, dtype, tokens + k, hot_from)
    b = _matrix(k, width, dtype, layout, seed=7)
    got = gather_k_matmul_triton(a_c, columns, b, v, m)
    # rows of b past K are zero: the padded columns of a drop out of the product
    ref = dense[:, :k] @ b.double()
    _assert_matches(got, ref, dense[:, :k].abs() @ b.double().abs(), dtype)


GATHER_CASES = [  # (V, M, N, tokens, K, output columns, b layout)
    (16, 8, 2, 37, 64, 40, "rows"),  # ragged T, 2 K steps, 3 column tiles (last partial)
    (16, 8, 2, 37, 48, 40, "cols"),  # b = W.t(); the last K step partial
    (32, 16, 4, 45, 96, 24, "rows"),  # V:4:M, ragged T
    (16, 16, 2, 16, 32, 16, "cols"),  # one block, one tile
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v,m,n,tokens,k,width,layout", GATHER_CASES)
def test_gather_k_matmul_matches_float64(small_tiles, v, m, n, tokens, k, width, layout, dtype):
    _check_gather_k(v, m, n, tokens, k, width, layout, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_k_matmul_short_last_group_along_tokens(small_tiles, dtype):
    """Along tokens (K = tokens, not a multiple of M): chosen rows past K read as zero, even
    where the selection prefers the padding."""
    _check_gather_k(16, 8, 4, 20, 43, 24, "rows", dtype, hot_from=43)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("v,m", [(64, 8), (128, 16)])
@pytest.mark.parametrize("layout", ["rows", "cols"])  # cols: the register-staged launch
def test_gather_k_matmul_shipped_tiles(v, m, layout, dtype):
    _check_gather_k(v, m, 2, v + 5, 2 * m + 64, 40, layout, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v,m", [(64, 16), (128, 8)])
def test_compact_gemms_on_the_gpu_at_the_shipped_tiles_and_layouts(v, m, dtype):
    """Both GEMMs on CUDA with the shipped tiles, ragged T, several K steps and column tiles, in
    the layouts the layer runs (gather_k on row-major b, compact_matmul on b = (W^T).t())."""
    _check_gather_k(v, m, 2, 3 * v + 17, 16 * m + 64, 600, "rows", dtype)
    _check_gather_k(v, m, 4, 3 * v + 17, 16 * m + 64, 600, "rows", dtype)
    _check_compact(v, m, 2, 3 * v + 17, 320, 32 * m, "cols", dtype)


def _check_compact(v, m, n, tokens, k, ffn, layout, dtype):
    _, _, columns = _sparse(tokens, ffn, v, m, n, dtype, seed=tokens + ffn)
    g = _matrix(tokens, k, dtype, "rows", seed=3)
    b = _matrix(k, ffn, dtype, layout, seed=5)
    got = compact_matmul_triton(g, b, columns, v, m)
    ref = compact(g.double() @ b.double(), columns, v, m)
    _assert_matches(got, ref, compact(g.double().abs() @ b.double().abs(), columns, v, m), dtype)


COMPACT_CASES = [  # (V, M, N, tokens, K, ffn, b layout)
    (16, 8, 2, 37, 40, 80, "rows"),  # ragged T, 3 K steps (last partial), 40 compact columns
    (16, 8, 2, 37, 32, 64, "cols"),  # b = W.t()
    (32, 16, 4, 45, 16, 128, "rows"),  # V:4:M, one K step
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v,m,n,tokens,k,ffn,layout", COMPACT_CASES)
def test_compact_matmul_matches_float64(small_tiles, v, m, n, tokens, k, ffn, layout, dtype):
    _check_compact(v, m, n, tokens, k, ffn, layout, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("v,m", [(64, 8), (128, 16)])
def test_compact_matmul_shipped_tiles(v, m, dtype):
    _check_compact(v, m, 2, v + 5, 80, 4 * m, "cols", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_tokens(dtype):
    _, a_c, columns = _sparse(0, 32, 16, 8, 2, dtype, seed=0)
    assert a_c.shape == (0, 16) and columns.shape == (0, 4, 4)
    b = _matrix(32, 24, dtype, "rows", seed=1)
    assert gather_k_matmul_triton(a_c, columns, b, 16, 8).shape == (0, 24)
    g = _matrix(0, 24, dtype, "rows", seed=2)
    assert compact_matmul_triton(g, b.t(), columns, 16, 8).shape == (0, 16)


def test_gather_k_matmul_writes_a_strided_out(small_tiles):
    dense, a_c, columns = _sparse(21, 32, 16, 8, 2, torch.float32, seed=4)
    b = _matrix(32, 24, torch.float32, "rows", seed=1)
    out = torch.full((24, 21), float("nan")).t()  # written through its transposed strides
    got = on_triton_device(kernels.gather_k_matmul_triton)(a_c, columns, b, 16, 8, out=out)
    ref = dense @ b.double()
    _assert_matches(got, ref, dense.abs() @ b.double().abs(), torch.float32)


def test_bad_inputs_name_the_problem():
    _, a_c, columns = _sparse(20, 32, 16, 8, 2, torch.bfloat16, seed=0)
    b = _matrix(32, 16, torch.bfloat16, "rows", seed=1)
    with pytest.raises(ValueError, match=r"V in \(16, 32, 64, 128\).*reference"):
        kernels.gather_k_matmul_triton(a_c, columns, b, 8, 8)
    with pytest.raises(ValueError, match="one dtype"):
        kernels.gather_k_matmul_triton(a_c, columns, b.float(), 16, 8)
    with pytest.raises(ValueError, match="row blocks"):
        kernels.gather_k_matmul_triton(a_c, columns, b, 32, 8)
    with pytest.raises(ValueError, match="ceil\\(K/M\\)"):
        kernels.gather_k_matmul_triton(a_c, columns, b[:24], 16, 8)
    with pytest.raises(ValueError, match="F = M \\* groups"):
        kernels.compact_matmul_triton(a_c[:, :8], b[:8, :8], columns, 16, 8)
    with pytest.raises(ValueError, match="out must be"):
        kernels.gather_k_matmul_triton(a_c, columns, b, 16, 8, out=torch.empty(20, 15))
    with pytest.raises(ValueError, match="out must be"):
        kernels.gather_k_matmul_triton(a_c, columns, b, 16, 8, out=torch.empty(20, 16).double())


def test_float32_out_keeps_the_accumulator(small_tiles):
    """bf16 operands into a float32 `out` (main_grad's both-ways weight gradient): the result is
    the fp32 accumulation, far closer to float64 than one bf16 rounding allows."""
    dense, a_c, columns = _sparse(37, 64, 16, 8, 4, torch.bfloat16, seed=3)
    b = _matrix(64, 24, torch.bfloat16, "rows", seed=4)
    out = torch.empty(37, 24)
    got = gather_k_matmul_triton(a_c, columns, b, 16, 8, out=out)
    ref = dense @ b.double()
    assert got is out
    err = (got.double() - ref).abs()
    assert torch.all(err <= 1e-5 * (dense.abs() @ b.double().abs()) + 1e-30), err.max()
    assert err.max() < 2**-14 * ref.abs().max()  # a bf16 output (8-bit mantissa) is not this close
