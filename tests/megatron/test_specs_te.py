"""sparsify_spec on a Transformer Engine GPT layer spec (Megatron's TE spec's MLP: fc1
TELayerNormColumnParallelLinear, fc2 TERowParallelLinear, no pre-MLP norm; CPU stand-ins with the
wrappers' constructors), in the spec form of the installed megatron-core (0.16 ModuleSpec, 0.19
builders): with activation sparsity the MLP becomes SparseMLP over sparse TE linears and trains
on the bf16 route; weights only keep Megatron's own MLP class; TEFusedMLP is refused."""

import dataclasses
import functools
import logging

import pytest
import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec

from megasparse import SparseMLP, SparsityConfig, sparsify_spec
from megasparse.megatron.compat import LINEARS_ARE_BUILDERS
from megasparse.te import sparse_route
from test_specs import _build as build_layer
from test_specs import _config as specs_config
from te_mlp_standins import TELayerNormColumnParallelLinear, TERowParallelLinear

pytestmark = pytest.mark.usefixtures("megatron_tp1")


def _te_layer_spec(mlp_class=MLP):
    """Megatron's local GPT layer spec with the TE spec's MLP (norm fused into fc1)."""
    spec = get_gpt_layer_local_spec()
    mlp = spec.submodules.mlp
    sub = mlp.keywords["submodules"] if LINEARS_ARE_BUILDERS else mlp.submodules
    sub = dataclasses.replace(
        sub, linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear
    )
    if LINEARS_ARE_BUILDERS:
        mlp = functools.partial(getattr(mlp_class, mlp.func.__name__), submodules=sub)
    else:
        mlp = ModuleSpec(module=mlp_class, submodules=sub)
    layer = dataclasses.replace(spec.submodules, mlp=mlp, pre_mlp_layernorm=IdentityOp)
    return dataclasses.replace(spec, submodules=layer)


def _build(spec):
    return build_layer(spec, specs_config())


def _train_step(layer):
    causal = torch.triu(torch.ones(1, 1, 8, 8, dtype=torch.bool), diagonal=1)
    x = torch.randn(8, 2, 32, requires_grad=True)
    out = layer(x, attention_mask=causal)[0]
    out.sum().backward()
    return out


@pytest.mark.parametrize("activations", ["2:4", "64:2:16"])
@pytest.mark.parametrize("weights", [None, "2:4"])
def test_te_spec_with_activation_sparsity_builds_sparse_mlp_over_sparse_te_linears(
    activations, weights, monkeypatch
):
    spec = _te_layer_spec()
    before = repr(spec)
    sparsity = SparsityConfig(weights=weights, activations=activations, backend="dense")
    layer = _build(sparsify_spec(spec, sparsity, targets=("fc1", "fc2")))
    assert repr(spec) == before
    mlp = layer.mlp
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    assert type(mlp) is SparseMLP
    assert type(fc1).__name__ == "SparseTELayerNormColumnParallelLinear"
    assert type(fc2).__name__ == "SparseTERowParallelLinear"
    assert fc2.sparsity.activations == activations and fc1.sparsity.activations is None
    assert fc2.input_sparsified_upstream and fc1._fed_fc2() is fc2
    calls = []
    real = sparse_route.sparse_linear_step
    monkeypatch.setattr(sparse_route, "sparse_linear_step", lambda *a: calls.append(1) or real(*a))
    out = _train_step(layer)
    assert torch.isfinite(out).all() and len(calls) == 2  # fc1 and fc2 on the route
    assert mlp.activation_stats()["elements"] == 8 * 2 * 64
    assert fc1.weight.grad is not None and fc2.weight.grad is not None


def test_weight_only_spec_keeps_megatrons_mlp_class(caplog):
    for spec in (_te_layer_spec(), get_gpt_layer_local_spec()):
        sparse = sparsify_spec(spec, SparsityConfig(backend="dense"), targets=("fc1", "fc2"))
        with caplog.at_level(logging.WARNING):
            layer = _build(sparse)
        assert type(layer.mlp) is MLP  # the layer passes it what it passes an MLP
        assert "Unknown MLP type" not in caplog.text
        assert hasattr(layer.mlp.linear_fc1, "weight_steps") or hasattr(
            layer.mlp.linear_fc1, "weight_state"
        )
        _train_step(layer)


def test_te_fused_mlp_is_refused():
    class TEFusedMLP(MLP):  # Megatron's class for use_te_op_fuser (stand-in: its name)
        pass

    with pytest.raises(NotImplementedError, match="TEFusedMLP.*use_te_op_fuser=False"):
        sparsify_spec(_te_layer_spec(TEFusedMLP), SparsityConfig(activations="2:4"))
