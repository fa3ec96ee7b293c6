"""Activation sparsifier kernel: Triton (interpreted on CPU) vs torch reference vs an independent loop."""

import math

import pytest
import torch

from devices import on_triton_device
from megasparse import kernels
from megasparse.kernels import activation_sparsify_reference, mask_1d_reference

activation_sparsify_triton = on_triton_device(kernels.activation_sparsify_triton)

CASES = [  # (V, M, tokens, ffn)
    (64, 4, 100, 32),  # 2:4, partial last block
    (8, 8, 24, 32),  # 8:2:8, exact blocks
    (64, 8, 10, 16),  # one block shorter than V
    (4, 16, 13, 64),  # 4:2:16, partial block
]


def _x(tokens, ffn, dtype, seed=0):
    x = torch.randn(tokens, ffn, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if tokens > 2 and ffn >= 8:
        x[0, :8] = 0.0  # ties among zeros
        x[1, :4] = torch.tensor([0.5, 0.5, 0.5, 0.5]).to(dtype)  # ties among equal values
    return x


@pytest.mark.parametrize("squared_relu", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v,m,tokens,ffn", CASES)
def test_triton_matches_reference(v, m, tokens, ffn, dtype, squared_relu):
    x = _x(tokens, ffn, dtype, seed=v + m)
    got = activation_sparsify_triton(x, v, m, squared_relu)
    ref = activation_sparsify_reference(x, v, m, squared_relu)
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])  # mask, columns
    if dtype == torch.float32 or not squared_relu or torch.cuda.is_available():
        assert torch.equal(got[0], ref[0])
    else:  # Triton's CPU interpreter truncates fp32 -> bf16 where the GPU (and torch) round to nearest
        torch.testing.assert_close(got[0], ref[0], rtol=2**-7, atol=0)
    torch.testing.assert_close(got[3], ref[3], rtol=1e-5, atol=1e-3)


def _rank(value: float) -> float:
    """The NaN rule: |value|, NaN ranked as +inf."""
    return math.inf if math.isnan(value) else abs(value)


def _loop_reference(a, v, m):
    """Independent slow V:2:M: python sorting per block and per row, float64."""
    a = a.double()
    tokens, ffn = a.shape
    mask = torch.zeros_like(a, dtype=torch.bool)
    chosen_all = []
    for r0 in range(0, tokens, v):
        rows = a[r0 : r0 + v]
        block = []
        for c0 in range(0, ffn, m):
            norms = [_rank(sum(float(x) * float(x) for x in rows[:, c0 + c])) for c in range(m)]
            chosen = sorted(sorted(range(m), key=lambda c: (-norms[c], c))[:4])
            block.append(chosen)
            for r in range(rows.shape[0]):
                best = sorted(chosen, key=lambda c: (-_rank(float(rows[r, c0 + c])), c))[:2]
                for c in best:
                    mask[r0 + r, c0 + c] = True
        chosen_all.append(block)
    return mask, torch.tensor(chosen_all, dtype=torch.int16)


@pytest.mark.parametrize("v,m,tokens,ffn", CASES)
def test_reference_matches_independent_loop_and_density(v, m, tokens, ffn):
    x = _x(tokens, ffn, torch.float32, seed=3)
    values, mask, columns, stats = activation_sparsify_reference(x, v, m, squared_relu=True)
    a = torch.relu(x).square()
    loop_mask, loop_columns = _loop_reference(a, v, m)
    assert torch.equal(mask, loop_mask)
    assert torch.equal(columns, loop_columns)
    assert torch.equal(values, a * mask)
    assert (
        mask.reshape(tokens, ffn // m, m).sum(-1) == 2
    ).all()  # exactly 2 per row per group: density 2/M
    assert stats[0].item() == (a == 0).sum().item()
    torch.testing.assert_close(stats[2] / stats[1], (a.double() * ~mask).sum() / a.double().sum())


def test_2_4_is_the_1d_mask_of_the_activation():
    x = _x(48, 64, torch.float32, seed=9)
    _, mask, _, _ = activation_sparsify_reference(x, 64, 4, squared_relu=True)
    assert torch.equal(mask, mask_1d_reference(torch.relu(x).square()))


def test_squared_relu_activation_drops_little():
    """Squared-ReLU of a mostly-negative pre-activation is mostly exact zeros: 2:4 drops little of it."""
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) - 1.5
    _, _, _, stats = activation_sparsify_reference(x, 64, 4, squared_relu=True)
    zeros, total, dropped, numel = stats.tolist()
    assert zeros / numel > 0.85 and dropped / total < 0.1


@pytest.mark.parametrize(
    "v,m,ffn,match",
    [
        (64, 8, 12, "multiple of 8"),
        (64, 6, 12, "powers of two"),
        (3, 4, 8, "powers of two"),
        (64, 2, 8, "M >= 4"),
    ],
)
def test_bad_patterns_and_shapes(v, m, ffn, match):
    for fn in (activation_sparsify_reference, activation_sparsify_triton):
        with pytest.raises(ValueError, match=match):
            fn(torch.randn(4, ffn), v, m, True)


MORE_CASES = [  # (V, M, tokens, ffn): several programs and ragged edges of the new launch tiles
    (64, 4, 37, 236),  # 2:4, flat kernel, last program partial
    (64, 8, 70, 1600),  # 64:2:8, 8 groups per program, partial group chunk and row block
    (2, 32, 5, 96),  # 2:2:32
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v,m,tokens,ffn", MORE_CASES)
def test_triton_matches_reference_on_larger_tiles(v, m, tokens, ffn, dtype):
    x = _x(tokens, ffn, dtype, seed=tokens)
    x[3, :] = x[2, :]  # equal rows: tied column norms inside blocks
    got = activation_sparsify_triton(x, v, m, True)
    ref = activation_sparsify_reference(x, v, m, True)
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    if dtype != torch.bfloat16 or torch.cuda.is_available():
        assert torch.equal(got[0], ref[0])
    else:  # the CPU interpreter truncates fp32 -> bf16 (see above)
        torch.testing.assert_close(got[0], ref[0], rtol=2**-7, atol=0)
    torch.testing.assert_close(got[3], ref[3], rtol=1e-5, atol=1e-3)


NAN, INF = float("nan"), float("inf")


def _nonfinite_x(tokens, ffn, dtype, seed):
    """Quarter-integers with many ties (their squares are exact in bf16/fp16, so values can be
    compared bit for bit) and NaN/+Inf/-Inf alone, side by side, filling a group, filling a
    column, filling more than 4 columns of a group of 8, and in the last (ragged) row."""
    x = torch.randint(-16, 17, (tokens, ffn), generator=torch.Generator().manual_seed(seed)) / 4
    x[0, 1] = NAN
    x[1, 4:8] = torch.tensor([2.0, INF, NAN, 1.0])
    x[2, 8:12] = torch.tensor([-INF, NAN, INF, 3.0])  # three non-finite: the lower two are kept
    x[3, 12:16] = NAN
    x[:, 17] = NAN
    x[4, 24:32] = torch.tensor([NAN, INF, -INF, NAN, INF, 1.0, NAN, 2.0])
    x[-1, -1] = -INF
    x[-1, -2] = NAN
    return x.to(dtype)


def _same_bits(a, b) -> bool:
    """Bit for bit, except NaN payloads (a GPU returns its canonical NaN)."""
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    a, b = a.masked_fill(nan, 0), b.masked_fill(nan, 0)
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(ints), b.view(ints))


NONFINITE_CASES = [  # (V, M, tokens, ffn)
    (64, 4, 37, 64),  # 2:4, ragged
    (8, 8, 21, 64),  # 8:2:8, last block of 5 rows
    (4, 16, 13, 64),  # 4:2:16, last block of 1 row
]


@pytest.mark.parametrize("squared_relu", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v,m,tokens,ffn", NONFINITE_CASES)
def test_nonfinite_activations_follow_one_nan_rule_in_kernel_and_reference(
    v, m, tokens, ffn, dtype, squared_relu
):
    """NaN ranks as +inf, ties to the lower column: the Triton kernel and the reference give the
    same bits, the pattern is exact, and every block group holding a NaN/Inf keeps one."""
    x = _nonfinite_x(tokens, ffn, dtype, seed=v + m)
    got = activation_sparsify_triton(x, v, m, squared_relu)
    ref = activation_sparsify_reference(x, v, m, squared_relu)
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])  # mask, columns
    assert _same_bits(got[0], ref[0])  # values, NaN and signed zeros included
    torch.testing.assert_close(got[3], ref[3], rtol=1e-5, atol=1e-3, equal_nan=True)

    a = torch.relu(x.float()).square() if squared_relu else x.float()
    loop_mask, loop_columns = _loop_reference(a, v, m)
    assert torch.equal(ref[1], loop_mask) and torch.equal(ref[2], loop_columns)
    assert _same_bits(ref[0], torch.where(loop_mask, a, 0.0).to(dtype))

    groups = ref[1].reshape(tokens, ffn // m, m)
    assert (groups.sum(-1) == 2).all()  # exactly 2 per row per group
    assert (ref[0].ne(0).reshape(tokens, ffn // m, m).sum(-1) <= 2).all()  # a NaN is a nonzero
    v = 1 if m == 4 else v  # 2:4 keeps all 4 columns: its groups are single rows
    blocks = -(-tokens // v)
    pad = lambda t: torch.cat([t, t.new_zeros(blocks * v - tokens, ffn)])  # noqa: E731
    nonfinite = pad(~torch.isfinite(a)).reshape(blocks, v, ffn // m, m)
    kept = pad(ref[1]).reshape(blocks, v, ffn // m, m)
    holds, keeps = nonfinite.any(3).any(1), (nonfinite & kept).any(3).any(1)
    assert holds.any() and torch.equal(keeps, holds)


def test_2_4_reference_path_equals_the_general_v_2_m_reference():
    """The 2:4 shortcut (no norms) gives what the general V:2:M code gives with M = 4."""
    from megasparse.kernels.activation_sparsify import _keep_top

    x = _x(50, 64, torch.float32, seed=5)
    x[7, :] = x[6, :]
    values, mask, columns, stats = activation_sparsify_reference(x, 16, 4, True)
    a = torch.relu(x).square()
    general = _keep_top(a.abs().reshape(50, 16, 4), torch.ones(50, 16, 4, dtype=torch.bool), 2)
    assert torch.equal(mask, general.reshape(50, 64))
    assert torch.equal(columns, torch.arange(4, dtype=torch.int16).expand(4, 16, 4))
    assert torch.equal(values, a * mask)
    assert stats[2].item() == pytest.approx((a.double() * ~mask).sum().item(), rel=1e-12)


squared_relu_backward_triton = on_triton_device(kernels.squared_relu_sparsify_backward_triton)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_squared_relu_backward_matches_reference_and_autograd(dtype):
    from megasparse.kernels import squared_relu_sparsify_backward_reference as reference

    g = torch.Generator().manual_seed(8)
    x = torch.randn(37, 236, generator=g).to(dtype)
    grad = torch.randn(37, 236, generator=g).to(dtype)
    _, mask, _, _ = activation_sparsify_reference(x, 64, 4, True)
    got, ref = squared_relu_backward_triton(x, mask, grad), reference(x, mask, grad)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype != torch.bfloat16 or torch.cuda.is_available():
        assert torch.equal(got, ref)
    else:  # the CPU interpreter truncates fp32 -> bf16 (see above)
        torch.testing.assert_close(got, ref, rtol=2**-7, atol=0)
    # independent: autograd of (relu(x)^2 * mask) in float64
    xd = x.double().requires_grad_(True)
    (torch.relu(xd).square() * mask).backward(grad.double())
    torch.testing.assert_close(
        ref.double(), xd.grad, rtol=2**-7 if dtype != torch.float32 else 1e-6, atol=0
    )
    assert (ref[~mask] == 0).all()


def test_squared_relu_backward_nonfinite_and_bad_shapes():
    from megasparse.kernels import squared_relu_sparsify_backward_reference as reference

    x = torch.tensor([[float("nan"), float("inf"), -1.0, 2.0, float("nan"), 3.0, 0.0, -0.0]])
    mask = torch.tensor([[True, True, True, True, False, False, True, True]])
    grad = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
    got = squared_relu_backward_triton(x, mask, grad)
    expected = torch.tensor([[float("nan"), float("inf"), 0.0, 16.0, 0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(reference(x, mask, grad).nan_to_num(9.0), expected.nan_to_num(9.0))
    assert torch.equal(got.nan_to_num(9.0), expected.nan_to_num(9.0))
    for fn in (reference, kernels.squared_relu_sparsify_backward_triton):
        with pytest.raises(ValueError, match="one shape"):
            fn(x, mask.float(), grad)
