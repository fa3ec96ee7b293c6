"""The local spec's FP8 path (SparsityConfig.fp8): Megatron's local layers with FP8 (2:4) GEMMs."""

import pytest
import torch

from megasparse import SparsityConfig
from megasparse.config import Fp8Order
from megasparse.fp8.scaling import E4M3, E5M2
from megasparse.core.masks import weight_mask
from fp8_reference import q64
from megatron_helpers import make_column, make_config, make_row

pytestmark = pytest.mark.usefixtures("megatron_tp1")


def _x(tokens=(5, 3), width=64, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*tokens, width, generator=g).requires_grad_(True)


@pytest.mark.parametrize("make", [make_column, make_row], ids=["column", "row"])
@pytest.mark.parametrize("order", list(Fp8Order))
@pytest.mark.parametrize("mask", ["1d", "transposable"])
def test_local_fp8_layer_against_float64_of_quantized_operands(make, order, mask):
    sparsity = SparsityConfig(mask=mask, fp8="hybrid", fp8_order=order)
    layer = make(make_config(dtype=torch.float32), 64, 32, sparsity)
    w = layer.weight.detach()
    if order == Fp8Order.PRUNE_THEN_QUANTIZE:
        m = weight_mask(w, mask)
        w_used = q64(w * m)  # amax after pruning
    else:  # the mask of the e4m3 values of W, and W's amax
        m = weight_mask(q64(w).float(), mask)
        w_used = q64(w, amax_of=w) * m
    assert torch.equal(layer.sparsity_mask(), m)
    assert f"fp8=hybrid {order}" in layer.extra_repr()
    x = _x()
    y, _ = layer(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    y.backward(dy)
    x2, dy2 = x.detach().reshape(-1, 64), dy.reshape(-1, 32)
    y_ref = q64(x2) @ w_used.t() + layer.bias.detach().double()
    dgrad_dtype = E4M3 if mask == "transposable" else E5M2  # sparse dgrad: e4m3 (cuSPARSELt)
    torch.testing.assert_close(y.double().reshape(-1, 32), y_ref, rtol=1e-5, atol=1e-4)
    dx_ref = q64(dy2, dgrad_dtype) @ w_used
    torch.testing.assert_close(x.grad.double().reshape(-1, 64), dx_ref, rtol=1e-5, atol=1e-4)
    dw_ref = q64(dy2, E5M2).t() @ q64(x2)  # ste: the FP8 wgrad, as TE
    torch.testing.assert_close(layer.weight.grad.double(), dw_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.bias.grad.double(), dy2.double().sum(0), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("weights,enabled", [(None, True), ("2:4", False)], ids=["dense", "off"])
def test_local_fp8_dense_phases_run_dense_fp8_gemms(weights, enabled):
    """weights=None or a dense phase: FP8 GEMMs on W (not the parent's high-precision GEMM)."""
    layer = make_column(
        make_config(dtype=torch.float32), 64, 32, SparsityConfig(weights=weights, fp8="e4m3")
    )
    layer.sparsity.enabled = enabled
    x = _x()
    y, _ = layer(x)
    x2 = x.detach().reshape(-1, 64)
    ref = q64(x2) @ q64(layer.weight).t() + layer.bias.detach().double()
    torch.testing.assert_close(y.double().reshape(-1, 32), ref, rtol=1e-5, atol=1e-4)
    exact = x2.double() @ layer.weight.detach().double().t() + layer.bias.detach().double()
    assert (y.double().reshape(-1, 32) - exact).abs().max() > 1e-4  # not the fp32 GEMM


def test_quantize_then_prune_breaks_fp8_ties_towards_the_lower_index():
    """1.0 sets the scale (448); 0.5 and 0.51 both round to e4m3 224: the lower index wins."""
    layer = make_column(
        make_config(dtype=torch.float32),
        64,
        32,
        SparsityConfig(fp8="hybrid", fp8_order="quantize-then-prune"),
    )
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 0.5, 0.51, 0.0]).repeat(32, 16))
    assert layer.sparsity_mask()[0, :4].tolist() == [True, True, False, False]
    layer.sparsity.fp8_order = "prune-then-quantize"  # the mask rule changed: a new mask
    assert layer.sparsity_mask()[0, :4].tolist() == [True, False, True, False]


def test_local_fp8_output_follows_autocast():
    layer = make_column(make_config(dtype=torch.float32), 64, 32, SparsityConfig(fp8="hybrid"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(_x())
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and layer.weight.grad.abs().sum() > 0


def test_local_fp8_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="fp8 is None"):
        SparsityConfig(fp8_order="quantize-then-prune")
    with pytest.raises(ValueError, match="wgrad_sparsity=None"):
        SparsityConfig(fp8="hybrid", wgrad_sparsity="mvue")
    with pytest.raises(ValueError, match="fp8"):
        SparsityConfig(fp8="e5m2")
    with pytest.raises(ValueError, match="multiples of 16"):
        make_column(make_config(dtype=torch.float32), 64, 40, SparsityConfig(fp8="hybrid"))


def test_quantize_then_prune_still_catches_inf_that_saturation_would_hide():
    sparsity = SparsityConfig(
        fp8="hybrid", fp8_order="quantize-then-prune", nonfinite_weights="error"
    )
    layer = make_column(make_config(dtype=torch.float32), 64, 32, sparsity)
    with torch.no_grad():
        layer.weight[0, 0] = float("inf")  # e4m3 saturates it to 448: the mask alone can't tell
    with pytest.raises(FloatingPointError, match="1 NaN/Inf values"):
        layer(_x())
