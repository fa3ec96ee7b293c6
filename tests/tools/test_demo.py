"""The demo reports without matplotlib (a pip user's install); its progress bar tells the truth."""

import argparse
import json
import sys

from megasparse.megatron.schedule import SPARSE, SparsitySchedule
from megasparse.tools import demo


def _results():
    return [
        {
            "recipe": name,
            "val_loss": 2.0,
            "train_curve": [3.0, 2.5],
            "val_curve": [(0, 3.0), (1, 2.0)],
            "ms_per_step": 1.0,
            "w_kept": None,
            "act_zeros": None,
            "act_dropped": None,
        }
        for name in demo.RECIPES
    ]


def test_report_without_matplotlib_writes_results_and_says_how_to_plot(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    args = argparse.Namespace(
        tp=2, layers=2, hidden=8, ffn=16, seq=4, batch=2, steps=2, targets=["fc1"]
    )
    demo.report(_results(), args, str(tmp_path))
    out = capsys.readouterr().out
    assert "matplotlib is not installed" in out and "megasparse[plot]" in out
    assert json.loads((tmp_path / "results.json").read_text())["results"][0]["recipe"] == "dense"
    assert not (tmp_path / "loss_curves.png").exists()


def test_progress_bar_phase_of_the_dense_recipe_is_dense():
    phase = SparsitySchedule().apply(
        [], 0
    )  # what train_recipe gets for a recipe without a schedule
    assert phase == SPARSE
    assert demo.phase_label(demo.RECIPES["dense"]["sparsity"], phase) == "dense"
    assert demo.phase_label(demo.RECIPES["2:4"]["sparsity"], phase) == SPARSE


def test_master_weights_step_fp32_copies_and_round_them_into_the_bf16_parameters():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).to(torch.bfloat16)
    reference = [p.detach().float().clone().requires_grad_(True) for p in model.parameters()]
    ref_opt = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.0)
    opt = demo.MasterWeights(model, lr=1e-2)
    for _ in range(3):
        model(torch.randn(5, 8).to(torch.bfloat16)).float().square().sum().backward()
        for r, p in zip(reference, model.parameters()):
            r.grad = p.grad.float()
        ref_opt.step()
        opt.step()
        opt.zero_grad()
        for r, m, p in zip(reference, opt.master, model.parameters()):
            assert torch.equal(m, r)  # AdamW on the fp32 masters, not on bf16 values
            assert torch.equal(p, r.to(torch.bfloat16)) and p.grad is None


def test_fp8_recipes_train_with_fp8_gemms_and_report_the_trained_weights(tmp_path, megatron_tp1):
    """Two steps of bf16 2:4 and FP8 2:4 from the same start: FP8 changes the losses a little, and
    the per-layer numbers are fp8_numerics' for the trained shards (also from the saved file)."""
    import torch

    from megasparse.tools import fp8_numerics
    from megasparse.tools.gpt_text import load_corpus

    args = argparse.Namespace(
        tp=1, layers=1, hidden=32, heads=2, ffn=64, seq=16, batch=4, steps=2, seed=0, lr=2e-3,
        targets=["fc1", "fc2"], val_batches=1, eval_every=1, out=str(tmp_path), quality=False,
    )  # fmt: skip
    data = load_corpus(20_000)
    cpu = torch.device("cpu")
    bf16 = demo.train_recipe("bf16-2:4", args, data, cpu)
    fp8 = demo.train_recipe("fp8-2:4-quantize-then-prune", args, data, cpu)
    first = (bf16["train_curve"][0], fp8["train_curve"][0])
    assert first[0] != first[1] and abs(first[0] - first[1]) / first[0] < 0.02
    rows = fp8["fp8_numerics"]
    assert {n.split(".")[-2] for n in rows} == {"linear_fc1", "linear_fc2"}
    saved = torch.load(tmp_path / "fp8-24-quantize-then-prune_rank0.pt")
    assert fp8_numerics.report(saved) == rows  # the tool on the saved trained model: the same
    assert all(0 < r["quantize-then-prune_err"] < 0.1 for r in rows.values())


def test_progress_bar_of_fp8_dense_says_dense():
    phase = SparsitySchedule().apply([], 0)
    assert demo.phase_label(demo.FP8_RECIPES["fp8-dense"]["sparsity"], phase) == "dense"
    assert demo.phase_label(demo.FP8_RECIPES["bf16-2:4"]["sparsity"], phase) == SPARSE
