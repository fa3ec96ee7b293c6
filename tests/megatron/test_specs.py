"""sparsify_spec on Megatron's GPT specs (0.16 ModuleSpec form, 0.19 builder form), dense and MoE."""

import pytest
import torch
from megatron.core.activations import squared_relu
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import build_module

from megasparse import (
    SparseColumnParallelLinear,
    SparseMLP,
    SparseRowParallelLinear,
    SparsityConfig,
    sparsify_spec,
)
from megasparse.megatron.experts import SparseSequentialMLP
from megatron_helpers import make_config

pytestmark = pytest.mark.usefixtures("megatron_tp1")

ALL_DENSE = ("qkv", "proj", "fc1", "fc2")


def _config(**kw):
    return make_config(
        dtype=torch.float32,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        activation_func=squared_relu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **kw,
    )


def _build(spec, cfg):
    from megatron.core.transformer.moe.moe_layer import MoELayer  # noqa: F401  (0.19 builds by calling)

    return build_module(spec, config=cfg, layer_number=1)


def test_dense_layer_all_linears_sparse_and_input_untouched():
    spec = get_gpt_layer_local_spec()
    before = repr(spec)
    sparsity = SparsityConfig(activations="2:4", backend="dense")
    layer = _build(sparsify_spec(spec, sparsity, targets=ALL_DENSE), _config())
    assert repr(spec) == before  # a new spec; the input is untouched
    attn = layer.self_attention
    assert isinstance(attn.linear_qkv, SparseColumnParallelLinear) and isinstance(
        attn.linear_proj, SparseRowParallelLinear
    )
    assert isinstance(layer.mlp, SparseMLP)
    assert isinstance(layer.mlp.linear_fc1, SparseColumnParallelLinear) and isinstance(
        layer.mlp.linear_fc2, SparseRowParallelLinear
    )
    # activation sparsity reaches fc2 only; the attention projection keeps a dense input
    assert layer.mlp.linear_fc2.sparsity.activations == "2:4"
    assert (
        attn.linear_proj.sparsity.activations is None
        and layer.mlp.linear_fc1.sparsity.activations is None
    )
    causal = torch.triu(torch.ones(1, 1, 8, 8, dtype=torch.bool), diagonal=1)
    out = layer(torch.randn(8, 2, 32), attention_mask=causal)[0]
    assert out.shape == (8, 2, 32) and layer.mlp.activation_stats()["elements"] == 8 * 2 * 64


def test_only_the_chosen_targets_change():
    layer = _build(
        sparsify_spec(get_gpt_layer_local_spec(), SparsityConfig(), targets=["fc2"]), _config()
    )
    assert type(layer.self_attention.linear_qkv).__name__ == "ColumnParallelLinear"
    assert type(layer.mlp.linear_fc1).__name__ == "ColumnParallelLinear"
    assert isinstance(layer.mlp.linear_fc2, SparseRowParallelLinear)


def test_moe_layer_experts_and_shared_experts():
    spec = get_gpt_layer_local_spec(num_experts=4)
    cfg = _config(
        num_moe_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=64,
        add_bias_linear=False,
        moe_shared_expert_intermediate_size=64,
        moe_token_dispatcher_type="allgather",
    )
    sparse = sparsify_spec(
        spec,
        SparsityConfig(activations="2:4", backend="dense"),
        targets=("experts", "shared_experts"),
    )
    layer = _build(sparse, cfg)
    assert isinstance(layer.mlp.experts, SparseSequentialMLP)
    assert all(
        isinstance(e.linear_fc1, SparseColumnParallelLinear)
        for e in layer.mlp.experts.local_experts
    )
    assert isinstance(layer.mlp.shared_experts.linear_fc2, SparseRowParallelLinear)
    causal = torch.triu(torch.ones(1, 1, 8, 8, dtype=torch.bool), diagonal=1)
    out = layer(torch.randn(8, 2, 32), attention_mask=causal)[0]
    out.sum().backward()
    assert layer.mlp.experts.activation_stats()["elements"] > 0


def test_block_spec_rewrites_every_layer():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    cfg = _config(
        num_layers=3,
        num_moe_experts=4,
        moe_layer_freq=[0, 1, 0],
        moe_ffn_hidden_size=64,
        add_bias_linear=False,
        moe_router_topk=2,
    )
    block = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False)
    sparse = sparsify_spec(block, SparsityConfig(), targets=("fc1", "fc2", "experts"))
    from megatron.core.transformer.moe.moe_layer import MoELayer

    for i, layer_spec in enumerate(sparse.layer_specs):
        layer = _build(layer_spec, cfg)
        if isinstance(layer.mlp, MoELayer):
            assert i == 1 and isinstance(layer.mlp.experts, SparseSequentialMLP)
        else:  # weights only: Megatron's own MLP class over the sparse linears
            assert type(layer.mlp).__name__ == "MLP"
            assert isinstance(layer.mlp.linear_fc1, SparseColumnParallelLinear)


def test_bad_targets_and_specs_are_clear_errors():
    spec = get_gpt_layer_local_spec()
    with pytest.raises(ValueError, match="unknown targets \\['embedding'\\]"):
        sparsify_spec(spec, SparsityConfig(), targets=("fc1", "embedding"))
    with pytest.raises(ValueError, match="targets \\['experts'\\] do not occur in this spec"):
        sparsify_spec(spec, SparsityConfig(), targets=("experts",))
    with pytest.raises(TypeError, match="expected a GPT layer or block spec"):
        sparsify_spec(object(), SparsityConfig())
    with pytest.raises(TypeError, match="SparsityConfig"):
        sparsify_spec(spec, {"weights": "2:4"})


def test_te_linears_without_a_sparse_variant_get_a_clear_error():
    import dataclasses

    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec

    class TEFusedQKVLinear(
        ColumnParallelLinear
    ):  # a TE-named class megasparse has no sparse variant for
        pass

    spec = get_gpt_layer_local_spec()
    attention = spec.submodules.self_attention
    fake_te = dataclasses.replace(
        spec,
        submodules=dataclasses.replace(
            spec.submodules,
            self_attention=ModuleSpec(
                module=attention.module,
                params=attention.params,
                submodules=dataclasses.replace(attention.submodules, linear_qkv=TEFusedQKVLinear),
            ),
        ),
    )
    with pytest.raises(
        NotImplementedError, match="Transformer Engine's TEFusedQKVLinear.*--transformer-impl local"
    ):
        sparsify_spec(fake_te, SparsityConfig(), targets=("qkv",))


def test_te_spec_without_transformer_engine_gets_megasparse_error_first():
    """Without TE, Megatron's TE spec builder fails obscurely (NameError on 0.16, TypeError on 0.19):
    megasparse's Megatron-LM spec and sparsify_spec say what to do before that happens."""
    import argparse
    import dataclasses

    from megatron.core.extensions import transformer_engine as mcore_te
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megasparse.megatron.args import add_args
    from megasparse.megatron_lm import gpt_layer_spec_from_args

    if getattr(mcore_te, "HAVE_TE", False):
        pytest.skip("Transformer Engine is installed here")
    args = add_args(argparse.ArgumentParser()).parse_args(["--sparsity-weights", "2:4"])
    args.transformer_impl = "transformer_engine"
    with pytest.raises(ImportError, match=r"needs Transformer Engine.*--transformer-impl local"):
        gpt_layer_spec_from_args(args)
    te_class = getattr(mcore_te, "TEColumnParallelLinear", None)
    if not isinstance(te_class, type):
        pytest.skip("this megatron-core defines no TE class without Transformer Engine")
    spec = get_gpt_layer_local_spec()
    attention = spec.submodules.self_attention
    te_attention = ModuleSpec(
        module=attention.module,
        params=attention.params,
        submodules=dataclasses.replace(attention.submodules, linear_qkv=te_class),
    )
    te_spec = dataclasses.replace(
        spec, submodules=dataclasses.replace(spec.submodules, self_attention=te_attention)
    )
    fix = r"sparsify_spec: qkv \(TEColumnParallelLinear\) needs Transformer Engine"
    with pytest.raises(ImportError, match=fix):
        sparsify_spec(te_spec, SparsityConfig(), targets=("qkv",))
