"""TE LayerNormLinear's norm on megasparse's routes (megasparse.te.norm): TE's own norm kernels
(CPU stand-ins with TE's signatures) forward and backward against float64 references, the torch
fallback without TE, and the FP8 2:4 LayerNormLinear on those kernels."""

from types import SimpleNamespace

import pytest
import torch

import te_kernel_standins as kernels
from fp8_reference import q64
from megatron_helpers import make_config
from te_standins import TELayerNormLinearLike, current_recipe

from megasparse.config import SparsityConfig
from megasparse.core.masks import weight_mask
from megasparse.te import norm as te_norm
from megasparse.te.linear import sparse_te_class
from reference import norm64

pytestmark = pytest.mark.usefixtures("megatron_tp1")
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


@pytest.fixture
def te_kernels(monkeypatch):
    """TE's norm kernels present (the stand-ins, on any device); their call log emptied."""
    monkeypatch.setattr(te_norm, "te_norm_kernels", lambda device: kernels.NORM_KERNELS)
    kernels.calls.clear()
    return kernels.calls


def _module(normalization, zero_centered, eps, features, **attrs):
    g = torch.Generator().manual_seed(len(normalization) + features)
    gamma = torch.randn(features, generator=g) * 0.3 + (0.0 if zero_centered else 1.0)
    beta = torch.randn(features, generator=g) * 0.3 if normalization == "LayerNorm" else None
    return SimpleNamespace(
        normalization=normalization,
        zero_centered_gamma=zero_centered,
        eps=eps,
        layer_norm_weight=torch.nn.Parameter(gamma),
        layer_norm_bias=None if beta is None else torch.nn.Parameter(beta),
        **attrs,
    )


def _check_against_float64(module, x, dy, tol):
    y = te_norm.te_normalization(module, x)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_(True)
    g64 = module.layer_norm_weight.detach().double().requires_grad_(True)
    b = module.layer_norm_bias
    b64 = None if b is None else b.detach().double().requires_grad_(True)
    y64 = norm64(x64, g64, b64, module.normalization, module.eps, module.zero_centered_gamma)
    y64.backward(dy.double())
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), y64, **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    grad_tol = {k: v * max(1, x.numel() // x.shape[-1]) for k, v in tol.items()}  # sums over rows
    torch.testing.assert_close(module.layer_norm_weight.grad.double(), g64.grad, **grad_tol)
    if b64 is not None:
        torch.testing.assert_close(module.layer_norm_bias.grad.double(), b64.grad, **grad_tol)


FP32_TOL = dict(rtol=1e-5, atol=1e-5)
BF16_TOL = dict(rtol=2**-7, atol=2**-7)  # bf16 input, output and gradients


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("zero_centered", [False, True])
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_te_kernels_forward_and_backward_against_float64(
    te_kernels, normalization, zero_centered, eps, dtype
):
    """y, dx, dgamma (and dbeta) through TE's kernels equal the float64 norm and its autograd
    gradients; each kernel runs once, on the 2-D input, in the activation dtype."""
    module = _module(normalization, zero_centered, eps, 48)
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(3, 7, 48, generator=g) * 2 + 0.5).to(dtype).requires_grad_(True)
    dy = torch.randn(3, 7, 48, generator=g).to(dtype)
    _check_against_float64(module, x, dy, FP32_TOL if dtype == torch.float32 else BF16_TOL)
    prefix = "layernorm" if normalization == "LayerNorm" else "rmsnorm"
    assert [name for name, _ in te_kernels] == [f"{prefix}_fwd", f"{prefix}_bwd"]
    assert te_kernels[0][1]["otype"] == kernels.TE_DType[dtype]
    assert module.layer_norm_weight.grad.dtype == torch.float32  # the parameter's dtype


def test_te_kernels_take_the_modules_sm_margins(te_kernels):
    """TE's SM margins: fwd_ln_sm_margin with grad, inf_ln_sm_margin without, bwd_ln_sm_margin."""
    module = _module("LayerNorm", False, 1e-5, 32)
    module.fwd_ln_sm_margin, module.inf_ln_sm_margin, module.bwd_ln_sm_margin = 3, 7, 5
    x = torch.randn(5, 32, requires_grad=True)
    te_norm.te_normalization(module, x).sum().backward()
    with torch.no_grad():
        te_norm.te_normalization(module, x)
    assert [(n, c["sm_margin"]) for n, c in te_kernels] == [
        ("layernorm_fwd", 3),
        ("layernorm_bwd", 5),
        ("layernorm_fwd", 7),
    ]


def test_no_rows_run_no_kernel_and_give_zero_parameter_gradients(te_kernels):
    module = _module("LayerNorm", False, 1e-5, 32)
    x = torch.zeros(0, 32, requires_grad=True)
    y = te_norm.te_normalization(module, x)
    y.sum().backward()
    assert y.shape == (0, 32) and te_kernels == []
    assert torch.equal(module.layer_norm_weight.grad, torch.zeros(32))
    assert torch.equal(module.layer_norm_bias.grad, torch.zeros(32))


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_without_te_the_torch_fallback_matches_float64(normalization):
    """No TE kernels (CPU): the eager torch fallback, same reference."""
    assert te_norm.te_norm_kernels(torch.device("cpu")) is None
    module = _module(normalization, True, 1e-5, 40)
    x = torch.randn(11, 40, requires_grad=True)
    _check_against_float64(module, x, torch.randn(11, 40), FP32_TOL)


def test_bad_normalization_is_refused_with_the_fix(te_kernels):
    module = _module("LayerNorm", False, 1e-5, 16)
    module.normalization = "GroupNorm"
    with pytest.raises(ValueError, match="'LayerNorm' or 'RMSNorm'"):
        te_norm.te_normalization(module, torch.randn(2, 16))


def test_kernels_are_one_autograd_node(te_kernels):
    """Forward and backward are TE's kernels in one node (no eager fp32 ops in the graph)."""
    module = _module("RMSNorm", False, 1e-5, 16)
    x = torch.randn(4, 16, requires_grad=True)
    y = te_norm.te_normalization(module, x)
    assert type(y.grad_fn).__name__ == "ViewBackward0"
    assert type(y.grad_fn.next_functions[0][0]).__name__ == "_TeNormBackward"


@pytest.mark.parametrize(
    "normalization,zero_centered,mask,dtype",
    [
        ("LayerNorm", False, "transposable", torch.float32),
        ("RMSNorm", True, "1d", torch.float32),
        ("LayerNorm", True, "1d", torch.bfloat16),
    ],
)
def test_fp8_layernorm_linear_runs_tes_norm_kernels(
    monkeypatch, te_kernels, normalization, zero_centered, mask, dtype
):
    """The FP8 2:4 LayerNormLinear: TE's norm kernel in the activation dtype, then the GEMM's cast
    of its output (e4m3, current scaling); y and the gradients of x, gamma, beta and W equal the
    float64 norm followed by float64 products of the operands the op quantizes."""
    import megasparse.te.fp8_route as te_fp8

    torch.manual_seed(4)
    layer = sparse_te_class(TELayerNormLinearLike)(
        64,
        32,
        config=make_config(),
        eps=1e-3,
        normalization=normalization,
        zero_centered_gamma=zero_centered,
        sparsity=SparsityConfig(mask=mask),
    ).to(dtype)
    x = (torch.randn(3, 7, 64) * 2 + 0.5).to(dtype).requires_grad_(True)  # 21 tokens: ragged
    dy = torch.randn(3, 7, 32).to(dtype)
    monkeypatch.setattr(te_fp8, "te_fp8_state", lambda: (True, current_recipe()))
    y = layer(x)
    y.backward(dy)
    prefix = "layernorm" if normalization == "LayerNorm" else "rmsnorm"
    assert [name for name, _ in te_kernels] == [f"{prefix}_fwd", f"{prefix}_bwd"]

    m = weight_mask(layer.weight, mask)
    x64 = x.detach().double().requires_grad_(True)
    g64 = layer.layer_norm_weight.detach().double().requires_grad_(True)
    b = layer.layer_norm_bias
    b64 = None if b is None else b.detach().double().requires_grad_(True)
    ln = norm64(x64, g64, b64, normalization, 1e-3, zero_centered).reshape(-1, 64)
    ln_act = ln.detach().to(dtype)  # the kernel's output in the activation dtype
    w_q, dy2 = q64(layer.weight.detach() * m), dy.reshape(-1, 32)
    dgrad_dtype = E4M3 if mask == "transposable" else E5M2  # cuSPARSELt's dgrad takes e4m3
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(y.double().reshape(-1, 32), q64(ln_act) @ w_q.t(), **tol)
    ln.backward(q64(dy2.float(), dgrad_dtype) @ w_q)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    torch.testing.assert_close(layer.layer_norm_weight.grad.double(), g64.grad, **tol)
    if b64 is not None:
        torch.testing.assert_close(layer.layer_norm_bias.grad.double(), b64.grad, **tol)
    dw = q64(dy2.float(), E5M2).t() @ q64(ln_act)
    torch.testing.assert_close(layer.weight.grad.double(), dw, **tol)


def test_sequence_parallel_gamma_keeps_tes_mark_and_gets_the_local_gradient(te_kernels):
    """TE marks layer_norm_weight / layer_norm_bias with `sequence_parallel` (layernorm_linear.py,
    TE 2.5 to main) for Megatron's all-reduce of their gradients over the TP group; the norm
    leaves both to them: the mark stays on the sparse module and the gradient is this rank's
    partial sum (no communication inside)."""
    layer = sparse_te_class(TELayerNormLinearLike)(
        32, 16, config=make_config(), sequence_parallel=True, sparsity=SparsityConfig()
    )
    for p in (layer.layer_norm_weight, layer.layer_norm_bias):
        # TE's __init__ marks them with its sequence_parallel (tp_size > 1 and sequence_parallel:
        # this TP=1 stand-in says False, so mark them as a TP > 1 rank would)
        setattr(p, "sequence_parallel", True)
    x, dy = torch.randn(6, 32, requires_grad=True), torch.randn(6, 32)
    te_norm.te_normalization(layer, x).backward(dy)
    assert layer.layer_norm_weight.sequence_parallel and layer.layer_norm_bias.sequence_parallel
    x64 = x.detach().double()
    xhat = (x64 - x64.mean(-1, keepdim=True)) / (
        x64.var(-1, unbiased=False, keepdim=True) + 1e-5
    ).sqrt()
    torch.testing.assert_close(
        layer.layer_norm_weight.grad.double(), (dy.double() * xhat).sum(0), **FP32_TOL
    )
    torch.testing.assert_close(layer.layer_norm_bias.grad.double(), dy.double().sum(0), **FP32_TOL)
