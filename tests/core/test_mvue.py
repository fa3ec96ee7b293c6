"""MVUE 2:4 pruning (Chmiel et al., ICLR 2023) against float64 loop references and statistics."""

import itertools
import math

import pytest
import torch

from megasparse.core.mvue import mvue24, mvue24_probabilities, mvue24_variance


def _reference_probabilities(a):
    """Loop reference: p_i = min(1, c|a_i|) with sum p_i = 2, c found by bisection (float64)."""
    a = [abs(float(v)) for v in a]
    nonzero = [v for v in a if v > 0]
    if len(nonzero) <= 2:
        return [1.0 if v > 0 else 0.0 for v in a]
    lo, hi = 0.0, 2.0 / min(nonzero)  # f(hi) = len(nonzero) > 2
    for _ in range(200):
        c = (lo + hi) / 2
        if sum(min(1.0, c * v) for v in a) < 2:
            lo = c
        else:
            hi = c
    return [min(1.0, hi * v) for v in a]


def _groups():
    torch.manual_seed(0)
    rows = [torch.randn(4, dtype=torch.float64) for _ in range(6)]
    rows += [
        torch.tensor(v, dtype=torch.float64)
        for v in (
            [5.0, 0.1, -0.2, 0.3],  # one dominant element: p = 1 for it, 1:3 MVUE on the rest
            [1.0, -1.0, 1.0, -1.0],  # ties
            [3.0, 1.0, -1.0, 1.0],  # boundary 2 a_max = S
            [0.0, 0.0, 0.0, 0.0],  # zero group
            [0.0, 2.0, 0.0, 0.0],  # one nonzero
            [0.0, -2.0, 0.0, 1.0],  # two nonzeros
        )
    ]
    return torch.stack(rows)


def test_probabilities_match_the_loop_reference():
    groups = _groups()
    p = mvue24_probabilities(groups)
    for g, row in zip(groups, p):
        ref = _reference_probabilities(g.tolist())
        assert row.tolist() == pytest.approx(ref, abs=1e-9), g


def test_every_draw_is_exactly_2_4_and_nonzero_groups_keep_two():
    x = torch.randn(64, 24)
    x[8:12, 0] = 0.0  # a zero group in column 0
    x[12:16, 1] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        y = mvue24(x, dim=0, generator=g)
        nz = (y != 0).reshape(16, 4, 24).sum(1)
        assert nz.max() <= 2
        assert (nz[(x.reshape(16, 4, 24) != 0).sum(1) >= 2] == 2).all()
        assert (y[8:12, 0] == 0).all() and y[12:16, 1].tolist() == [0.0, 1.0, 0.0, 0.0]
        # kept values are a_i / p_i
        p = mvue24_probabilities(x.t().reshape(24, 16, 4)).reshape(24, 64).t()
        kept = y != 0
        assert torch.allclose(y[kept], (x / p)[kept], rtol=1e-6)


def test_seeded_generator_is_reproducible():
    x = torch.randn(32, 8)
    a = mvue24(x, generator=torch.Generator().manual_seed(7))
    b = mvue24(x, generator=torch.Generator().manual_seed(7))
    c = mvue24(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _draws(groups, n, seed):
    """n independent draws of every group, [n, G, 4] float64 (groups along the last dim)."""
    x = groups.reshape(1, -1).expand(n, -1).contiguous()
    y = mvue24(x, dim=1, generator=torch.Generator().manual_seed(seed))
    return y.reshape(n, -1, 4)


def test_unbiased_and_variance_matches_the_formula():
    n = 40000
    groups = _groups()
    draws = _draws(groups, n, seed=3)
    var_theory = mvue24_variance(groups)  # a_i^2 (1/p_i - 1)
    # independent closed forms of the paper's two cases, per group
    for g, v in zip(groups, var_theory):
        a = g.abs()
        s, big = float(a.sum()), float(a.max())
        if 2 * big <= s:
            expected = s * s / 2 - float((a * a).sum())
        else:
            rest = s - big
            expected = rest * rest - (float((a * a).sum()) - big * big)
        assert float(v.sum()) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # unbiased: |mean - a| within 5 standard errors sqrt(Var / n) (exact where Var = 0)
    mean = draws.mean(0)
    bound = 5 * (var_theory / n).sqrt() + 1e-12
    assert ((mean - groups).abs() <= bound).all(), (mean - groups).abs() / bound
    # variance: the sample variance of the group sum-of-variances within 5 % (n = 40000:
    # its relative standard error is ~ sqrt(2 / n) * kurtosis factor < 1.5 %)
    emp = ((draws - groups) ** 2).mean(0).sum(-1)
    theory = var_theory.sum(-1)
    has_var = theory > 0
    assert torch.allclose(emp[has_var], theory[has_var], rtol=0.05)
    assert (emp[~has_var] == 0).all()


def test_minimum_variance_among_unbiased_2_4_estimators():
    """Every unbiased estimator that keeps 2 of 4 has sum a_i^2/p_i - a_i^2 >= ours (check the
    successive-sampling estimator of Hu et al.'s toolkit and all uniform pair designs)."""
    groups = _groups()[:6]
    ours = mvue24_variance(groups).sum(-1)
    for g, v in zip(groups, ours):
        a = g.abs().tolist()
        s = sum(a)
        # successive sampling without replacement, Horvitz-Thompson weights
        incl = [
            a[i] / s + sum(a[j] / s * a[i] / (s - a[j]) for j in range(4) if j != i)
            for i in range(4)
        ]
        hu = sum(x * x / q - x * x for x, q in zip(a, incl))
        uniform = sum(x * x / 0.5 - x * x for x in a)
        assert float(v) <= hu + 1e-12 and float(v) <= uniform + 1e-12


def test_inclusion_frequencies_match_probabilities():
    n = 40000
    groups = _groups()
    draws = _draws(groups, n, seed=5)
    freq = (draws != 0).double().mean(0)
    p = mvue24_probabilities(groups)
    bound = 5 * (p * (1 - p) / n).sqrt() + 1e-12
    assert ((freq - p).abs() <= bound).all()


@pytest.mark.parametrize("dim", [0, 1])
def test_wgrad_layout_groups_tokens_per_output_column(dim):
    """dim=0 on dY [tokens, out]: groups of 4 consecutive tokens in each column (loop check)."""
    dy = torch.randn(16, 8) if dim == 0 else torch.randn(8, 16)
    y = mvue24(dy, dim=dim, generator=torch.Generator().manual_seed(0))
    t = y if dim == 0 else y.t()
    for col, start in itertools.product(range(8), range(0, 16, 4)):
        assert int((t[start : start + 4, col] != 0).sum()) == 2


def test_bfloat16_equals_float32_draw_rounded():
    x = torch.randn(64, 16).to(torch.bfloat16)
    y = mvue24(x, generator=torch.Generator().manual_seed(11))
    ref = mvue24(x.float(), generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)


def test_bfloat16_mean_is_unbiased_up_to_rounding():
    groups = _groups()[:6].to(torch.bfloat16)
    n = 20000
    draws = _draws(groups, n, seed=9).double()
    exact = groups.double()
    var = mvue24_variance(exact)
    # kept values are rounded to bf16: relative error <= 2^-8 of |a_i / p_i|
    rounding = (
        2**-8
        * (exact.abs() / mvue24_probabilities(exact).clamp_min(1e-30)).where(
            exact != 0, torch.zeros_like(exact)
        )
        * 1.0
    )
    assert ((draws.mean(0) - exact).abs() <= 5 * (var / n).sqrt() + rounding + 1e-12).all()


def test_rejects_a_dim_not_a_multiple_of_4():
    with pytest.raises(ValueError, match="multiple of 4"):
        mvue24(torch.randn(6, 4), dim=0)


def test_the_variance_bound_is_the_mse_of_every_draw_on_average():
    """Sanity of the formula itself: exact expectation by enumerating the systematic design."""
    g = torch.tensor([[0.7, -0.2, 0.05, 1.1]], dtype=torch.float64)
    p = mvue24_probabilities(g)[0]
    # enumerate u on a fine grid: E over u of the estimator equals a; E of squared error = Var
    us = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
    edges = torch.cumsum(p, 0)
    start = edges - p
    keep = ((start <= us[:, None]) & (us[:, None] < edges)) | (
        (start <= us[:, None] + 1) & (us[:, None] + 1 < edges)
    )
    est = torch.where(keep, g / p, torch.zeros_like(g))
    assert torch.allclose(est.mean(0), g[0], atol=1e-4)
    assert math.isclose(
        float(((est - g) ** 2).sum(1).mean()), float(mvue24_variance(g).sum()), rel_tol=1e-3
    )


def test_weight_grad_of_an_expert_without_tokens_runs_no_sparse_kernel():
    """0 tokens: dW = 0 from the dense math; the sparse kernels (which refuse empty operands)
    are never called, although PyTorch's shape table accepts a [out, 0] operand."""
    from megasparse.core.backends import CusparseltBackend
    from megasparse.core.mvue import mvue_weight_grad

    class EmptyRefusingCusparselt(CusparseltBackend):  # cuSPARSELt's shape rules, on CPU
        def compress(self, matrix):
            raise AssertionError(f"a sparse kernel got the operand {tuple(matrix.shape)}")

    out_features, in_features = 32, 64
    dy = torch.zeros(0, out_features, dtype=torch.bfloat16)
    x = torch.zeros(0, in_features, dtype=torch.bfloat16)
    assert EmptyRefusingCusparselt().fits(dy.t().contiguous())  # what let it through
    grad = mvue_weight_grad(dy, x, torch.Generator().manual_seed(0), EmptyRefusingCusparselt())
    reference = dy.double().t() @ x.double()
    torch.testing.assert_close(grad.double(), reference, rtol=0, atol=0)
