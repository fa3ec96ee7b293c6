"""V:N:M selection into the compact layout, along ffn (fused Squared-ReLU) and along tokens, and the
Squared-ReLU backward on the compact form: Triton (interpreted on CPU) vs torch reference bit for
bit, and the reference vs an independent float64 loop (float64 autograd for the backward)."""

import math

import pytest
import torch

from devices import on_triton_device
from megasparse import kernels
from megasparse.kernels import (
    activation_compact_reference,
    activation_sparsify_reference,
    compact_tokens_reference,
    scatter,
)

activation_compact_triton = on_triton_device(kernels.activation_compact_triton)
compact_tokens_triton = on_triton_device(kernels.compact_tokens_triton)
compact_backward_triton = on_triton_device(kernels.squared_relu_compact_backward_triton)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
NAN, INF = float("nan"), float("inf")


def _quarters(tokens, ffn, dtype, seed):
    """Quarter-integers in [-4, 4]: many ties, and squares exact in bf16 (so values compare bit for
    bit even where the CPU interpreter truncates fp32 -> bf16 instead of rounding), with -0.0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-16, 17, (tokens, ffn), generator=g) / 4
    x[x == 0.25] = -0.0
    return x.to(dtype)


def _gaussian(tokens, ffn, dtype, seed):
    return torch.randn(tokens, ffn, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _nonfinite(tokens, ffn, dtype, seed):
    """NaN/+Inf/-Inf alone, side by side, filling a group of 8, filling a column, more than 4 in a
    group, and in the last (ragged) row."""
    x = _quarters(tokens, ffn, torch.float32, seed)
    x[0, 1] = NAN
    x[1, 4:8] = torch.tensor([2.0, INF, NAN, 1.0])
    x[2, 8:16] = NAN
    x[:, 17] = NAN
    x[3, 24:32] = torch.tensor([NAN, INF, -INF, NAN, INF, 1.0, NAN, 2.0])
    x[-1, -1], x[-1, -2] = -INF, NAN
    return x.to(dtype)


def _same_bits(a, b) -> bool:
    """Bit for bit, except NaN payloads (a GPU returns its canonical NaN)."""
    nan = a.isnan()
    if a.shape != b.shape or not torch.equal(nan, b.isnan()):
        return False
    a, b = a.masked_fill(nan, 0), b.masked_fill(nan, 0)
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(ints), b.view(ints))


def _rank(value: float) -> float:
    """The NaN rule: |value|, NaN ranked as +inf."""
    return math.inf if math.isnan(value) else abs(value)


def _loop_vnm(a, v, n, m):
    """Independent V:N:M of a [rows, cols] (float64, python sorting): the bool mask and columns."""
    rows, cols = a.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    columns = []
    for r0 in range(0, rows, v):
        block = a[r0 : r0 + v]
        per_group = []
        for c0 in range(0, cols, m):
            norms = [_rank(sum(float(e) ** 2 for e in block[:, c0 + c])) for c in range(m)]
            chosen = sorted(sorted(range(m), key=lambda c: (-norms[c], c))[:4])
            per_group.append(chosen)
            for r in range(block.shape[0]):
                kept = sorted(chosen, key=lambda c: (-_rank(float(block[r, c0 + c])), c))[:n]
                for c in kept:
                    mask[r0 + r, c0 + c] = True
        columns.append(per_group)
    return mask, torch.tensor(columns, dtype=torch.int16).reshape(-(-rows // v), cols // m, 4)


CASES = [  # (V, N, M, tokens, ffn)
    (16, 2, 8, 37, 32),  # ragged last block of 5 rows
    (16, 4, 16, 16, 64),  # exact block, N = 4
    (64, 2, 32, 9, 64),  # one block shorter than V
    (64, 4, 8, 0, 32),  # no tokens
]


@pytest.mark.parametrize("squared_relu", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v,n,m,tokens,ffn", CASES)
def test_activation_compact_kernel_matches_reference_bit_for_bit(
    v, n, m, tokens, ffn, dtype, squared_relu
):
    x = _quarters(tokens, ffn, dtype, seed=tokens + m)
    got = activation_compact_triton(x, v, n, m, squared_relu)
    ref = activation_compact_reference(x, v, n, m, squared_relu)
    assert all(_same_bits(g, r) for g, r in zip(got[:2], ref[:2]))  # values_c, preact_c
    assert torch.equal(got[2], ref[2])  # columns
    assert got[0].shape == (tokens, ffn // m * 4) and got[0].dtype == dtype
    torch.testing.assert_close(got[3], ref[3], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v,n,m,tokens,ffn", [(16, 2, 8, 21, 1056), (64, 4, 16, 70, 32)])
def test_activation_compact_kernel_on_gaussian_inputs_and_several_programs(
    v, n, m, tokens, ffn, dtype
):
    """Random inputs, two programs along ffn (the second partial) or along tokens, tied rows."""
    x = _gaussian(tokens, ffn, dtype, seed=ffn)
    x[3] = x[2]
    got = activation_compact_triton(x, v, n, m, True)
    ref = activation_compact_reference(x, v, n, m, True)
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])  # preact_c, columns
    if dtype != torch.bfloat16 or torch.cuda.is_available():
        assert torch.equal(got[0], ref[0])
    else:  # the CPU interpreter truncates fp32 -> bf16 where the GPU (and torch) round to nearest
        assert torch.equal(got[0] != 0, ref[0] != 0)
        torch.testing.assert_close(got[0], ref[0], rtol=2**-7, atol=0)
    torch.testing.assert_close(got[3], ref[3], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("squared_relu", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v,n,m,tokens", [(16, 2, 8, 21), (16, 4, 16, 13)])
def test_activation_compact_nonfinite_follows_the_nan_rule(v, n, m, tokens, dtype, squared_relu):
    x = _nonfinite(tokens, 32, dtype, seed=v + n)
    got = activation_compact_triton(x, v, n, m, squared_relu)
    ref = activation_compact_reference(x, v, n, m, squared_relu)
    assert all(_same_bits(g, r) for g, r in zip(got[:2], ref[:2]))
    assert torch.equal(got[2], ref[2])
    torch.testing.assert_close(got[3], ref[3], rtol=1e-5, atol=1e-3, equal_nan=True)
    a = torch.relu(x.double()).square() if squared_relu else x.double()
    mask, columns = _loop_vnm(a, v, n, m)
    assert torch.equal(ref[2], columns)
    assert _same_bits(scatter(ref[0], columns, v, m, 32), torch.where(mask, a, 0.0).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "v,n,m,tokens,ffn", [(16, 2, 8, 21, 32), (16, 4, 16, 19, 32), (4, 2, 32, 6, 64)]
)
def test_activation_compact_reference_against_float64_loop_and_dense_mask(
    v, n, m, tokens, ffn, dtype
):
    x = _gaussian(tokens, ffn, dtype, seed=7)
    values_c, preact_c, columns, stats = activation_compact_reference(x, v, n, m, True)
    a = torch.relu(x.double()).square()
    mask, loop_columns = _loop_vnm(a, v, n, m)
    assert torch.equal(columns, loop_columns)
    # the dense pattern of activation_sparsify, compacted: scattering gives it back
    values, dense_mask, dense_columns, dense_stats = activation_sparsify_reference(x, v, m, True, n)
    assert torch.equal(dense_mask, mask) and torch.equal(dense_columns, columns)
    assert torch.equal(scatter(values_c, columns, v, m, ffn), values)
    assert torch.equal(values, torch.where(mask, a, 0.0).to(dtype))
    assert torch.equal(scatter(preact_c, columns, v, m, ffn), torch.where(mask, x, 0))
    assert (mask.reshape(tokens, ffn // m, m).sum(-1) == n).all()  # density N/M
    assert torch.equal(stats, dense_stats)
    torch.testing.assert_close(stats[2], (a * ~mask).sum(), rtol=1e-6, atol=0)


def _loop_tokens(x, v, n, m):
    """Independent V:N:M along tokens: x^T padded with zero tokens to whole groups of M."""
    tokens, features = x.shape
    padded = torch.zeros(features, -(-tokens // m) * m, dtype=torch.float64)
    padded[:, :tokens] = x.double().t()
    mask, columns = _loop_vnm(padded, v, n, m)
    return torch.where(mask, padded, 0.0), columns


TOKEN_CASES = [  # (V, N, M, tokens, features)
    (16, 4, 8, 19, 20),  # last group of 3 tokens (one padding token chosen), ragged neurons
    (16, 2, 16, 33, 32),  # last group of 1 token
    (64, 4, 32, 40, 8),  # one neuron block shorter than V
    (16, 4, 8, 0, 16),  # no tokens
]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("v,n,m,tokens,features", TOKEN_CASES)
def test_compact_tokens_kernel_matches_reference_and_float64_loop(v, n, m, tokens, features, dtype):
    x = _gaussian(tokens, features, dtype, seed=tokens)
    if tokens > 4:
        x[:, 1] = -0.0
        x[:, 4] = x[:, 3]  # tied token norms
    got = compact_tokens_triton(x, v, n, m)
    ref = compact_tokens_reference(x, v, n, m)
    groups = -(-tokens // m)
    assert ref[0].shape == (features, 4 * groups) and ref[0].dtype == dtype
    assert ref[1].shape == (-(-features // v), groups, 4)
    assert _same_bits(got[0], ref[0]) and torch.equal(got[1], ref[1])
    expected, columns = _loop_tokens(x, v, n, m)
    assert torch.equal(ref[1], columns)
    assert torch.equal(scatter(ref[0], columns, v, m, groups * m).double(), expected)
    # tokens past T are chosen only in a group of fewer than 4 real tokens
    real = (tokens - torch.arange(groups) * m).clamp(max=m)
    chosen_padding = (columns.long() + torch.arange(groups)[:, None] * m >= tokens).sum(-1)
    assert torch.equal(chosen_padding, (4 - real).clamp(min=0).expand_as(chosen_padding))


def test_compact_tokens_kernel_reads_strided_rows_in_place():
    """x as a column slice of a wider tensor (row stride != F) is read without a copy."""
    wide = _nonfinite(21, 64, torch.float32, seed=3)
    x = wide[:, 24:40]
    got = compact_tokens_triton(x, 8, 2, 8)
    ref = compact_tokens_reference(x, 8, 2, 8)
    assert _same_bits(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize(
    "v,n,m,ffn,match",
    [(64, 2, 4, 16, "M >= 8"), (64, 3, 8, 16, "powers of two"), (64, 2, 8, 12, "multiple of 8")],
)
def test_bad_patterns_name_the_problem(v, n, m, ffn, match):
    x = torch.randn(4, ffn)
    for fn in (activation_compact_reference, kernels.activation_compact_triton):
        with pytest.raises(ValueError, match=match):
            fn(x, v, n, m, True)
    if match != "multiple of 8":  # along tokens, F is the block dimension and may be ragged
        for fn in (compact_tokens_reference, kernels.compact_tokens_triton):
            with pytest.raises(ValueError, match=match):
                fn(x, v, n, m)
    for fn in (compact_tokens_reference, kernels.compact_tokens_triton):
        with pytest.raises(ValueError, match="2-D"):
            fn(torch.zeros(4), 16, 4, 8)


# --- Squared-ReLU backward on the compact form: dH_c = where(H_c != 0, 2 relu(H_c) dA_c, 0) ------


def _dropped_like_compact(preact_c, seed):
    """preact_c with the zeros a compact activation holds where N = 2 dropped (and a -0.0)."""
    g = torch.Generator().manual_seed(seed)
    preact_c = preact_c.clone()
    preact_c[torch.rand(preact_c.shape, generator=g) < 0.3] = 0.0
    preact_c.view(-1)[1:2] = -0.0
    return preact_c


def _float64_autograd(preact_c, grad_c):
    """Independent: the gradient of sum(relu(h)^2 * (h != 0) * dA) in float64."""
    h = preact_c.double().requires_grad_(True)
    (torch.relu(h).square() * (preact_c != 0)).backward(grad_c.double())
    return h.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,width", [(37, 60), (5, 12), (0, 60)])
def test_compact_backward_kernel_bit_for_bit_on_exact_inputs(tokens, width, dtype):
    """Quarter-integers: 2 relu(h) dA is exact in bf16, so even the CPU interpreter's fp32 -> bf16
    conversion (truncating) gives the reference's bits. Ragged sizes, two programs, T = 0."""
    preact_c = _dropped_like_compact(_quarters(tokens, width, dtype, seed=width), seed=tokens)
    grad_c = _quarters(tokens, width, dtype, seed=tokens + 1)
    got = compact_backward_triton(preact_c, grad_c)
    ref = kernels.squared_relu_compact_backward_reference(preact_c, grad_c)
    assert got.dtype == dtype and got.shape == (tokens, width)
    assert _same_bits(got, ref)
    assert torch.equal(ref.double(), _float64_autograd(preact_c, grad_c))  # exact here
    assert (ref[preact_c == 0] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_compact_backward_kernel_on_gaussian_inputs(dtype):
    """Rounded products: bit for bit in fp16/fp32/fp64 (and bf16 on a GPU); the reference within
    one rounding of float64 autograd."""
    preact_c = _dropped_like_compact(_gaussian(37, 60, dtype, seed=3), seed=4)
    grad_c = _gaussian(37, 60, dtype, seed=5)
    got = compact_backward_triton(preact_c, grad_c)
    ref = kernels.squared_relu_compact_backward_reference(preact_c, grad_c)
    if dtype != torch.bfloat16 or torch.cuda.is_available():
        assert _same_bits(got, ref)
    else:  # the CPU interpreter truncates fp32 -> bf16 where the GPU (and torch) round to nearest
        torch.testing.assert_close(got, ref, rtol=2**-7, atol=0)
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).tiny  # subnormal products round absolutely
    torch.testing.assert_close(
        ref.double(), _float64_autograd(preact_c, grad_c), rtol=eps, atol=tiny
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_compact_backward_kernel_nonfinite_and_overflow(dtype):
    """NaN in H_c stays NaN, +Inf gives +-Inf, -Inf gives 0 (relu), 0 and -0.0 give 0 even against
    an infinite dA; an overflowing product rounds to Inf in dA's dtype."""
    big = torch.finfo(dtype).max
    preact_c = torch.tensor([[NAN, INF, -INF, 0.0, -0.0, 2.0, -1.0, NAN, INF, big]], dtype=dtype)
    grad_c = torch.tensor([[1.0, -2.0, 3.0, INF, NAN, 4.0, -3.0, 0.0, 0.0, 1.0]], dtype=dtype)
    expected = torch.tensor([[NAN, -INF, 0.0, 0.0, 0.0, 16.0, -0.0, NAN, NAN, INF]], dtype=dtype)
    for fn in (compact_backward_triton, kernels.squared_relu_compact_backward_reference):
        assert _same_bits(fn(preact_c, grad_c), expected), fn


def test_compact_backward_bad_shapes_name_the_problem():
    for fn in (kernels.squared_relu_compact_backward_reference, compact_backward_triton):
        with pytest.raises(ValueError, match="one shape"):
            fn(torch.zeros(4, 8), torch.zeros(4, 12))
