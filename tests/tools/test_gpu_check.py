"""The one-command GPU check (megasparse.tools.gpu_check) on the CPU: it exits 0 without a GPU, and
its runner and report work with injected parts: a failing part fails the check without stopping
the others, and every measured figure sits beside its projection."""

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megasparse.tools import gpu_check
from megasparse.tools.gpu_check import Part

ROOT = Path(__file__).resolve().parents[2]
ENV = {
    "device": "Injected H100",
    "capability": "sm90",
    "torch": torch.__version__,
    "cuda": "12.8",
    "cusparselt": "0.6.2",
}


@pytest.fixture
def injected_gpu(monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "environment", lambda: dict(ENV))


def _table(md: str, first_header: str) -> list:
    """The Markdown table whose first column is `first_header`, as a list of {column: cell}."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows, header


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("there is a GPU here: the check runs for real (make gpu-check)")
    out = subprocess.run(
        [sys.executable, "-m", "megasparse.tools.gpu_check", "--json", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("\n") == 1 and "no CUDA GPU" in out.stdout
    assert not (tmp_path / "r.json").exists()


def _layout_smoke(n):
    """Smoke rows of a right result, a result read with the wrong layout (transposed) and a
    check that could not run."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    reference = x.double() @ w.double().t()
    return [
        gpu_check.compare("right layout", (x @ w.t()).bfloat16(), reference),
        gpu_check.compare("transposed layout", (x @ w.t()).t(), reference),
        gpu_check._skipped("FP8", "sm80: no FP8"),
    ]


def _raises(budget_s):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def _bench_results():
    """What bench.bench_gpu returns, with figures that differ from their projections."""
    g = torch.Generator().manual_seed(1)
    figures = iter(torch.rand(64, generator=g).add(0.5).tolist())
    rows = []
    for tokens in (4096, 16384):
        for recipe in ("2:4 1d", "2:4"):
            row = {"recipe": recipe, "tokens": tokens}
            for key in ("measured_ratio", "projected_ratio", "step_ms", "projected_step_ms"):
                row[key] = next(figures)
            if recipe == "2:4":
                row["weight_prep_share"] = next(figures) / 10
                row["projected_weight_prep_share"] = next(figures) / 10
            rows.append(row)
    targets = {"ffn_2:4": next(figures), "weight_prep": 0.2, "mask_bandwidth": next(figures)}
    return {"rows": rows, "targets": targets}, {"ffn_2:4": next(figures), "weight_prep": 0.03}


def _injected_bench_part(results, projected):
    """The bench part with injected measurements beside their projections."""
    tables = gpu_check.bench_tables(results, projected)
    return Part(
        "bench", "measured and projected", 10, lambda b: {"summary": "injected", "tables": tables}
    )


def test_a_failing_part_fails_the_check_and_the_others_still_run(injected_gpu, tmp_path):
    parts = (
        Part("crash", "raises", 10, _raises),
        Part("smoke", "layouts", 10, lambda b: gpu_check.smoke(b, n=64, checks=(_layout_smoke,))),
        _injected_bench_part(*_bench_results()),
    )
    json_path, md_path = tmp_path / "check.json", tmp_path / "check.md"
    code = gpu_check.main(
        ["--json", str(json_path), "--md", str(md_path)], parts=parts, runner=gpu_check.run_part
    )
    assert code == 1
    report = json.loads(json_path.read_text())
    status = {p["name"]: p for p in report["parts"]}
    assert report["ok"] is False and report["failed_parts"] == ["crash", "smoke"]
    assert "illegal memory access" in status["crash"]["error"]
    assert (
        "transposed layout" in status["smoke"]["error"]
        and "right layout" not in status["smoke"]["error"]
    )
    assert status["smoke"]["summary"] == "1 of 2 within tolerance, 1 skipped"
    assert status["bench"]["status"] == "passed"  # ran after two failed parts
    md = md_path.read_text()
    assert "Injected H100 (sm90)" in md and "cuSPARSELt 0.6.2" in md and "**FAILED**" in md
    overview, _ = _table(md, "part")
    assert [(r["part"], r["status"]) for r in overview] == [
        ("crash", "failed"),
        ("smoke", "failed"),
        ("bench", "passed"),
    ]
    smoke_rows, _ = _table(md, "check")
    assert {r["check"]: r["ok"] for r in smoke_rows} == {
        "right layout": "yes",
        "transposed layout": "NO",
        "FP8": "-",
    }


def test_each_measured_figure_sits_beside_its_projection(injected_gpu, tmp_path):
    results, projected = _bench_results()
    part = _injected_bench_part(results, projected)
    md_path = tmp_path / "check.md"
    assert (
        gpu_check.main(
            ["--json", str(tmp_path / "c.json"), "--md", str(md_path)],
            parts=(part,),
            runner=gpu_check.run_part,
        )
        == 0
    )
    md = md_path.read_text()
    assert "**PASSED**" in md
    steps, header = _table(md, "recipe")
    pairs = [
        ("measured_ratio", "projected_ratio", "ratio vs dense"),
        ("step_ms", "projected_step_ms", "step ms"),
        ("weight_prep_share", "projected_weight_prep_share", "weight prep share"),
    ]
    for figure, projection, column in pairs:
        measured_col = header.index(f"{column}, measured")
        assert header[measured_col + 1] == f"{column}, projected"
        for row, cells in zip(results["rows"], steps):
            assert (cells["recipe"], cells["tokens"]) == (row["recipe"], str(row["tokens"]))
            expected = [row.get(figure), row.get(projection)]
            shown = [cells[f"{column}, measured"], cells[f"{column}, projected"]]
            assert shown == [gpu_check._cell(v) for v in expected]
    targets, header = _table(md, "target")
    assert header.index("projected") == header.index("measured") + 1
    from megasparse.tools.bench import TARGETS

    assert [r["target"] for r in targets] == [what for what, _, _ in TARGETS.values()]
    for key, value in results["targets"].items():
        row = next(r for r in targets if r["target"] == TARGETS[key][0])
        assert row["measured"] == gpu_check._cell(value)
        assert row["projected"] == gpu_check._cell(projected.get(key))
    weight_prep = next(r for r in targets if r["target"] == TARGETS["weight_prep"][0])
    assert weight_prep["measured verdict"] == "MISSED"  # 0.2 > 0.05: reported, not a failure


def test_kernel_rows_put_each_time_beside_its_projection_and_judge_it_against_a_copy():
    from megasparse.tools.perf.roofline import DEVICES, memory_time

    bandwidths = {
        "mask_1d": {"bytes": 3e8, "ms": 0.2, "copy_ms": 0.18, "vs_copy": 0.9},
        "mask_transposable": {"bytes": 3e8, "ms": 0.6, "copy_ms": 0.18, "vs_copy": 0.3},
    }
    rows = gpu_check.kernel_rows(bandwidths, "H100")
    for row in rows:
        columns = list(row)
        measured = columns.index("kernel ms, measured")
        assert columns[measured + 1] == "kernel ms, projected"
        assert row["kernel ms, measured"] == bandwidths[row["kernel"]]["ms"]
        assert row["kernel ms, projected"] == memory_time(3e8, DEVICES["H100"]) * 1e3
    verdicts = {r["kernel"]: r[next(k for k in r if k.startswith("vs copy >="))] for r in rows}
    assert verdicts == {"mask_1d": "met", "mask_transposable": "MISSED"}
    assert gpu_check.kernel_rows(bandwidths)[0]["kernel ms, projected"] is None  # unknown device


def test_a_part_in_its_own_process_past_its_budget_or_crashing_is_failed(monkeypatch, tmp_path):
    part = Part("p", "a part", 1, None)
    commands = {}
    monkeypatch.setattr(gpu_check, "part_command", lambda name, path, budget: commands[name](path))
    slow = Part("slow", "sleeps", 1, None)
    commands["slow"] = lambda path: [sys.executable, "-c", "import time; time.sleep(60)"]
    result = gpu_check.run_isolated(slow, 1)
    assert result["status"] == "failed" and "past its budget" in result["error"]
    assert result["wall_s"] < 30
    commands["p"] = lambda path: [
        sys.executable,
        "-c",
        "import sys; print('segfault'); sys.exit(3)",
    ]
    result = gpu_check.run_isolated(part, 10)
    assert result["status"] == "failed" and "code 3" in result["error"]
    assert "segfault" in result["output_tail"]
    # a part's own process writes its result with the real entry point (--run-part)
    commands["p"] = lambda path: [
        sys.executable,
        "-c",
        "from megasparse.tools import gpu_check; import sys; "
        "sys.exit(gpu_check.main(sys.argv[1:], parts=(gpu_check.Part('done', 'passes', 10, "
        "lambda b: {'summary': f'budget {b}'}),)))",
        "--run-part",
        "done",
        "--result",
        path,
        "--budget",
        "7",
    ]
    result = gpu_check.run_isolated(part, 60)
    assert result["status"] == "passed" and result["summary"] == "budget 7.0", result


def test_each_part_gets_what_is_left_of_the_total_budget(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(gpu_check, "time", SimpleNamespace(monotonic=lambda: now[0]))
    given = []

    def runner(part, budget):  # a part that uses all of its budget
        given.append((part.name, budget))
        now[0] += budget
        return gpu_check._result(part, "passed", budget)

    parts = [Part(name, "", 100, None) for name in ("a", "b", "c")]
    results = gpu_check.run_parts(parts, runner, total_budget_s=150)
    assert given == [("a", 100), ("b", 50)]
    assert [r["status"] for r in results] == ["passed", "passed", "failed"]
    assert "total budget" in results[2]["error"]


def test_gpu_tests_part_counts_pytest_outcomes(tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_injected.py").write_text(
        textwrap.dedent(
            """
            import pytest

            @pytest.mark.gpu
            def test_passes():
                assert 1 + 1 == 2

            @pytest.mark.gpu
            def test_fails():
                assert 1 + 1 == 3

            @pytest.mark.gpu
            def test_skips():
                pytest.skip("not on this device")

            def test_not_gpu():  # deselected by -m gpu
                assert False
            """
        )
    )
    part = Part("gpu_tests", "", 60, lambda b: gpu_check.gpu_tests(b, tests))
    result = gpu_check.run_part(part)
    counts = result["counts"]
    assert (counts["passed"], counts["failed"], counts["errors"], counts["skipped"]) == (1, 1, 0, 1)
    assert result["status"] == "failed" and counts["failed_tests"] == [
        "tests.test_injected::test_fails"
    ]
    assert "test_fails" in result["error"]


def test_every_triton_kernel_has_a_bandwidth_launch_that_runs(monkeypatch):
    """kernel_bandwidths launches every kernel module of megasparse.kernels (the interpreter runs
    them here; each launch is timed once by a CPU clock instead of CUDA events)."""
    from megasparse.kernels import compile_specs
    from megasparse.tools import bench

    def time_once(fn):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    monkeypatch.setattr(bench, "_time_ms", time_once)
    bandwidths = bench.kernel_bandwidths(hidden=16, ffn=32, tokens=64, device="cpu")
    modules = {spec.fn.fn.__module__.rsplit(".", 1)[1] for spec in compile_specs(torch.bfloat16)}
    assert modules <= {name.split(" ")[0] for name in bandwidths}
    rows = gpu_check.kernel_rows(bandwidths)
    assert [r["kernel"] for r in rows] == list(bandwidths)


@pytest.fixture
def cusparselt_search_on_cpu(monkeypatch):
    """The cusparselt_search part's checks on the CPU: torch's binding modelled by cusparselt_cpu,
    cuSPARSELt's search answering `state.found`, algorithm ids in `state.wrong` giving a wrong
    result and ids from `state.refused` on raising, as cuSPARSELt does past its last id."""
    from cusparselt_cpu import cusparselt_on_cpu
    from megasparse.core.backends import CusparseltBackend
    from megasparse.core.cusparselt_search import Algorithm

    state = SimpleNamespace(found=Algorithm(4, 2, 1), wrong=set(), refused=8, searched=[])
    monkeypatch.setattr(CusparseltBackend, "device_reason", lambda self, device: None)
    with cusparselt_on_cpu():
        exact = torch._cslt_sparse_mm

        def cslt_sparse_mm(*args, alg_id=0, split_k=1, split_k_mode=-1, **kwargs):
            if alg_id >= state.refused:
                raise RuntimeError("CUSPARSE_STATUS_INVALID_VALUE: alg_id out of range")
            y = exact(*args, **kwargs)
            return y * 1.5 if alg_id in state.wrong else y

        def search(*args, **kwargs):
            state.searched.append(args[1].shape)
            return state.found.alg_id

        monkeypatch.setattr(torch, "_cslt_sparse_mm", cslt_sparse_mm)
        monkeypatch.setattr(torch, "_cslt_sparse_mm_search", search)
        yield state


def test_cusparselt_search_part_checks_each_found_algorithm_against_algorithm_0(
    cusparselt_search_on_cpu,
):
    """Each shape and dtype is searched; the found algorithm's result is compared with algorithm 0,
    float64 and the dense GEMM; an algorithm with wrong results fails its row and the part."""
    state = cusparselt_search_on_cpu
    result = gpu_check.smoke(
        0, n=64, checks=(lambda n: gpu_check._cusparselt_search_rows(n, "cpu"),)
    )
    rows = result["tables"]["relative error against the reference"]
    searched = [r for r in rows if r["ok"] is not None]
    assert len(searched) == 6 and len(state.searched) == 6  # 3 shapes x bf16, fp16
    assert all(r["ok"] and "algorithm (4, 1, -1)" in r["check"] for r in searched)
    assert all(r["max |found - algorithm 0|"] <= r["check tolerance"] for r in searched)
    assert [r["check"] for r in rows if r["ok"] is None] == ["search e4m3"]  # no sm90 here
    state.wrong.add(4)
    result = gpu_check.smoke(
        0, n=64, checks=(lambda n: gpu_check._cusparselt_search_rows(n, "cpu"),)
    )
    assert len(result["failures"]) == 6
    failed = [
        r for r in result["tables"]["relative error against the reference"] if r["ok"] is False
    ]
    assert all("differs from algorithm 0" in r["note"] for r in failed)


def test_algorithm_sweep_runs_every_id_until_refused_and_names_the_wrong_ones(
    cusparselt_search_on_cpu,
):
    state = cusparselt_search_on_cpu
    (row,) = gpu_check._algorithm_sweep_rows(64, "cpu", size=64)
    assert row["ok"] is True and row["note"].startswith("ids 0..7 ran") and "none" in row["note"]
    state.wrong.add(5)
    (row,) = gpu_check._algorithm_sweep_rows(64, "cpu", size=64)
    assert row["ok"] is False and "differing from algorithm 0: 5 (max |diff|" in row["note"]
