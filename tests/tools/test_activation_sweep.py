"""The activation frontier's machinery on a tiny GPT: its rows train like the plain demo, its
schedule runs dense in the dense phases, its sparse-phase statistics count what the pattern drops."""

import argparse
import math

import pytest
import torch

from megasparse.tools import activation_sweep, demo
from megasparse.tools.gpt_text import load_corpus

STEPS = 10  # schedule: dense 0, sparse 1..7, dense 8..9
TOKENS = 64  # seq 16 x batch 4: one block of V = 64 tokens


def _args(tmp_path, **kw):
    return argparse.Namespace(
        tp=1, layers=1, hidden=32, heads=2, ffn=128, seq=16, batch=4, steps=STEPS, seed=0,
        lr=2e-3, targets=["fc1", "fc2"], val_batches=2, eval_every=100, out=str(tmp_path),
        quality=False, resume=False, sweep_seeds=[0], sweep_repeat=["dense"], sweep_plot=None,
        **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sweep(megatron_tp1, tmp_path_factory):
    """The dense, 2:4-activation, 64:2:8 (25%) and 64:2:8 both-ways rows, and the plain demo's
    dense recipe (one thread: tiny GEMMs, and no waiting on busy cores)."""
    out = tmp_path_factory.mktemp("sweep")
    args = _args(out, recipes=["dense", "w2:4+a2:4", "w2:4+a64:2:8", "w2:4+a64:2:8+bw64:4:8"])
    data = load_corpus(20_000)
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = {r["recipe"]: r for r in demo.run_activation_sweep(args, data, cpu)}
        plain_dense = demo.train_recipe("dense", args, data, cpu)
    finally:
        torch.set_num_threads(threads)
    return args, rows, plain_dense


def test_dense_row_is_the_plain_dense_demo_run(sweep):
    _, rows, plain = sweep
    assert rows["dense"]["train_curve"] == plain["train_curve"]
    assert rows["dense"]["val_loss"] == plain["val_loss"]


def test_schedule_runs_dense_in_its_dense_phases(sweep):
    args, rows, _ = sweep
    warmup, final = int(0.1 * STEPS), int(0.2 * STEPS)
    sparse = rows["w2:4+a64:2:8"]
    # the activation is sparsified in the sparse phase's training steps only
    assert sparse["act_sparse_iters"] == list(range(warmup, STEPS - final))
    assert rows["dense"]["act_sparse_iters"] == []
    # in the warm-up, 2:4 weights and 64:2:8 compute what the dense model does (same start, batches)
    dense_curve = rows["dense"]["train_curve"]
    assert sparse["train_curve"][:warmup] == pytest.approx(dense_curve[:warmup], rel=1e-6)
    assert abs(sparse["train_curve"][warmup] - dense_curve[warmup]) > 1e-4  # sparse from here
    # the sparse-phase loss is the evaluation after the last sparse step, not the final one
    last_sparse = STEPS - final - 1
    assert (last_sparse, sparse["sparse_end_val_loss"]) in sparse["val_curve"]
    assert sparse["sparse_end_val_loss"] != sparse["val_loss"]


def test_both_ways_weight_gradients_change_training_from_the_first_sparse_update(sweep):
    """The same forward until the first sparse step's weight update, which the both-ways
    weight gradient (A and dH sparsified again along tokens) changes."""
    warmup = int(0.1 * STEPS)
    exact, both_ways = rows = sweep[1]["w2:4+a64:2:8"], sweep[1]["w2:4+a64:2:8+bw64:4:8"]
    assert both_ways["train_curve"][: warmup + 1] == exact["train_curve"][: warmup + 1]
    assert both_ways["train_curve"][warmup + 1] != exact["train_curve"][warmup + 1]
    assert [r["sparsity_activation_wgrad"] for r in rows] == [None, "64:4:8"]


def test_sparse_phase_statistics_count_what_the_pattern_drops(sweep):
    args, rows, _ = sweep
    sparse_steps = STEPS - int(0.1 * STEPS) - int(0.2 * STEPS)
    assert rows["dense"]["sparse_act_dropped"] == 0.0
    quarter, half = rows["w2:4+a64:2:8"], rows["w2:4+a2:4"]
    assert 0.0 < quarter["sparse_act_dropped"] < 1.0 and 0.0 <= half["sparse_act_dropped"] < 1.0
    # every training step of the sparse phase, every layer, no evaluation forward
    assert quarter["sparse_act_elements"] == sparse_steps * args.layers * TOKENS * args.ffn
    assert quarter["density"] == 0.25 and half["density"] == 0.5 and rows["dense"]["density"] == 1


def test_each_run_is_saved_and_reused_with_resume(sweep, monkeypatch):
    args, rows, _ = sweep
    monkeypatch.setattr(demo, "train_recipe", lambda *a, **k: pytest.fail("retrained"))
    resumed = argparse.Namespace(**{**vars(args), "resume": True})
    again = demo.run_activation_sweep(resumed, load_corpus(20_000), torch.device("cpu"))
    assert [r["val_loss"] for r in again] == [rows[n]["val_loss"] for n in args.recipes]


def test_projection_asks_the_perfmodel_for_the_rows_sparsity(monkeypatch):
    from megasparse.tools import perfmodel

    calls = []

    def projected(activations, activation_wgrad=None, weights="2:4", device="H100", bound="mid"):
        calls.append((activations, activation_wgrad, weights, device, bound))
        return {"ffn": 2.0, "layer_1b": 1.2, "layer_7b": 1.3, "layer_7b_schedule": 1.2}

    monkeypatch.setattr(perfmodel, "projected_speedups", projected, raising=False)
    recipes = activation_sweep.SWEEP_RECIPES
    activation_sweep.projection(recipes["dense"])
    activation_sweep.projection(recipes["w2:4+a64:4:16+bw64:4:8"])
    assert calls == [(None, None, None, "H100", "mid"), ("64:4:16", "64:4:8", "2:4", "H100", "mid")]


def test_every_row_keeps_the_schedule_and_the_repeated_rows_run_every_seed():
    rows = list(activation_sweep.SWEEP_RECIPES)
    assert all(
        (r["dense_warmup"], r["dense_final"]) == (0.1, 0.2)
        for r in activation_sweep.SWEEP_RECIPES.values()
    )
    assert activation_sweep.RECOMMENDED in rows
    planned = activation_sweep.runs(rows, [0, 1, 2])
    assert planned[: len(rows)] == [(r, 0) for r in rows]
    assert sorted(planned[len(rows) :]) == sorted(
        (r, s) for r in activation_sweep.REPEATED for s in (1, 2)
    )


def _result(name, seed, val, ffn, dropped=0.1):
    recipe = activation_sweep.SWEEP_RECIPES[name]
    return {
        "recipe": name, "seed": seed, "val_loss": val, "sparse_end_val_loss": val + 0.1,
        "sparse_act_dropped": dropped, "density": activation_sweep.density(recipe),
        "sparsity_activation_wgrad": recipe["sparsity"] and recipe["sparsity"].activation_wgrad,
        "projected": {"ffn": ffn, "layer_1b": 1.0, "layer_7b": ffn / 2, "layer_7b_schedule": 1.0},
    }  # fmt: skip


def test_table_gives_gaps_mean_spread_and_the_one_percent_verdict(tmp_path):
    results = [
        _result("dense", 0, 2.00, 1.0, 0.0),
        _result("w2:4+a64:2:8", 0, 2.03, 1.5),
        _result("dense", 1, 2.02, 1.0, 0.0),
        _result("w2:4+a64:2:8", 1, 2.05, 1.5),
    ]
    lines = activation_sweep.table(results, _args(tmp_path), 60.0)
    row = next(line for line in lines if line.startswith("| w2:4+a64:2:8 | 0.250"))
    assert "| 2.0300 | +1.50% |" in row and "| 1.50 |" in row  # seed 0 against dense seed 0
    seeds = next(line for line in lines if line.startswith("| w2:4+a64:2:8 | 0 1 |"))
    gaps = (100 * (2.03 / 2.00 - 1), 100 * (2.05 / 2.02 - 1))  # against dense of the same seed
    spread = abs(gaps[0] - gaps[1]) / math.sqrt(2)  # sample std of two values
    assert "| 2.0300 2.0500 | +1.50% +1.49% |" in seeds
    assert f"| {sum(gaps) / 2:+.2f}% | {spread:.2f} | no |" in seeds
    assert activation_sweep.plot(results, str(tmp_path / "frontier.png"))
    assert (tmp_path / "frontier.png").stat().st_size > 0


def test_pareto_front_keeps_the_points_nothing_beats():
    points = [(1.0, 2.0), (1.5, 2.1), (1.4, 2.2), (2.0, 2.05), (2.0, 2.3)]
    assert activation_sweep.pareto_front(points) == [(1.0, 2.0), (2.0, 2.05)]


def test_cli_refuses_a_non_sweep_recipe_with_the_sweep():
    with pytest.raises(SystemExit):
        demo.parse_args(["--activation-sweep", "--recipes", "ste"])


def test_cli_sweep_brings_its_size_and_every_row_and_flags_given_win():
    args = demo.parse_args(["--activation-sweep"])
    assert {k: getattr(args, k) for k in activation_sweep.SWEEP_DEFAULTS} == (
        activation_sweep.SWEEP_DEFAULTS
    )
    assert args.recipes == list(activation_sweep.SWEEP_RECIPES) and args.ffn // args.tp >= 512
    assert demo.parse_args(["--activation-sweep", "--ffn", "1024"]).ffn == 1024
    plain = demo.parse_args([])
    assert (plain.tp, plain.ffn, plain.recipes) == (2, 512, list(demo.RECIPES))
