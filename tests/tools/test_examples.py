"""The examples in examples/ run as documented."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_sparse_mlp_spec_example_runs_and_prunes_half():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "sparse_mlp_spec.py")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("mask density 0.50") == 2, out.stdout


def test_bench_without_gpu_says_so_and_runs_the_smoke():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip(
            "on a GPU the benchmark measures for real: run python -m megasparse.tools.bench"
        )
    out = subprocess.run(
        [sys.executable, "-m", "megasparse.tools.bench"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no CUDA GPU here" in out.stdout and "smoke test passed" in out.stdout


def test_bench_check_exits_non_zero_on_a_missed_target(monkeypatch, capsys):
    from megasparse.tools import bench

    monkeypatch.setattr(bench, "smoke", lambda: None)
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "projected_targets", lambda: {"ffn_2:4": 1.31, "weight_prep": 0.2})
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--check"])
    assert exit_info.value.code == 1 and "weight preparation" in capsys.readouterr().out
    monkeypatch.setattr(bench, "projected_targets", lambda: {"ffn_2:4": 1.31, "weight_prep": 0.01})
    bench.main(["--check"])  # every given target met: exit 0
