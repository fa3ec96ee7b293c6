"""The FP8 weight gradient under Megatron's main_grad fusion: on the TE path dY^T X accumulates into
main_grad inside TE's general_gemm (CPU stand-ins with TE's signatures, 2.5-2.9 and 2.10+), with no
fp32 [out, in] temporary; main_grad equals the float64 product of the dequantized operands."""

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import te_kernel_standins as kernels
from fp8_reference import q64
from megatron_helpers import make_config
from te_standins import TELayerNormLinearLike, current_recipe

from megasparse.config import SparsityConfig
from megasparse.core.backends import BACKENDS
from megasparse.core.masks import weight_mask
from megasparse.core.weight_state import SparseWeightState
from megasparse.fp8 import linear as fp8_linear
from megasparse.te import fp8_route
from megasparse.te.linear import sparse_te_class

pytestmark = pytest.mark.usefixtures("megatron_tp1")
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


class WeightShapedFp32(TorchDispatchMode):
    """Counts new fp32 tensors of `shape` that ops produce, except main_grad (in-place / out=)."""

    def __init__(self, shape, main_grad):
        super().__init__()
        self.shape, self.main_grad, self.count = tuple(shape), main_grad, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (
                isinstance(t, torch.Tensor)
                and t.dtype == torch.float32
                and tuple(t.shape) == self.shape
                and t._base is None  # a new tensor, not a view
                and t.untyped_storage().data_ptr() != self.main_grad.untyped_storage().data_ptr()
            ):
                self.count += 1
        return out


def _reference(weight, mask, xs, dys, gradient, decay=0.1):
    """main_grad after the micro-batches: sum of dq(dY)^T dq(x) (e4m3 x, e5m2 dY under HYBRID current
    scaling, as the op quantizes them), then the gradient mode's rule of the step."""
    total = sum(q64(dy, E5M2).t() @ q64(x) for x, dy in zip(xs, dys) if x.numel())
    if gradient == "masked":
        return total * mask
    if gradient == "srste":
        return total + decay * (~mask) * weight.detach().double()
    return total


@pytest.mark.parametrize("te_version", ["2.10+", "2.5-2.9"])
@pytest.mark.parametrize("gradient", ["ste", "masked", "srste"])
def test_fp8_wgrad_accumulates_into_main_grad_in_tes_gemm(te_version, gradient):
    """Three micro-batches (ragged token counts, one empty): every FP8 wgrad is one general_gemm
    call (layout "NT", accumulate=True, out=main_grad); no fp32 weight-shaped tensor is made for
    ste / masked (srste's decay term is its own, once per step); main_grad equals the reference."""
    wgrad_kernels = kernels.WGRAD_KERNELS if te_version == "2.10+" else kernels.WGRAD_KERNELS_V2_5
    torch.manual_seed(2)
    w = torch.nn.Parameter(torch.randn(40, 64))
    w.main_grad = torch.zeros(40, 64)  # no grad_added_to_main_grad: no dummy gradient to count
    cfg = SparsityConfig(fp8="hybrid", gradient=gradient, srste_decay=0.1)
    step = SparseWeightState().step(w, cfg, BACKENDS["dense"])
    plan = fp8_linear.default_plan(
        gradient_accumulation_fusion=True,
        out_dtype=torch.float32,
        wgrad_into_main_grad=functools.partial(
            fp8_route.te_wgrad_into_main_grad, kernels=wgrad_kernels
        ),
    )
    kernels.calls.clear()
    xs = [torch.randn(t, 64) for t in (21, 0, 37)]
    dys = [torch.randn(t, 40) for t in (21, 0, 37)]
    counter = WeightShapedFp32(w.shape, w.main_grad)
    for x, dy in zip(xs, dys):
        y = fp8_linear.fp8_sparse_linear_step(x, w, None, step, plan)  # builds the step's weight
        with counter:  # the backward: input and weight gradients
            y.backward(dy)
    gemms = [c for name, c in kernels.calls if name == "general_gemm"]
    assert len(gemms) == 2  # the empty micro-batch runs no GEMM
    assert all(c["out"] is w.main_grad and c["accumulate"] and c["layout"] == "NT" for c in gemms)
    if gradient != "srste":
        assert counter.count == 0
    assert w.grad is None  # the gradient went into main_grad
    expected = _reference(w, step.mask(), xs, dys, gradient)
    torch.testing.assert_close(w.main_grad.double(), expected, rtol=1e-5, atol=1e-4)


def test_without_an_accumulating_gemm_the_wgrad_is_an_fp32_temporary_added():
    """The local path (torch 2.13's FP8 GEMMs cannot accumulate): one fp32 [out, in] result per
    micro-batch, added to main_grad; the same main_grad (and the counter sees the temporary)."""
    torch.manual_seed(2)
    w = torch.nn.Parameter(torch.randn(40, 64))
    w.main_grad = torch.zeros(40, 64)
    step = SparseWeightState().step(w, SparsityConfig(fp8="hybrid"), BACKENDS["dense"])
    plan = fp8_linear.default_plan(gradient_accumulation_fusion=True, out_dtype=torch.float32)
    x, dy = torch.randn(21, 64), torch.randn(21, 40)
    counter = WeightShapedFp32(w.shape, w.main_grad)
    y = fp8_linear.fp8_sparse_linear_step(x, w, None, step, plan)
    with counter:
        y.backward(dy)
    assert counter.count >= 1
    expected = _reference(w, step.mask(), [x], [dy], "ste")
    torch.testing.assert_close(w.main_grad.double(), expected, rtol=1e-5, atol=1e-4)


def test_te_layernorm_linear_fp8_wgrad_goes_through_tes_gemm(monkeypatch):
    """The sparse TE LayerNormLinear with fuse_wgrad_accumulation under fp8_autocast: its plan
    carries TE's accumulating GEMM (where TE's kernels exist), main_grad equals the reference over
    two micro-batches, and the dummy gradient is flagged for Megatron's DDP."""
    monkeypatch.setattr(fp8_route, "te_fp8_state", lambda: (True, current_recipe()))
    monkeypatch.setattr(fp8_route, "te_wgrad_kernels", lambda device: kernels.WGRAD_KERNELS)
    torch.manual_seed(6)
    layer = sparse_te_class(TELayerNormLinearLike)(
        64, 32, config=make_config(), eps=1e-3, sparsity=SparsityConfig(gradient="masked")
    ).float()
    layer.fuse_wgrad_accumulation = True
    layer.weight.main_grad = torch.zeros(32, 64)
    layer.weight.grad_added_to_main_grad = False
    kernels.calls.clear()
    lns, dys = [], []
    for tokens in (19, 26):
        x, dy = torch.randn(tokens, 64), torch.randn(tokens, 32)
        layer(x).backward(dy)
        g = layer.layer_norm_weight.detach()
        lns.append(
            torch.nn.functional.layer_norm(x, (64,), g, layer.layer_norm_bias.detach(), 1e-3)
        )
        dys.append(dy)
    assert [name for name, _ in kernels.calls] == ["general_gemm"] * 2
    assert layer.weight.grad_added_to_main_grad
    mask = weight_mask(layer.weight)
    expected = _reference(layer.weight, mask, lns, dys, "masked")
    torch.testing.assert_close(layer.weight.main_grad.double(), expected, rtol=1e-4, atol=1e-3)
