"""The demo reports without matplotlib (a pip user's install); its progress bar tells the truth."""

import argparse
import json
import sys

from megasparse.schedule import SPARSE, SparsitySchedule
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
