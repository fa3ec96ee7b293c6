"""The sparse linears drop into a Megatron GPT layer spec (0.16: ModuleSpec params; 0.19: functools.partial).

Independent reference: the dense layer from the untouched spec, with each linear's weight
replaced by W*M. The sparse layer must compute exactly that.
"""

import dataclasses
import functools

import pytest
import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import build_module

from megasparse import SparseColumnParallelLinear, SparseRowParallelLinear, SparsityConfig
from megasparse.megatron.compat import linear_entry
from megatron_helpers import make_config

pytestmark = pytest.mark.usefixtures("megatron_tp1")

LINEARS = {
    "linear_qkv": SparseColumnParallelLinear,
    "linear_proj": SparseRowParallelLinear,
    "linear_fc1": SparseColumnParallelLinear,
    "linear_fc2": SparseRowParallelLinear,
}


def _swap(submodules, names, sparsity):
    changes = {n: linear_entry(LINEARS[n], sparsity) for n in names if hasattr(submodules, n)}
    return dataclasses.replace(submodules, **changes)


def _sparse_layer_spec(sparsity, mlp_sparsity=None):
    mlp_sparsity = mlp_sparsity or sparsity
    spec = get_gpt_layer_local_spec()
    layer = spec.submodules
    attention = layer.self_attention
    attention = dataclasses.replace(
        attention, submodules=_swap(attention.submodules, LINEARS, sparsity)
    )
    mlp = layer.mlp
    if isinstance(mlp, functools.partial):  # 0.19 builder form
        mlp = functools.partial(
            mlp.func,
            *mlp.args,
            **{
                **mlp.keywords,
                "submodules": _swap(mlp.keywords["submodules"], LINEARS, mlp_sparsity),
            },
        )
    else:
        mlp = dataclasses.replace(mlp, submodules=_swap(mlp.submodules, LINEARS, mlp_sparsity))
    return dataclasses.replace(
        spec, submodules=dataclasses.replace(layer, self_attention=attention, mlp=mlp)
    )


@pytest.mark.parametrize("mask", ["1d", "transposable"])
def test_sparse_gpt_layer_equals_dense_layer_with_masked_weights(mask):
    """On 0.16 the linears are ModuleSpecs, on 0.19 functools.partial builders (megasparse.megatron.compat)."""
    cfg = make_config(
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=True,
    )
    torch.manual_seed(0)
    sparse = build_module(
        _sparse_layer_spec(SparsityConfig(mask=mask, backend="dense")), config=cfg, layer_number=1
    )
    dense = build_module(get_gpt_layer_local_spec(), config=cfg, layer_number=1)
    sparse, dense = sparse.double(), dense.double()  # the local LayerNorm ignores params_dtype
    dense.load_state_dict(sparse.state_dict())
    masked = 0
    with torch.no_grad():
        for name, module in sparse.named_modules():
            if isinstance(module, (SparseColumnParallelLinear, SparseRowParallelLinear)):
                dense.get_submodule(name).weight.mul_(module.sparsity_mask())
                masked += 1
    assert masked == 4
    x = torch.randn(12, 2, 64, dtype=torch.float64)
    causal = torch.triu(torch.ones(1, 1, 12, 12, dtype=torch.bool), diagonal=1)  # True = masked out
    xs, xd = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ys, yd = sparse(xs, attention_mask=causal)[0], dense(xd, attention_mask=causal)[0]
    torch.testing.assert_close(ys, yd, rtol=1e-10, atol=1e-10)
    ys.sum().backward()
    yd.sum().backward()
    torch.testing.assert_close(xs.grad, xd.grad, rtol=1e-10, atol=1e-10)
    # ste: the dense master weight gets the gradient of the masked product, which is what the
    # dense-with-masked-weights layer computes for its (already masked) weight
    for name, module in sparse.named_modules():
        if isinstance(module, (SparseColumnParallelLinear, SparseRowParallelLinear)):
            torch.testing.assert_close(
                module.weight.grad, dense.get_submodule(name).weight.grad, rtol=1e-10, atol=1e-10
            )


def _with_sparse_mlp(spec):
    """Swap the layer's MLP class for SparseMLP in whichever form this megatron-core uses."""
    from megasparse import SparseMLP

    layer = spec.submodules
    mlp = layer.mlp
    if isinstance(mlp, functools.partial):
        mlp = functools.partial(SparseMLP.as_mlp_submodule, *mlp.args, **mlp.keywords)
    else:
        mlp = dataclasses.replace(mlp, module=SparseMLP)
    return dataclasses.replace(spec, submodules=dataclasses.replace(layer, mlp=mlp))


def test_sparse_mlp_in_gpt_layer_spec_sparsifies_the_activation():
    from megatron.core.activations import squared_relu

    from megasparse import SparseMLP

    cfg = make_config(
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_func=squared_relu,
    )
    spec = _sparse_layer_spec(
        SparsityConfig(backend="dense"), SparsityConfig(activations="2:4", backend="dense")
    )
    torch.manual_seed(0)
    sparse = build_module(_with_sparse_mlp(spec), config=cfg, layer_number=1).double()
    assert isinstance(sparse.mlp, SparseMLP)
    torch.manual_seed(0)
    dense = build_module(get_gpt_layer_local_spec(), config=cfg, layer_number=1).double()
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(12, 2, 64, dtype=torch.float64)
    causal = torch.triu(torch.ones(1, 1, 12, 12, dtype=torch.bool), diagonal=1)
    y_sparse = sparse(x, attention_mask=causal)[0]
    assert sparse.mlp.activation_stats()["elements"] == 12 * 2 * 128
    for module in sparse.modules():
        if hasattr(module, "sparsity"):
            module.sparsity.enabled = False
    assert not torch.equal(y_sparse, sparse(x, attention_mask=causal)[0])
    assert torch.equal(
        sparse(x, attention_mask=causal)[0], dense(x, attention_mask=causal)[0]
    )  # dense phase
