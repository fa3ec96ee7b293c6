"""Sparse TE linears: the mask/gradient logic with stand-ins for TE (which needs CUDA); real TE is gpu-marked."""

import dataclasses

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear

from megasparse import SparsityConfig
from megasparse.core.masks import weight_mask
from megasparse.te.linear import sparse_te_class
from megatron_helpers import make_config
from reference import masked_linear_reference, norm64
from te_standins import FakeTELinear, TEGroupedLinearLike, TELayerNormLinearLike, current_recipe

pytestmark = pytest.mark.usefixtures("megatron_tp1")


@pytest.mark.parametrize(
    "mask,gradient", [("1d", "ste"), ("transposable", "masked"), ("1d", "srste")]
)
def test_te_linear_computes_with_the_masked_weight_and_the_gradient_mode(mask, gradient):
    torch.manual_seed(0)
    layer = sparse_te_class(FakeTELinear)(
        16,
        32,
        config=make_config(),
        sparsity=SparsityConfig(mask=mask, gradient=gradient, srste_decay=0.1),
    )
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x)
    m = weight_mask(layer.weight, mask)
    assert torch.equal(layer.sparsity_mask(), m)
    ref = masked_linear_reference(x, layer.weight, None, m, gradient, 0.1)
    y.backward(ref["dy"])
    torch.testing.assert_close(y, ref["y"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, ref["dx"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, ref["dw"], rtol=1e-12, atol=1e-12)


def test_te_linear_rebuilds_after_eval_switch_and_weights_changed():
    """Weights written through .data (EMA validation): an eval() switch, and weights_changed()
    for other writes, make the next forward compute with the current weight."""
    import megasparse

    torch.manual_seed(0)
    layer = sparse_te_class(FakeTELinear)(16, 32, config=make_config(), sparsity=SparsityConfig())
    x = torch.randn(5, 16, dtype=torch.float64)
    layer(x)
    for write in ("eval", "weights_changed"):
        new_weight = torch.randn_like(layer.weight)
        layer.weight.data.copy_(new_weight)
        if write == "eval":
            layer.eval()
        else:
            megasparse.weights_changed(layer)
        y, _ = layer(x)
        ref = x @ (new_weight * weight_mask(new_weight)).t()
        torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)


def test_disabled_te_linear_is_the_te_linear():
    torch.manual_seed(1)
    base = FakeTELinear(16, 32, config=make_config())
    torch.manual_seed(1)
    sparse = sparse_te_class(FakeTELinear)(
        16, 32, config=make_config(), sparsity=SparsityConfig(enabled=False)
    )
    x = torch.randn(5, 16, dtype=torch.float64)
    assert torch.equal(base(x)[0], sparse(x)[0])
    assert list(base.state_dict()) == list(sparse.state_dict())


class OldTELinear(torch.nn.Module):
    """TE before 2.5: no _get_weight_tensors (the forward reads self.weight directly)."""

    def __init__(self, in_features, out_features, *, config):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features))


class DelayedWgradTELinear(FakeTELinear):
    """TE with delay_wgrad_compute (Megatron passes it from the config)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.wgrad_store = type("WeightGradStore", (), {"delay_wgrad_compute": lambda self: True})()


@pytest.mark.parametrize(
    "cls,kwargs,error,match",
    [
        (
            FakeTELinear,
            {"mask_refresh_interval": 2},
            ValueError,
            "_extra_state.*mask_refresh_interval=1",
        ),
        (FakeTELinear, {"fp8": "hybrid"}, ValueError, "fp8_autocast.*--fp8-format.*fp8=None"),
        (OldTELinear, {}, NotImplementedError, "TE < 2.5.*silently train dense.*2.5 or newer"),
        (DelayedWgradTELinear, {}, NotImplementedError, "delay_wgrad_compute"),
    ],
)
def test_te_linear_refuses_what_it_cannot_do(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        sparse_te_class(cls)(16, 32, config=make_config(), sparsity=SparsityConfig(**kwargs))
    with pytest.raises(ValueError, match="multiple of 4"):
        sparse_te_class(FakeTELinear)(18, 32, config=make_config(), sparsity=SparsityConfig())


class _FusedWgradGemm(torch.autograd.Function):
    """TE's GEMM with fuse_wgrad_accumulation: dY^T X goes into weight.main_grad of the tensor it was
    given, which then reports grad_added_to_main_grad and returns a dummy gradient."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        ctx.weight = weight
        return x @ weight.t()

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        ctx.weight.main_grad.add_(
            dy.reshape(-1, dy.shape[-1]).t().float() @ x.reshape(-1, x.shape[-1]).float()
        )
        ctx.weight.grad_added_to_main_grad = True
        return dy @ weight, torch.zeros_like(weight)


class FusedWgradTELinear(FakeTELinear):
    def forward(self, x):
        return _FusedWgradGemm.apply(x, self._get_weight_tensors()[0]), None


@pytest.mark.parametrize("gradient", ["ste", "masked", "srste"])
def test_te_wgrad_fusion_main_grad_equals_reference_over_micro_batches(gradient):
    """gradient_accumulation_fusion with TE: main_grad after k micro-batches equals the float64 reference,
    with srste's term exactly once in the step."""
    torch.manual_seed(3)
    cfg = make_config(gradient_accumulation_fusion=True)
    layer = sparse_te_class(FusedWgradTELinear)(
        16, 32, config=cfg, sparsity=SparsityConfig(gradient=gradient, srste_decay=0.1)
    )
    layer.weight.main_grad = torch.zeros(32, 16, dtype=torch.float32)
    layer.weight.grad_added_to_main_grad = False
    mask = weight_mask(layer.weight)
    expected = torch.zeros(32, 16, dtype=torch.float64)
    for micro_batch in range(4):
        x = torch.randn(5, 16, dtype=torch.float64)
        dy = torch.randn(5, 32, dtype=torch.float64)
        layer(x)[0].backward(dy)
        ref = masked_linear_reference(x, layer.weight, None, mask, "ste")  # the ste gradient of W*M
        expected += dy.t() @ x
    if gradient == "masked":
        expected *= mask
    if gradient == "srste":
        expected += 0.1 * (~mask) * layer.weight.detach()
    assert ref["y"] is not None
    assert layer.weight.grad_added_to_main_grad is True
    torch.testing.assert_close(layer.weight.main_grad.double(), expected, rtol=1e-6, atol=1e-6)


class TEColumnParallelLinear(ColumnParallelLinear):
    """A stand-in with TE's class name and weight hook, so sparsify_spec's TE mapping can be built on CPU."""

    def _get_weight_tensors(self):
        return [self.weight]

    def forward(self, input_, weight=None, runtime_gather_output=None):
        return super().forward(
            input_,
            weight=self._get_weight_tensors()[0],
            runtime_gather_output=runtime_gather_output,
        )


def test_sparsify_spec_maps_te_linears():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from megasparse import sparsify_spec

    spec = get_gpt_layer_local_spec()
    attention = spec.submodules.self_attention
    te_spec = dataclasses.replace(
        spec,
        submodules=dataclasses.replace(
            spec.submodules,
            self_attention=ModuleSpec(
                module=attention.module,
                params=attention.params,
                submodules=dataclasses.replace(
                    attention.submodules, linear_qkv=TEColumnParallelLinear
                ),
            ),
        ),
    )
    cfg = make_config(
        dtype=torch.float32, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64
    )
    layer = build_module(
        sparsify_spec(te_spec, SparsityConfig(), targets=("qkv",)), config=cfg, layer_number=1
    )
    qkv = layer.self_attention.linear_qkv
    assert type(qkv).__name__ == "SparseTEColumnParallelLinear" and isinstance(
        qkv, TEColumnParallelLinear
    )
    x = torch.randn(6, 2, 32)
    expected = torch.nn.functional.linear(x, qkv.weight * weight_mask(qkv.weight)) + qkv.bias
    torch.testing.assert_close(qkv(x)[0], expected)


def test_named_te_classes_need_transformer_engine():
    import megasparse.te.linear as te

    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs Transformer Engine"):
            te.SparseTEColumnParallelLinear
    else:
        assert te.SparseTEColumnParallelLinear.__name__ == "SparseTEColumnParallelLinear"


def _real_te_column(cls, sparsity, normalization="LayerNorm"):
    """A sparse Megatron TE column-parallel layer 256 -> 512 in bf16 on the GPU (real TE)."""
    cfg = make_config(
        dtype=torch.bfloat16, hidden_size=256, num_attention_heads=4, normalization=normalization
    )
    kwargs = dict(gather_output=False, bias=False, skip_bias_add=True, is_expert=False)
    return cls(
        256, 512, config=cfg, init_method=torch.nn.init.normal_, sparsity=sparsity, **kwargs
    ).cuda()


@pytest.mark.gpu
def test_real_te_linear_under_fp8_quantizes_the_masked_weight():
    te_pkg = pytest.importorskip("transformer_engine", reason="Transformer Engine is not installed")
    from transformer_engine.common.recipe import DelayedScaling

    import megasparse.te.linear as te

    layer = _real_te_column(te.SparseTEColumnParallelLinear, SparsityConfig())
    x = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16)
    with te_pkg.pytorch.fp8_autocast(enabled=True, fp8_recipe=DelayedScaling()):
        y, _ = layer(x)
    ref = x.double() @ (layer.weight.double() * layer.sparsity_mask()).t()
    assert ((y.double() - ref).norm() / ref.norm()) < 0.1


@pytest.mark.gpu
@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_real_te_layernorm_linear_runs_fp8_2_4(normalization):
    """Real TE on sm90: the sparse TELayerNormColumnParallelLinear takes the FP8 2:4 path (its
    step holds the compressed e4m3 weight) and is close to the exact norm + masked linear."""
    te_pkg = pytest.importorskip("transformer_engine", reason="Transformer Engine is not installed")
    from transformer_engine.common.recipe import Float8CurrentScaling

    import megasparse.te.linear as te
    from megasparse.fp8.gemm import fp8_cusparselt_reason

    if fp8_cusparselt_reason(torch.device("cuda")) is not None:
        pytest.skip(fp8_cusparselt_reason(torch.device("cuda")))
    sparsity = SparsityConfig(mask="transposable")
    layer = _real_te_column(te.SparseTELayerNormColumnParallelLinear, sparsity, normalization)
    x = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with te_pkg.pytorch.fp8_autocast(enabled=True, fp8_recipe=Float8CurrentScaling()):
        y, _ = layer(x)
    y.float().square().sum().backward()
    held = layer.weight_states[0].held_bytes()
    assert "fp8_weight" in held, held
    xf = x.detach().double()
    if normalization == "RMSNorm":
        ln = xf * (xf.square().mean(-1, keepdim=True) + layer.eps).rsqrt()
    else:
        ln = torch.nn.functional.layer_norm(xf, (256,), eps=layer.eps)
    ln = ln * layer.layer_norm_weight.double()
    if layer.layer_norm_bias is not None:
        ln = ln + layer.layer_norm_bias.double()
    ref = ln @ (layer.weight.double() * layer.sparsity_mask()).t()
    assert ((y.double() - ref).norm() / ref.norm()) < 0.1
    assert x.grad is not None and layer.layer_norm_weight.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_real_te_layernorm_linear_runs_bf16_2_4_on_cusparselt(normalization):
    """Real TE, bf16, no fp8_autocast: the sparse TELayerNormColumnParallelLinear runs TE's norm
    kernels, then megasparse's op on cuSPARSELt (forward and, transposable, dgrad on the per-step
    compressed operands), matching the float64 norm + masked linear in value and gradients."""
    pytest.importorskip("transformer_engine", reason="Transformer Engine is not installed")
    import megasparse.te.linear as te
    from megasparse.core.backends import BACKENDS

    reason = BACKENDS["cusparselt"].device_reason(torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    sparsity = SparsityConfig(mask="transposable", backend="cusparselt")
    layer = _real_te_column(te.SparseTELayerNormColumnParallelLinear, sparsity, normalization)
    x = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y, _ = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    (step,) = layer.weight_steps(BACKENDS["cusparselt"])
    assert type(step.compressed()).__name__.startswith("SparseSemiStructuredTensor")
    assert type(step.compressed_t()).__name__.startswith("SparseSemiStructuredTensor")
    x64 = x.detach().double().requires_grad_()
    gamma = layer.layer_norm_weight.detach().double()
    if normalization == "RMSNorm":
        ln = x64 * (x64.square().mean(-1, keepdim=True) + layer.eps).rsqrt() * gamma
    else:
        beta = layer.layer_norm_bias.detach().double()
        ln = torch.nn.functional.layer_norm(x64, (256,), gamma, beta, layer.eps)
    ref = ln @ (layer.weight.detach().double() * layer.sparsity_mask()).t()
    ref.backward(dy.double())
    assert ((y.double() - ref).norm() / ref.norm()) < 2e-2
    assert ((x.grad.double() - x64.grad).norm() / x64.grad.norm()) < 3e-2
    assert layer.layer_norm_weight.grad is not None and layer.weight.grad is not None


# --- FP8 2:4 under fp8_autocast (megasparse.te.forward) with stand-ins for TE's Linear and state ------


class Linear(torch.nn.Module):
    """Stands in for transformer_engine.pytorch.Linear: its forward reads _get_weight_tensors()."""

    def __init__(self, in_features, out_features, *, config, bias=False, return_bias=False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features))
        self.use_bias, self.return_bias, self.parallel_mode = bias, return_bias, "column"
        self.bias = torch.nn.Parameter(torch.randn(out_features)) if bias else None

    def _get_weight_tensors(self):
        return [self.weight]

    def forward(self, inp, is_first_microbatch=None):
        out = torch.nn.functional.linear(inp, self._get_weight_tensors()[0])
        if self.use_bias and not self.return_bias:
            out = out + self.bias
        return (out, self.bias) if self.return_bias else out


Linear.__module__ = "transformer_engine.pytorch.module.linear"


class TEColumnParallelLinearLike(Linear):
    """Megatron's wrapper: calls TE's forward through super() and returns (out, bias)."""

    def forward(self, x):
        out = super().forward(x, is_first_microbatch=None)
        return out if self.return_bias else (out, None)


def _delayed_recipe():
    recipe = type("DelayedScaling", (), {})()
    recipe.fp8_format, recipe.margin = type("F", (), {"name": "HYBRID"})(), 0
    recipe.amax_history_len, recipe.amax_compute_algo = 1, "max"
    return recipe


@pytest.mark.parametrize("bias,return_bias", [(False, False), (True, False), (True, True)])
def test_te_linear_runs_fp8_2_4_under_fp8_autocast(monkeypatch, bias, return_bias):
    import megasparse.te.fp8_route as te_fp8
    from megasparse.fp8.scaling import quantize_with, scale_from_amax

    torch.manual_seed(5)
    cls = sparse_te_class(TEColumnParallelLinearLike)
    assert any(c.__name__.startswith("_Megasparse") for c in cls.__mro__)
    layer = cls(
        64,
        32,
        config=make_config(),
        bias=bias,
        return_bias=return_bias,
        sparsity=SparsityConfig(mask="transposable"),
    )
    x = torch.randn(10, 64, requires_grad=True)
    exact = x.detach() @ (layer.weight.detach() * weight_mask(layer.weight, "transposable")).t()
    y_off, b_off = layer(x)
    added = layer.bias.detach() if bias and not return_bias else 0
    torch.testing.assert_close(y_off, exact + added)
    monkeypatch.setattr(te_fp8, "te_fp8_state", lambda: (True, _delayed_recipe()))
    y, b = layer(x)
    assert y.dtype == torch.float32 and (b is layer.bias if return_bias else b is None)

    def q64(t):
        s = scale_from_amax(t.abs().amax())
        return quantize_with(t, s).double() / s.double()

    wm = layer.weight.detach() * layer.sparsity_mask()
    ref = q64(x.detach()) @ q64(wm).t() + (added.double() if bias and not return_bias else 0)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)  # the FP8 path, not TE's GEMM
    assert not torch.allclose(y, y_off)
    y.sum().backward()
    assert x.grad.shape == x.shape and layer.weight.grad.shape == layer.weight.shape
    if bias and not return_bias:
        torch.testing.assert_close(layer.bias.grad, torch.full((32,), 10.0))


def test_te_linear_fp8_uses_the_modules_te_quantizer_state(monkeypatch):
    """Delayed scaling with TE's quantizers: x scaled by TE's scale, its amax in TE's buffer."""
    import megasparse.te.fp8_route as te_fp8

    layer = sparse_te_class(TEColumnParallelLinearLike)(
        64, 32, config=make_config(), sparsity=SparsityConfig()
    )
    Float8Quantizer = type("Float8Quantizer", (), {})
    fwd, bwd = Float8Quantizer(), Float8Quantizer()
    fwd.scale, fwd.amax = torch.tensor([16.0]), torch.zeros(1)
    bwd.scale, bwd.amax = torch.tensor([1024.0]), torch.zeros(1)
    layer.fp8, layer.quantizers = True, {"scaling_fwd": [fwd], "scaling_bwd": [bwd]}
    monkeypatch.setattr(te_fp8, "te_fp8_state", lambda: (True, _delayed_recipe()))
    x = torch.randn(16, 64) * 3
    y, _ = layer(x)
    assert fwd.amax.item() == x.abs().max().item()
    x_q = (x * 16).clamp(-448, 448).to(torch.float8_e4m3fn).double() / 16  # TE's scale, not amax's
    from megasparse.fp8.scaling import quantize_with, scale_from_amax

    wm = layer.weight.detach() * layer.sparsity_mask()
    s = scale_from_amax(wm.abs().amax())
    ref = x_q @ (quantize_with(wm, s).double() / s.double()).t()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert bwd.amax.item() == 1.0  # dY = ones: its amax recorded for TE's backward scale update


def test_te_fp8_route_falls_back_with_a_reason(monkeypatch):
    import megasparse.te.fp8_route as te_fp8

    layer = sparse_te_class(TEColumnParallelLinearLike)(
        64, 32, config=make_config(), sparsity=SparsityConfig()
    )
    monkeypatch.setattr(te_fp8, "te_fp8_state", lambda: (True, type("MXFP8BlockScaling", (), {})()))
    with pytest.warns(UserWarning, match="block-scaled"):
        assert te_fp8.fp8_route(layer) is None
    monkeypatch.setattr(te_fp8, "te_fp8_state", lambda: (True, _delayed_recipe()))
    assert te_fp8.fp8_route(layer) is not None
    layer.sparsity.backend = "dense"
    assert te_fp8.fp8_route(layer) is None


# --- FP8 2:4 in TE's LayerNormLinear and GroupedLinear (stand-ins with TE's names and contracts) --

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def dq64(t, dtype=E4M3):
    """t as the FP8 path quantizes it under current scaling, dequantized to float64: scale =
    fp8_max / amax(t) in fp32, t * scale saturated and rounded to `dtype`, divided by the scale."""
    t = t.detach().float()
    fmax = torch.finfo(dtype).max
    scale = torch.tensor(fmax, dtype=torch.float32) / t.abs().amax()
    return (t * scale).clamp(-fmax, fmax).to(dtype).double() / scale.double()


def master_grad64(grad_wm, weight, mask, gradient, decay):
    """What the dense master weight receives from the gradient of W*M (DESIGN.md's modes)."""
    if gradient == "masked":
        return grad_wm * mask
    if gradient == "srste":
        return grad_wm + decay * (~mask) * weight.detach().double()
    return grad_wm


@pytest.mark.parametrize(
    "normalization,zero_centered,mask,gradient,fmt",
    [
        ("LayerNorm", False, "transposable", "ste", "HYBRID"),
        ("LayerNorm", True, "1d", "masked", "HYBRID"),
        ("RMSNorm", False, "1d", "srste", "E4M3"),
        ("RMSNorm", True, "transposable", "srste", "HYBRID"),
    ],
)
def test_te_layernorm_linear_fp8_2_4_against_float64(
    monkeypatch, normalization, zero_centered, mask, gradient, fmt
):
    """Forward, input / weight / norm-parameter gradients of the FP8 2:4 LayerNormLinear equal the
    float64 norm followed by float64 products of the dequantized operands the op quantizes."""
    import megasparse.te.fp8_route as te_fp8

    torch.manual_seed(21)
    sparsity = SparsityConfig(mask=mask, gradient=gradient, srste_decay=0.1)
    layer = sparse_te_class(TELayerNormLinearLike)(
        64,
        32,
        config=make_config(),
        eps=1e-3,
        normalization=normalization,
        zero_centered_gamma=zero_centered,
        bias=True,
        sparsity=sparsity,
    )
    x = (torch.randn(3, 7, 64) * 2 + 0.5).requires_grad_(True)  # 21 tokens: padded to 32
    dy = torch.randn(3, 7, 32)
    monkeypatch.setattr(te_fp8, "te_fp8_state", lambda: (True, current_recipe(fmt)))
    y = layer(x)
    y.backward(dy)

    grad_dtype = E4M3 if fmt == "E4M3" else E5M2
    dgrad_dtype = E4M3 if mask == "transposable" else grad_dtype  # cuSPARSELt's dgrad takes e4m3
    m = weight_mask(layer.weight, mask)
    assert torch.equal(layer.sparsity_mask(), m)
    x64 = x.detach().double().requires_grad_(True)
    g64 = layer.layer_norm_weight.detach().double().requires_grad_(True)
    b64 = layer.layer_norm_bias
    b64 = None if b64 is None else b64.detach().double().requires_grad_(True)
    ln = norm64(x64, g64, b64, normalization, 1e-3, zero_centered).reshape(-1, 64)
    ln_q, w_q, dy2 = dq64(ln), dq64(layer.weight.detach() * m), dy.reshape(-1, 32)
    y_ref = ln_q @ w_q.t() + layer.bias.detach().double()
    ln.backward(dq64(dy2, dgrad_dtype) @ w_q)  # the input-gradient GEMM, then the norm's backward
    dw_ref = dq64(dy2, grad_dtype).t() @ ln_q
    torch.testing.assert_close(y.double().reshape(-1, 32), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        layer.layer_norm_weight.grad.double(), g64.grad, rtol=1e-4, atol=1e-4
    )
    if b64 is not None:
        torch.testing.assert_close(
            layer.layer_norm_bias.grad.double(), b64.grad, rtol=1e-4, atol=1e-4
        )
    expected_w = master_grad64(dw_ref, layer.weight, m, gradient, 0.1)
    torch.testing.assert_close(layer.weight.grad.double(), expected_w, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.bias.grad.double(), dy2.double().sum(0), rtol=1e-5, atol=1e-5)
    # FP8 error only: close to the exact masked layer, and not TE's (stand-in) dense forward
    exact = ln.detach() @ (layer.weight.detach().double() * m).t() + layer.bias.detach().double()
    assert ((y.double().reshape(-1, 32) - exact).norm() / exact.norm()) < 0.08
    assert not torch.equal(y.double().reshape(-1, 32), exact.to(y.dtype).double())


@pytest.mark.parametrize(
    "bias,return_bias,return_ln,gathered",
    [
        (False, False, False, False),
        (True, True, False, False),
        (True, False, True, False),
        (True, True, True, False),
        (False, False, True, True),
    ],
)
def test_te_layernorm_linear_fp8_returns_what_te_returns(
    monkeypatch, bias, return_bias, return_ln, gathered
):
    """TE's output order: out | (out, bias) | (out, ln_out) | (out, bias, ln_out). ln_out is the
    norm output and carries its gradient back to the input, except the gathered one (TE's backward
    drops it: layernorm_linear.py adds grad_outputs[1] only when not gathered)."""
    import megasparse.te.fp8_route as te_fp8

    torch.manual_seed(22)
    layer = sparse_te_class(TELayerNormLinearLike)(
        64,
        32,
        config=make_config(),
        bias=bias,
        return_bias=return_bias,
        return_layernorm_output=return_ln,
        return_layernorm_output_gathered=gathered,
        sequence_parallel=gathered,  # TP=1: the all-gather is the identity
        sparsity=SparsityConfig(mask="1d"),
    )
    x = torch.randn(16, 64, requires_grad=True)
    off = layer(x)  # TE's own forward (fp8_autocast off): the structure to match
    monkeypatch.setattr(te_fp8, "te_fp8_state", lambda: (True, current_recipe()))
    outputs = layer(x)
    assert type(outputs) is type(off) and (not isinstance(off, tuple) or len(outputs) == len(off))
    out = outputs[0] if isinstance(outputs, tuple) else outputs
    if return_bias:
        assert outputs[1] is layer.bias
    elif bias:  # the bias is in the GEMM
        no_bias = out - layer.bias.detach()
        assert not torch.allclose(no_bias, out)
    ln64 = norm64(
        x.detach().double(),
        layer.layer_norm_weight.detach().double(),
        layer.layer_norm_bias.detach().double(),
        "LayerNorm",
        1e-5,
        False,
    )
    w_q = dq64(layer.weight.detach() * layer.sparsity_mask())
    expected = dq64(ln64) @ w_q.t() + (
        layer.bias.detach().double() if bias and not return_bias else 0
    )
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    if not return_ln:
        return
    ln_out = outputs[-1]
    torch.testing.assert_close(ln_out.double(), ln64, rtol=1e-5, atol=1e-5)
    assert ln_out.requires_grad is not gathered
    dy, dln = torch.randn(16, 32), torch.randn(16, 64)
    loss = (out * dy).sum() + ((ln_out * dln).sum() if not gathered else 0)
    loss.backward()
    x64 = x.detach().double().requires_grad_(True)
    ln_ref = norm64(
        x64,
        layer.layer_norm_weight.detach().double(),
        layer.layer_norm_bias.detach().double(),
        "LayerNorm",
        1e-5,
        False,
    )
    dgrad = dq64(dy, E5M2) @ w_q  # 1d masks, HYBRID: the dense dgrad takes e5m2 dY
    ln_ref.backward(dgrad + (0 if gathered else dln.double()))
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)


def test_te_layernorm_linear_falls_back_for_fp8_output(monkeypatch):
    import megasparse.te.fp8_route as te_fp8

    layer = sparse_te_class(TELayerNormLinearLike)(
        64, 32, config=make_config(), sparsity=SparsityConfig()
    )
    x = torch.randn(16, 64)
    off = layer(x)
    monkeypatch.setattr(te_fp8, "te_fp8_state", lambda: (True, current_recipe()))
    with pytest.warns(UserWarning, match="fp8_output"):
        y = layer(x, fp8_output=True)
    assert torch.equal(y, off)  # TE's own forward ran
    assert not torch.equal(layer(x), off)


SPLITS = [5, 0, 11, 3]  # uneven, one expert without tokens


@pytest.mark.parametrize(
    "mask,gradient,bias,return_bias,splits_as_tensor",
    [
        ("1d", "ste", False, False, False),
        ("transposable", "masked", True, False, True),
        ("1d", "srste", True, True, False),
        ("transposable", "srste", False, False, True),
    ],
)
def test_te_grouped_linear_fp8_2_4_per_expert_against_float64(
    monkeypatch, mask, gradient, bias, return_bias, splits_as_tensor
):
    """One FP8 2:4 GEMM per expert with its own mask and per-tensor scales; the expert without
    tokens gets a zero gradient (plus srste's per-step term); biases per expert as TE."""
    import megasparse.te.fp8_route as te_fp8

    torch.manual_seed(23)
    layer = sparse_te_class(TEGroupedLinearLike)(
        4,
        64,
        32,
        bias=bias,
        return_bias=return_bias,
        sparsity=SparsityConfig(mask=mask, gradient=gradient, srste_decay=0.1),
    )
    x = torch.randn(sum(SPLITS), 64, requires_grad=True)
    dy = torch.randn(sum(SPLITS), 32)
    splits = torch.tensor(SPLITS) if splits_as_tensor else SPLITS
    y_off, _ = layer(x, splits)
    monkeypatch.setattr(te_fp8, "te_fp8_state", lambda: (True, current_recipe()))
    y, b = layer(x, splits)
    y.backward(dy)
    biases = [getattr(layer, f"bias{i}") for i in range(4)]
    if return_bias:
        assert isinstance(b, list) and all(r is p for r, p in zip(b, biases))
    else:
        assert b is None
    dgrad_dtype = E4M3 if mask == "transposable" else E5M2
    starts = [sum(SPLITS[:i]) for i in range(4)]
    assert not torch.allclose(y, y_off)
    for i, (start, n) in enumerate(zip(starts, SPLITS)):
        w = getattr(layer, f"weight{i}")
        m = weight_mask(w, mask)
        assert torch.equal(layer.sparsity_mask(w), m)
        w_q = dq64(w.detach() * m)
        rows = slice(start, start + n)
        added = biases[i].detach().double() if bias and not return_bias else 0
        if n:
            x_q, dy_i = dq64(x.detach()[rows]), dy[rows]
            y_ref = x_q @ w_q.t() + added
            dx_ref = dq64(dy_i, dgrad_dtype) @ w_q
            dw_ref = dq64(dy_i, E5M2).t() @ x_q
        else:
            y_ref, dx_ref = torch.zeros(0, 32).double(), torch.zeros(0, 64).double()
            dw_ref = torch.zeros(32, 64).double()
        torch.testing.assert_close(y[rows].double(), y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad[rows].double(), dx_ref, rtol=1e-5, atol=1e-5)
        expected = master_grad64(dw_ref, w, m, gradient, 0.1)
        torch.testing.assert_close(w.grad.double(), expected, rtol=1e-5, atol=1e-4)
        if bias and not return_bias:
            db_ref = dy[rows].double().sum(0)
            torch.testing.assert_close(biases[i].grad.double(), db_ref, rtol=1e-5, atol=1e-5)
    if gradient == "srste":  # the empty expert's gradient is the per-step decay alone
        assert layer.weight1.grad.abs().sum() > 0


def test_te_grouped_linear_fp8_uses_each_gemms_te_quantizers(monkeypatch):
    """Delayed scaling with TE's quantizers: GEMM i's input uses scaling_fwd[3 i] (its scale; its
    amax recorded there), its output gradient scaling_bwd[2 i]; the other slots stay untouched."""
    import megasparse.te.fp8_route as te_fp8

    torch.manual_seed(24)
    layer = sparse_te_class(TEGroupedLinearLike)(3, 64, 32, sparsity=SparsityConfig())
    Float8Quantizer = type("Float8Quantizer", (), {})

    def quantizer(scale):
        q = Float8Quantizer()
        q.scale, q.amax = torch.tensor([scale]), torch.zeros(1)
        return q

    fwd = [quantizer(2.0 ** (i + 2)) for i in range(9)]
    bwd = [quantizer(2.0 ** (i + 8)) for i in range(6)]
    layer.fp8, layer.quantizers = True, {"scaling_fwd": fwd, "scaling_bwd": bwd}
    monkeypatch.setattr(te_fp8, "te_fp8_state", lambda: (True, _delayed_recipe()))
    splits = [6, 10, 0]
    x = torch.randn(16, 64) * 3
    y, _ = layer(x, splits)
    y.backward(torch.ones_like(y))
    for i, (start, n) in enumerate(zip([0, 6, 16], splits)):
        w = getattr(layer, f"weight{i}")
        if n == 0:
            assert fwd[3 * i].amax.item() == 0 and bwd[2 * i].amax.item() == 0
            continue
        x_i = x[start : start + n]
        assert fwd[3 * i].amax.item() == x_i.abs().max().item() and bwd[2 * i].amax.item() == 1.0
        s = fwd[3 * i].scale
        x_q = (x_i * s).clamp(-448, 448).to(E4M3).double() / s.double()  # TE's scale, not amax's
        ref = x_q @ dq64(w.detach() * layer.sparsity_mask(w)).t()
        torch.testing.assert_close(y[start : start + n].double(), ref, rtol=1e-5, atol=1e-5)
    assert all(q.amax.item() == 0 for j, q in enumerate(fwd) if j % 3)
    assert all(q.amax.item() == 0 for j, q in enumerate(bwd) if j % 2)


def test_te_grouped_linear_falls_back_for_what_it_does_not_reproduce(monkeypatch):
    import megasparse.te.fp8_route as te_fp8
    import megasparse.te.forward as te_forward

    layer = sparse_te_class(TEGroupedLinearLike)(2, 64, 32, sparsity=SparsityConfig())
    layer.single_grouped_weight = True
    monkeypatch.setattr(te_fp8, "te_fp8_state", lambda: (True, current_recipe()))
    with pytest.warns(UserWarning, match="single grouped weight"):
        assert te_fp8.fp8_route(layer, te_forward._grouped_unsupported(layer, {})) is None
    layer.single_grouped_weight = False
    recipe = current_recipe()
    recipe.backward_override = "high_precision"
    monkeypatch.setattr(te_fp8, "te_fp8_state", lambda: (True, recipe))
    with pytest.warns(UserWarning, match="backward_override"):
        assert te_fp8.fp8_route(layer) is None


def test_sparse_te_linears_are_public_names_that_need_transformer_engine():
    """`from megasparse import SparseTEColumnParallelLinear` works where TE is installed and
    names the install otherwise."""
    import megasparse

    for name in (
        "SparseTEColumnParallelLinear",
        "SparseTERowParallelLinear",
        "SparseTELayerNormColumnParallelLinear",
    ):
        assert name in megasparse.__all__
        try:
            import transformer_engine  # noqa: F401
        except ImportError:
            with pytest.raises(ImportError, match="needs Transformer Engine >= 2.5"):
                getattr(megasparse, name)
        else:
            assert getattr(megasparse, name).__name__ == name
