"""Sparse TE linears: the mask/gradient logic with stand-ins for TE (which needs CUDA); real TE is gpu-marked."""

import dataclasses

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear

from megasparse import SparsityConfig
from megasparse.ops import weight_mask
from megasparse.te import sparse_te_class
from megatron_helpers import make_config
from reference import masked_linear_reference

pytestmark = pytest.mark.usefixtures("megatron_tp1")


class FakeTELinear(torch.nn.Module):
    """What the sparse classes rely on in TE: a `weight` and a forward that reads `_get_weight_tensors()`."""

    def __init__(self, in_features, out_features, *, config):
        super().__init__()
        self.config = config
        self.weight = torch.nn.Parameter(
            torch.randn(out_features, in_features, dtype=config.params_dtype)
        )

    def _get_weight_tensors(self):
        return [self.weight]

    def forward(self, x):
        return torch.nn.functional.linear(x, self._get_weight_tensors()[0]), None


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
            {"activations": "2:4"},
            ValueError,
            "activation sparsity is not available in TE linears",
        ),
        (
            FakeTELinear,
            {"mask_refresh_interval": 2},
            ValueError,
            "_extra_state.*mask_refresh_interval=1",
        ),
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
    with pytest.raises(NotImplementedError, match="cannot sparsify activations"):
        from megatron.core.tensor_parallel import RowParallelLinear

        class TERowParallelLinear(RowParallelLinear):
            pass

        mlp = spec.submodules.mlp
        from megasparse.compat import LINEARS_ARE_BUILDERS

        sub = mlp.keywords["submodules"] if LINEARS_ARE_BUILDERS else mlp.submodules
        sub = dataclasses.replace(sub, linear_fc2=TERowParallelLinear)
        import functools

        mlp = (
            functools.partial(mlp.func, submodules=sub)
            if LINEARS_ARE_BUILDERS
            else dataclasses.replace(mlp, submodules=sub)
        )
        te_mlp_spec = dataclasses.replace(
            spec, submodules=dataclasses.replace(spec.submodules, mlp=mlp)
        )
        sparsify_spec(te_mlp_spec, SparsityConfig(activations="2:4"), targets=("fc2",))


def test_named_te_classes_need_transformer_engine():
    import megasparse.te as te

    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs Transformer Engine"):
            te.SparseTEColumnParallelLinear
    else:
        assert te.SparseTEColumnParallelLinear.__name__ == "SparseTEColumnParallelLinear"


@pytest.mark.gpu
def test_real_te_linear_under_fp8_quantizes_the_masked_weight():
    te_pkg = pytest.importorskip("transformer_engine", reason="Transformer Engine is not installed")
    from transformer_engine.common.recipe import DelayedScaling

    import megasparse.te as te

    cfg = make_config(dtype=torch.bfloat16, hidden_size=256, num_attention_heads=4)
    layer = te.SparseTEColumnParallelLinear(
        256,
        512,
        config=cfg,
        init_method=torch.nn.init.normal_,
        gather_output=False,
        bias=False,
        skip_bias_add=True,
        is_expert=False,
        sparsity=SparsityConfig(),
    ).cuda()
    x = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16)
    with te_pkg.pytorch.fp8_autocast(enabled=True, fp8_recipe=DelayedScaling()):
        y, _ = layer(x)
    ref = x.double() @ (layer.weight.double() * layer.sparsity_mask()).t()
    assert ((y.double() - ref).norm() / ref.norm()) < 0.1


# --- FP8 2:4 under fp8_autocast (megasparse.te_fp8) with stand-ins for TE's Linear and state ------


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
    import megasparse.te_fp8 as te_fp8
    from megasparse.fp8_recipe import quantize_with, scale_from_amax

    torch.manual_seed(5)
    cls = sparse_te_class(TEColumnParallelLinearLike)
    assert any(c.__name__.startswith("_MegasparseFp8") for c in cls.__mro__)
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
    import megasparse.te_fp8 as te_fp8

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
    from megasparse.fp8_recipe import quantize_with, scale_from_amax

    wm = layer.weight.detach() * layer.sparsity_mask()
    s = scale_from_amax(wm.abs().amax())
    ref = x_q @ (quantize_with(wm, s).double() / s.double()).t()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert bwd.amax.item() == 1.0  # dY = ones: its amax recorded for TE's backward scale update


def test_te_fp8_route_falls_back_with_a_reason(monkeypatch):
    import megasparse.te_fp8 as te_fp8

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
