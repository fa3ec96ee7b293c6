"""The --sparsity-* flags with Megatron-LM's Transformer Engine spec: activation sparsity is
accepted with --transformer-impl transformer_engine and becomes SparseMLP over sparse TE linears,
refused with --fp8-format (naming the fix); flags that take 'none' spell it so in help and errors."""

import argparse

import pytest
import torch

from megasparse.megatron.args import add_args, config_from_args


def _args(*flags, transformer_impl="transformer_engine", fp8=None):
    args = add_args(argparse.ArgumentParser()).parse_args(list(flags))
    args.transformer_impl, args.fp8 = transformer_impl, fp8  # Megatron-LM's own arguments
    return args


def test_activation_flags_are_accepted_with_the_te_spec():
    args = _args("--sparsity-weights", "2:4", "--sparsity-activations", "64:2:16")
    cfg = config_from_args(args)
    assert (cfg.weights, cfg.activations) == ("2:4", "64:2:16")
    wgrad = _args("--sparsity-activations", "64:4:16", "--sparsity-activation-wgrad", "64:4:8")
    assert config_from_args(wgrad).activation_wgrad == "64:4:8"


def test_activation_sparsity_with_te_fp8_is_refused_with_the_fix():
    args = _args("--sparsity-activations", "2:4", fp8="hybrid")
    with pytest.raises(
        ValueError, match="--fp8-format hybrid.*Drop --fp8-format.*activations none"
    ):
        config_from_args(args)
    weights_only = config_from_args(_args("--sparsity-weights", "2:4", fp8="hybrid"))
    assert weights_only.weights == "2:4" and weights_only.activations is None


@pytest.mark.parametrize(
    "flags,match",
    [
        (("--sparsity-fp8", "hybrid"), "--sparsity-fp8 hybrid is the local spec's.*--fp8-format"),
        (("--sparsity-mask-refresh-iters", "4"), "refresh-iters 4 holds masks.*refresh-iters 1"),
    ],
)
def test_te_spec_refuses_local_only_flags_at_parsing_with_the_fix(flags, match):
    """What the sparse TE linears refuse at construction is refused when the flags are read,
    naming the fix; the local spec takes both."""
    with pytest.raises(ValueError, match=match):
        config_from_args(_args("--sparsity-weights", "2:4", *flags))
    local = config_from_args(_args("--sparsity-weights", "2:4", *flags, transformer_impl="local"))
    assert local.fp8 == "hybrid" or local.mask_refresh_interval == 4


@pytest.mark.parametrize("value,hold", [("auto", None), ("true", True), ("false", False)])
def test_hold_backward_weight_flag(value, hold):
    args = _args("--sparsity-weights", "2:4", "--sparsity-hold-backward-weight", value)
    assert config_from_args(args).hold_backward_weight is hold
    assert config_from_args(_args("--sparsity-weights", "2:4")).hold_backward_weight is None


@pytest.mark.parametrize("flag", ["--sparsity-weights", "--sparsity-wgrad", "--sparsity-fp8"])
def test_flags_taking_none_spell_it_as_typed(flag, capsys):
    parser = add_args(argparse.ArgumentParser())
    help_text = parser.format_help()
    assert f"{flag} {{none," in help_text and "None" not in help_text
    assert getattr(parser.parse_args([flag, "none"]), flag[2:].replace("-", "_")) is None
    with pytest.raises(SystemExit):
        parser.parse_args([flag, "bogus"])
    assert "expected one of 'none', " in capsys.readouterr().err


@pytest.mark.usefixtures("megatron_tp1")
def test_megatron_lm_te_spec_with_activation_sparsity(monkeypatch):
    """gpt_layer_spec_from_args on the TE spec (Megatron's TE spec builder stands in: TE is not
    installed here) gives SparseMLP over the sparse TE linears."""
    from megatron.core.models.gpt import gpt_layer_specs

    import megasparse.megatron_lm as megatron_lm
    from megasparse import SparseMLP
    from test_specs_te import _build, _te_layer_spec, _train_step

    monkeypatch.setattr(megatron_lm, "require_transformer_engine", lambda what: None)
    monkeypatch.setattr(
        gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec", lambda **kw: _te_layer_spec()
    )
    args = _args("--sparsity-activations", "2:4", "--sparsity-targets", "fc1", "fc2")
    args.sparsity_backend = "dense"
    layer = _build(megatron_lm.gpt_layer_spec_from_args(args))
    assert type(layer.mlp) is SparseMLP
    assert type(layer.mlp.linear_fc2).__name__ == "SparseTERowParallelLinear"
    out = _train_step(layer)
    assert torch.isfinite(out).all() and layer.mlp.activation_stats()["elements"] == 8 * 2 * 64
