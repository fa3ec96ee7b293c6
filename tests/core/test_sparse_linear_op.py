"""The autograd op alone (no Megatron): float64 against the plain-torch masked reference."""

import pytest
import torch

from megasparse import SparsityConfig
from megasparse.core.backends import DenseBackend
from megasparse.core.linear_op import LinearPlan, sparse_linear
from megasparse.core.masks import weight_mask
from reference import masked_linear_reference


def _inputs(seed=0, shape=(5, 3, 16), out=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    w = torch.randn(out, shape[-1], generator=g, dtype=dtype)
    b = torch.randn(out, generator=g, dtype=dtype)
    return x, w, b


@pytest.mark.parametrize("mask_kind", ["1d", "transposable"])
@pytest.mark.parametrize("gradient", ["ste", "masked", "srste"])
def test_op_matches_float64_reference(mask_kind, gradient):
    x, w, b = _inputs()
    mask = weight_mask(w, mask_kind)
    plan = LinearPlan(DenseBackend(), mask_kind == "transposable")
    xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, b))
    y = sparse_linear(xr, wr, br, mask, plan, SparsityConfig(gradient=gradient, srste_decay=0.1))
    ref = masked_linear_reference(x, w, b, mask, gradient, 0.1)
    y.backward(ref["dy"])
    torch.testing.assert_close(y, ref["y"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xr.grad, ref["dx"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(wr.grad, ref["dw"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(br.grad, ref["db"], rtol=1e-12, atol=1e-12)


def test_gradient_modes_differ_where_they_should():
    x, w, b = _inputs(seed=1)
    mask = weight_mask(w)
    grads = {}
    for mode in ("ste", "masked", "srste"):
        wr = w.clone().requires_grad_(True)
        sparsity = SparsityConfig(gradient=mode, srste_decay=0.5)
        sparse_linear(x, wr, None, mask, LinearPlan(), sparsity).sum().backward()
        grads[mode] = wr.grad
    assert torch.equal(grads["masked"][~mask], torch.zeros_like(grads["masked"][~mask]))
    assert torch.equal(grads["ste"][mask], grads["masked"][mask])
    torch.testing.assert_close(grads["srste"] - grads["ste"], 0.5 * (~mask) * w)


def test_main_grad_accumulates_in_fp32_and_returns_dummy_grad():
    x, w, _ = _inputs(seed=2, dtype=torch.bfloat16)
    mask = weight_mask(w)
    wr = w.clone().requires_grad_(True)
    wr.main_grad = torch.ones(w.shape, dtype=torch.float32)
    wr.grad_added_to_main_grad = False
    dy = torch.randn(5, 3, 8, dtype=torch.bfloat16)
    y = sparse_linear(
        x,
        wr,
        None,
        mask,
        LinearPlan(gradient_accumulation_fusion=True),
        SparsityConfig(gradient="masked"),
    )
    y.backward(dy)
    expected = 1.0 + (dy.double().reshape(-1, 8).t() @ x.double().reshape(-1, 16)) * mask
    torch.testing.assert_close(wr.main_grad.double(), expected, rtol=1e-5, atol=1e-5)
    assert wr.grad_added_to_main_grad is True
    assert wr.grad is not None and wr.grad.shape == w.shape  # Megatron's dummy gradient


def test_nonfinite_weight_errors_when_asked():
    w = torch.randn(4, 8)
    w[1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="1 NaN/Inf values"):
        weight_mask(w, "1d", nonfinite="error")
    assert weight_mask(w, "1d", nonfinite="propagate")[1, 3]


def test_one_call_mvue_draws_anew_per_call_and_follows_wgrad_seed():
    """The op alone keeps no step state: each call draws its own MVUE sample of dY, seeded from
    wgrad_seed and the call's index; the draws average to the plain weight gradient."""
    x, w, b = _inputs(seed=2, shape=(64, 16))
    mask = weight_mask(w)
    plan = LinearPlan(DenseBackend())
    dy = torch.randn(64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def weight_grad(**kw):
        wr = w.clone().requires_grad_(True)
        sparse_linear(x, wr, b, mask, plan, SparsityConfig(wgrad_sparsity="mvue", **kw)).backward(
            dy
        )
        return wr.grad

    first, second = weight_grad(wgrad_seed=1), weight_grad(wgrad_seed=1)
    assert not torch.equal(first, second)  # a new draw per call
    assert not torch.equal(weight_grad(wgrad_seed=1), weight_grad(wgrad_seed=2))
    mean = torch.stack([weight_grad(wgrad_seed=3) for _ in range(400)]).mean(0)
    plain = dy.t() @ x  # the straight-through weight gradient MVUE estimates without bias
    assert (mean - plain).abs().max() < 0.1 * plain.abs().max()
