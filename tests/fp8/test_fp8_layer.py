"""megasparse.Fp8SparseLinear, the standalone FP8 2:4 training layer, against float64 references."""

import pytest
import torch

import megasparse
from megasparse import SparsityConfig
from megasparse.config import FP8_ORDERS, Fp8Order
from megasparse.core.masks import weight_mask
from megasparse.fp8 import linear as fp8_linear
from megasparse.fp8.layer import Fp8SparseLinear
from megasparse.fp8.scaling import E4M3, E5M2, quantize_with, scale_from_amax
from megasparse.interface import is_sparse_module
from fp8_reference import q64


def _layer(seed=0, **sparsity):
    torch.manual_seed(seed)
    return megasparse.Fp8SparseLinear(128, 64, sparsity=SparsityConfig(**sparsity))


@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
@pytest.mark.parametrize("order", list(Fp8Order))
@pytest.mark.parametrize("mask", ["1d", "transposable"])
def test_fp8_sparse_linear_against_float64_of_quantized_operands(fmt, order, mask):
    """Forward, input, weight and bias gradients equal a plain float64 masked linear of exactly the
    operands FP8 quantizes (per-tensor scales from amaxes), up to fp32 output rounding."""
    layer = _layer(mask=mask, fp8=fmt, fp8_order=order)
    assert megasparse.Fp8SparseLinear is Fp8SparseLinear and is_sparse_module(layer)
    w = layer.weight.detach()
    if order == Fp8Order.PRUNE_THEN_QUANTIZE:
        m = weight_mask(w, mask)
        w_used = q64(w * m)  # amax after pruning
    else:  # the mask of the e4m3 values of W (not divided by the scale), and W's amax
        m = weight_mask(quantize_with(w, scale_from_amax(w.abs().amax())).float(), mask)
        w_used = q64(w, amax_of=w) * m
    assert torch.equal(layer.sparsity_mask(), m) and (m.reshape(-1, 4).sum(1) == 2).all()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 128, generator=g).requires_grad_(True)  # 21 tokens: padded to 32
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == (3, 7, 64)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    x2, dy2 = x.detach().reshape(-1, 128), dy.reshape(-1, 64)
    grad_dtype = E4M3 if fmt == "e4m3" else E5M2
    dgrad_dtype = E4M3 if mask == "transposable" else grad_dtype  # the 2:4 dgrad takes e4m3
    y_ref = q64(x2) @ w_used.t() + layer.bias.detach().double()
    dx_ref = q64(dy2, dgrad_dtype) @ w_used
    dw_ref = q64(dy2, grad_dtype).t() @ q64(x2)  # ste: the FP8 wgrad, as TE
    torch.testing.assert_close(y.double().reshape(-1, 64), y_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad.double().reshape(-1, 128), dx_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.weight.grad.double(), dw_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.bias.grad.double(), dy2.double().sum(0), rtol=1e-6, atol=1e-5)
    # and close to the exact masked linear: FP8 error only
    exact = x2.double() @ (w.double() * m).t() + layer.bias.detach().double()
    assert ((y.double().reshape(-1, 64) - exact).norm() / exact.norm()) < 0.06


def test_fp8_sparse_linear_builds_its_fp8_weight_once_per_step(monkeypatch):
    """Micro-batches share one mask and one FP8 weight; an optimizer step builds new ones."""
    builds = []
    original = fp8_linear.Fp8Weight.__init__
    monkeypatch.setattr(
        fp8_linear.Fp8Weight, "__init__", lambda self, *a: (builds.append(1), original(self, *a))[1]
    )
    layer = _layer(fp8="hybrid", gradient="masked")
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(3):
        layer(torch.randn(16, 128)).sum().backward()
    assert len(builds) == 1
    # e4m3 W*M twice (forward [out, in], backward [in, out]) and two scalars
    assert layer.sparsity_stats()["state_bytes"]["fp8_weight"] == 2 * layer.weight.numel() + 8
    assert (layer.weight.grad[~layer.sparsity_mask()] == 0).all()  # masked mode
    opt.step()
    layer(torch.randn(16, 128))
    assert len(builds) == 2


def test_fp8_sparse_linear_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="fp8='hybrid' or 'e4m3'"):
        megasparse.Fp8SparseLinear(128, 64, sparsity=SparsityConfig())
    with pytest.raises(ValueError, match="multiples of 16"):
        megasparse.Fp8SparseLinear(120, 64)
    layer = megasparse.Fp8SparseLinear(128, 64, bias=False)
    assert layer.bias is None and "fp8=hybrid prune-then-quantize" in repr(layer)
    with pytest.raises(ValueError, match=r"takes inputs \[\.\.\., 128\], got \(4, 64\)"):
        layer(torch.randn(4, 64))  # not the padded token count of the FP8 GEMM


def test_fp8_order_is_one_enum_whose_strings_keep_working():
    """Configs, flags and checkpoints hold the strings; the members compare and format as them."""
    assert FP8_ORDERS == ("prune-then-quantize", "quantize-then-prune") == tuple(Fp8Order)
    member = Fp8Order.QUANTIZE_THEN_PRUNE
    assert member == "quantize-then-prune" and f"{member}_err" == "quantize-then-prune_err"
    cfg = SparsityConfig(fp8="hybrid", fp8_order=member)
    assert type(cfg.fp8_order) is str and cfg.fp8_order == member  # stored as the string
    assert SparsityConfig(fp8="hybrid").fp8_order == Fp8Order.PRUNE_THEN_QUANTIZE
    with pytest.raises(ValueError, match="fp8_order must be one of"):
        SparsityConfig(fp8="hybrid", fp8_order="prune-only")
