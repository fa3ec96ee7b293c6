"""SparsitySchedule, --sparsity-* flags, Megatron-LM hooks and held masks in checkpoints (TP=1)."""

import argparse

import pytest
import torch
from megatron.core.activations import squared_relu

from megasparse import SparsityConfig
from megasparse.megatron.args import add_args, config_from_args, schedule_from_args
from megasparse.megatron.schedule import (
    DENSE_FINAL,
    DENSE_WARMUP,
    SPARSE,
    SparsitySchedule,
    sparse_modules,
)
from megasparse.core.weight_state import compute_mask
from megatron_helpers import make_config, make_mlp

pytestmark = pytest.mark.usefixtures("megatron_tp1")


def test_phases_by_iteration():
    s = SparsitySchedule(dense_warmup_iters=2, dense_final_iters=3, train_iters=10)
    assert [s.phase(i) for i in range(10)] == [DENSE_WARMUP] * 2 + [SPARSE] * 5 + [DENSE_FINAL] * 3
    assert SparsitySchedule().phase(10**6) == SPARSE


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dense_final_iters=5), "needs train_iters"),
        (dict(dense_warmup_iters=6, dense_final_iters=5, train_iters=10), "no sparse iteration"),
        (dict(dense_warmup_iters=-1), ">= 0"),
        (dict(dense_warmup_iters=float("nan")), "dense_warmup_iters must be a whole number"),
        (dict(dense_final_iters=0.5, train_iters=100), "round\\(fraction \\* train_iters\\)"),
        (dict(dense_warmup_iters=2.5), "whole number"),
        (dict(dense_warmup_iters=True), "whole number"),
        (dict(dense_warmup_iters="3"), "whole number"),
        (dict(train_iters=float("nan")), "train_iters must be a whole number"),
        (dict(train_iters=-1), "train_iters must be a whole number"),
        (dict(train_iters=0), "train_iters must be >= 1"),
    ],
)
def test_bad_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsitySchedule(**kwargs)


@pytest.mark.parametrize("warmup,final", [(5, 5), (10, 0), (0, 10), (6, 5)])
def test_dense_phases_must_leave_a_sparse_iteration(warmup, final):
    with pytest.raises(ValueError, match="no sparse iteration is left"):
        SparsitySchedule(dense_warmup_iters=warmup, dense_final_iters=final, train_iters=10)


def test_one_sparse_iteration_and_no_dense_phases_are_accepted():
    s = SparsitySchedule(dense_warmup_iters=4, dense_final_iters=5, train_iters=10)
    assert [s.phase(i) for i in range(10)].count(SPARSE) == 1
    s = SparsitySchedule(train_iters=3)  # nothing dense was asked for
    assert [s.phase(i) for i in range(3)] == [SPARSE] * 3


def test_schedule_flags_that_leave_no_sparse_iteration_name_the_flags():
    args = add_args(argparse.ArgumentParser()).parse_args(
        ["--sparsity-dense-warmup-iters", "50", "--sparsity-dense-final-iters", "0.5"]
    )
    args.train_iters = 100
    with pytest.raises(ValueError, match="--sparsity-dense-final-iters 0.5.*no sparse iteration"):
        schedule_from_args(args)
    args.train_iters = 101
    assert schedule_from_args(args).dense_final_iters == 50  # round(50.5): one sparse iteration


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--sparsity-dense-final-iters", "inf"),
        ("--sparsity-dense-final-iters", "-inf"),
        ("--sparsity-dense-final-iters", "nan"),
        ("--sparsity-dense-final-iters", "1e400"),
        ("--sparsity-dense-final-iters", "ten"),
        ("--sparsity-dense-warmup-iters", "-1"),
        ("--sparsity-dense-warmup-iters", "inf"),
        ("--sparsity-dense-warmup-iters", "2.5"),
        ("--sparsity-mask-refresh-iters", "0"),
        ("--sparsity-mask-refresh-iters", "inf"),
        ("--sparsity-srste-decay", "inf"),
        ("--sparsity-srste-decay", "nan"),
        ("--sparsity-srste-decay", "-1"),
        ("--sparsity-masked-decay-factor", "1e400"),
        ("--sparsity-masked-decay-factor", "-1e-5"),
        ("--sparsity-activations", "8:3:8"),
        ("--sparsity-activations", "0:2:8"),
        ("--sparsity-activations", "2:8"),
        ("--sparsity-activations", "inf"),
    ],
)
def test_flags_refuse_bad_values_at_parsing(flag, value, capsys):
    parser = add_args(argparse.ArgumentParser())
    with pytest.raises(SystemExit):
        parser.parse_args([f"{flag}={value}"])
    err = capsys.readouterr().err
    assert f"argument {flag}: expected" in err and repr(value) in err


def test_good_decay_and_activation_flags_parse():
    args = add_args(argparse.ArgumentParser()).parse_args(
        ["--sparsity-srste-decay=0", "--sparsity-masked-decay-factor=1e-4"]
        + ["--sparsity-activations=64:2:8"]
    )
    assert (args.sparsity_srste_decay, args.sparsity_masked_decay_factor) == (0.0, 1e-4)
    assert args.sparsity_activations == "64:2:8"
    for spelling in ("none", "None"):
        parsed = add_args(argparse.ArgumentParser()).parse_args(
            [f"--sparsity-activations={spelling}"]
        )
        assert parsed.sparsity_activations is None


def _mlp(sparsity, seed=0):
    cfg = make_config(
        dtype=torch.float64, hidden_size=16, ffn_hidden_size=32, activation_func=squared_relu
    )
    return make_mlp(cfg, 32, sparsity, sparsity, seed=seed)


def _train(mlp, opt, schedule, iterations, data_seed=0):
    for it in iterations:
        schedule.apply(mlp, it)
        x = torch.randn(
            4, 2, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(data_seed + it)
        )
        y, _ = mlp(x)
        opt.zero_grad()
        y.square().mean().backward()
        opt.step()


def test_apply_switches_every_sparse_layer_and_nothing_is_lost():
    mlp = _mlp(SparsityConfig(activations="2:4", backend="dense"))
    schedule = SparsitySchedule(dense_warmup_iters=1, dense_final_iters=1, train_iters=3)
    assert len(sparse_modules(mlp)) == 2
    assert schedule.apply(mlp, 0) == DENSE_WARMUP and not any(
        m.sparsity.enabled for m in sparse_modules(mlp)
    )
    assert torch.equal(
        mlp.linear_fc1.sparsity_mask(), torch.ones_like(mlp.linear_fc1.weight, dtype=torch.bool)
    )
    dense_weight = mlp.linear_fc1.weight.detach().clone()
    assert schedule.apply(mlp, 1) == SPARSE and all(m.sparsity.enabled for m in sparse_modules(mlp))
    assert mlp.linear_fc1.sparsity_mask().float().mean() == 0.5
    assert torch.equal(mlp.linear_fc1.weight, dense_weight)  # the dense master weight is untouched
    assert schedule.apply(mlp, 2) == DENSE_FINAL


def test_resumed_run_matches_uninterrupted_run_with_held_masks():
    sparsity = SparsityConfig(mask_refresh_interval=3, activations="2:4", backend="dense")
    schedule = SparsitySchedule(dense_warmup_iters=2, dense_final_iters=2, train_iters=10)

    straight = _mlp(sparsity)
    opt = torch.optim.Adam(straight.parameters(), lr=1e-2)
    _train(straight, opt, schedule, range(10))

    first = _mlp(sparsity)
    opt1 = torch.optim.Adam(first.parameters(), lr=1e-2)
    _train(
        first, opt1, schedule, range(6)
    )  # stop mid-hold: masks refreshed at iteration 5, held until 8
    assert first.linear_fc1.weight_state.held_mask() is not None
    checkpoint = {"model": first.state_dict(), "opt": opt1.state_dict()}

    resumed = _mlp(sparsity, seed=99)  # a different init: everything must come from the checkpoint
    resumed.load_state_dict(checkpoint["model"])
    assert torch.equal(
        resumed.linear_fc1.weight_state.held_mask(), first.linear_fc1.weight_state.held_mask()
    )
    opt2 = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(checkpoint["opt"])
    _train(resumed, opt2, schedule, range(6, 10))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_held_mask_lost_from_checkpoint_would_change_the_run():
    """The previous test is not vacuous: recomputing the mask at resume instead of restoring it differs."""
    sparsity = SparsityConfig(mask_refresh_interval=3, backend="dense")
    schedule = SparsitySchedule()
    first = _mlp(sparsity)
    opt = torch.optim.Adam(first.parameters(), lr=5e-2)
    _train(first, opt, schedule, range(5))  # refreshed at iteration 3, then two updates
    held = first.linear_fc1.weight_state.held_mask()
    recomputed = compute_mask(first.linear_fc1.weight, first.linear_fc1.sparsity)
    assert not torch.equal(held, recomputed)


def test_flags_parse_into_config_and_schedule():
    parser = add_args(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--sparsity-weights",
            "2:4",
            "--sparsity-activations",
            "64:2:8",
            "--sparsity-mask",
            "transposable",
            "--sparsity-grad",
            "srste",
            "--sparsity-targets",
            "fc1",
            "fc2",
            "qkv",
            "--sparsity-dense-warmup-iters",
            "100",
            "--sparsity-dense-final-iters",
            "0.1",
            "--sparsity-mask-refresh-iters",
            "10",
        ]
    )
    args.train_iters = 1000
    cfg = config_from_args(args)
    assert (cfg.weights, cfg.activations, cfg.mask, cfg.gradient, cfg.mask_refresh_interval) == (
        "2:4",
        "64:2:8",
        "transposable",
        "srste",
        10,
    )
    assert args.sparsity_targets == ["fc1", "fc2", "qkv"]
    s = schedule_from_args(args)
    assert (s.dense_warmup_iters, s.dense_final_iters, s.train_iters) == (100, 100, 1000)
    defaults = parser.parse_args([])
    assert config_from_args(defaults).weights is None and defaults.sparsity_targets == [
        "fc1",
        "fc2",
        "experts",
    ]
    fp8 = config_from_args(
        parser.parse_args(
            ["--sparsity-weights", "2:4", "--sparsity-fp8", "hybrid"]
            + ["--sparsity-fp8-order", "quantize-then-prune"]
        )
    )
    assert (fp8.fp8, fp8.fp8_order) == ("hybrid", "quantize-then-prune")
    assert config_from_args(defaults).fp8 is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--sparsity-fp8", "e5m2"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--sparsity-dense-final-iters", "1.5"])
    assert "--sparsity-dense-final-iters" in parser.format_help()


def _megatron_lm_args(**overrides):
    args = add_args(argparse.ArgumentParser()).parse_args(
        ["--sparsity-weights", "2:4", "--sparsity-activations", "2:4"]
    )
    args.train_iters, args.curr_iteration, args.transformer_impl = 20, 0, "local"
    args.sparsity_dense_warmup_iters = 5
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def test_megatron_lm_hooks_with_a_stand_in_for_its_args():
    from megasparse.megatron_lm import extra_args_provider, on_forward_step
    from megasparse.megatron_lm import MegatronLMSpec

    seen = []
    provider = extra_args_provider(lambda p: seen.append(p) or p)
    parser = provider(argparse.ArgumentParser())
    assert seen and parser.parse_args(["--sparsity-weights", "2:4"]).sparsity_weights == "2:4"

    args = _megatron_lm_args()
    spec = MegatronLMSpec(args)
    from megatron.core.transformer.spec_utils import build_module

    cfg = make_config(
        dtype=torch.float32,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        activation_func=squared_relu,
    )
    layer = build_module(spec, config=cfg, layer_number=1)
    assert (
        type(layer.mlp).__name__ == "SparseMLP"
        and layer.mlp.linear_fc2.sparsity.activations == "2:4"
    )
    assert (
        on_forward_step(layer, args) == DENSE_WARMUP and not layer.mlp.linear_fc1.sparsity.enabled
    )
    args.curr_iteration = 7
    assert on_forward_step(layer, args) == SPARSE and layer.mlp.linear_fc1.sparsity.enabled
    with pytest.raises(
        ValueError, match="needs --sparsity-weights 2:4 and/or --sparsity-activations"
    ):
        MegatronLMSpec(_megatron_lm_args(sparsity_weights=None, sparsity_activations=None)).module


def test_public_names_named_in_the_issues_exist():
    import megasparse

    parser = megasparse.add_args(
        argparse.ArgumentParser()
    )  # usable as Megatron-LM's extra_args_provider
    assert parser.parse_args(["--sparsity-weights", "2:4"]).sparsity_weights == "2:4"
    assert megasparse.SparsitySchedule is SparsitySchedule
    for name in (
        "SparseColumnParallelLinear",
        "SparseRowParallelLinear",
        "SparseMLP",
        "SparseSequentialMLP",
        "SparseGroupedMLP",
        "SparseTEGroupedMLP",
        "sparsify_spec",
        "SparsityConfig",
        "Fp8SparseLinear",
    ):
        assert getattr(megasparse, name) is not None
