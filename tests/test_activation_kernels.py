"""Activation sparsifier kernel: Triton (interpreted on CPU) vs torch reference vs an independent loop."""

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
        torch.testing.assert_close(got[0], ref[0], rtol=2 ** -7, atol=0)
    torch.testing.assert_close(got[3], ref[3], rtol=1e-5, atol=1e-3)


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
            norms = [float(rows[:, c0 + c].square().sum()) for c in range(m)]
            chosen = sorted(sorted(range(m), key=lambda c: (-norms[c], c))[:4])
            block.append(chosen)
            for r in range(rows.shape[0]):
                best = sorted(chosen, key=lambda c: (-abs(float(rows[r, c0 + c])), c))[:2]
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
    assert (mask.reshape(tokens, ffn // m, m).sum(-1) == 2).all()  # exactly 2 per row per group: density 2/M
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
    [(64, 8, 12, "multiple of 8"), (64, 6, 12, "powers of two"), (3, 4, 8, "powers of two"), (64, 2, 8, "M >= 4")],
)
def test_bad_patterns_and_shapes(v, m, ffn, match):
    for fn in (activation_sparsify_reference, activation_sparsify_triton):
        with pytest.raises(ValueError, match=match):
            fn(torch.randn(4, ffn), v, m, True)
