"""Everything only a GPU can prove, in one command: python -m megasparse.tools.gpu_check.

    python -m megasparse.tools.gpu_check [--json gpu_check.json] [--md gpu_check.md] [--only PART]

On one CUDA GPU (sized for an H100: under 8 minutes in all), each part runs in its own process
with its own time budget, so a crash, a hang or a broken CUDA context stops only that part:

  smoke             cuSPARSELt bf16 2:4 (torch's binding and megasparse's op, forward and input
                    gradient) and the FP8 e4m3 2:4 GEMM of megasparse.fp8.gemm at 8192 x 8192 x 8192,
                    each against its reference (relative error)
  kernel_bandwidth  every Triton kernel in megasparse.kernels against a device copy of the same bytes
  cusparselt_search cuSPARSELt's algorithm search (megasparse.core.cusparselt_search) at a square
                    GEMM and the reference FFN's fc1 / fc2 shapes, bf16, fp16 and e4m3, each found
                    algorithm against algorithm 0 (repeated runs), float64 and the dense GEMM; and
                    every algorithm id at 512^3 against algorithm 0 (pytorch#155333). It must
                    pass before MEGASPARSE_CUSPARSELT_SEARCH can default on
  gpu_tests         the `gpu`-marked tests (pytest -m gpu): passed / failed / skipped
  bench             megasparse.tools.bench at the projection's shape, each measured figure beside
                    megasparse.tools.perfmodel's projection of it

It writes one JSON and one Markdown report (device, torch / CUDA / cuSPARSELt versions). A part
fails when it raises, runs past its budget or one of its checks fails (a failed test, an error
above its tolerance); the other parts still run, and the exit code is 1 if any part failed. Speed
targets are reported (met / MISSED) but do not fail the check: `megasparse.tools.bench --check`
does that. Without a GPU it says so in one line and exits 0.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository of an editable install
TOTAL_BUDGET_S = 450  # all parts together, under 8 minutes with the process starts
REL_TOL = 1e-2  # relative Frobenius error allowed against a reference (bf16 rounding is ~2e-3)
SMOKE_SIZE = 8192  # tokens = in = out of the smoke GEMMs
MIN_PART_S = 5  # a part given less than this is not started
PYTEST_MARGIN_S = 15  # pytest stops this long before its part's budget, to report its counts


@dataclasses.dataclass(frozen=True)
class Part:
    """One check. `run(budget_s)` returns {"summary": str, "tables": {title: [row dicts]},
    "failures": [what failed], ...raw figures}; no failures means the part passed."""

    name: str
    what: str
    budget_s: float
    run: Callable[[float], dict]


# --- the parts ----------------------------------------------------------------------------


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    """||got - reference|| / ||reference|| in float64."""
    ref = reference.double()
    return ((got.double() - ref).norm() / ref.norm()).item()


def compare(check: str, got, reference, tol: float = REL_TOL) -> dict:
    """One smoke row: the relative error of `got` against `reference` and its verdict."""
    error = relative_error(got, reference)
    return {"check": check, "relative error": error, "tolerance": tol, "ok": error <= tol}


def _skipped(check: str, reason: str) -> dict:
    return {"check": check, "relative error": None, "tolerance": None, "ok": None, "note": reason}


def _cusparselt_bf16_rows(n: int, device="cuda") -> list:
    """cuSPARSELt's bf16 2:4 GEMM, through torch's binding and through megasparse's sparse linear
    (transposable mask: forward W*M and input gradient with (W*M)^T, an expanded dY)."""
    from megasparse.core.backends import BACKENDS
    from megasparse.core.linear_op import LinearPlan, sparse_linear
    from megasparse.core.masks import weight_mask

    backend = BACKENDS["cusparselt"]
    reason = backend.device_reason(torch.device(device))
    if reason:
        return [_skipped("cuSPARSELt bf16 2:4", reason)]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, n, device=device, generator=g).bfloat16()
    w = torch.randn(n, n, device=device, generator=g).bfloat16()
    mask = weight_mask(w, "transposable")
    w_sparse = w * mask
    y_ref = x.double() @ w_sparse.double().t()
    rows = [
        compare(f"dense bf16 GEMM (baseline), {n}^3", x @ w_sparse.t(), y_ref),
        compare(
            f"torch._cslt_sparse_mm bf16 2:4, {n}^3",
            torch._cslt_sparse_mm(torch._cslt_compress(w_sparse), x.t().contiguous()).t(),
            y_ref,
        ),
    ]
    xr = x.clone().requires_grad_(True)
    plan = LinearPlan(backend, transposable=True)
    y = sparse_linear(xr, w.clone().requires_grad_(True), None, mask, plan)
    rows.append(compare(f"megasparse 2:4 linear forward (cusparselt), {n}^3", y, y_ref))
    dy = torch.randn(1, n, device=device, generator=g).bfloat16().expand(n, n)  # not contiguous
    y.backward(dy)
    rows.append(
        compare(
            f"megasparse 2:4 input gradient, expanded dY (cusparselt), {n}^3",
            xr.grad,
            dy.double() @ w_sparse.double(),
        )
    )
    return rows


def _fp8_rows(n: int, device="cuda") -> list:
    """The FP8 e4m3 2:4 GEMM of megasparse.fp8.gemm on cuSPARSELt against its CPU emulation and
    against float64 of the same quantized operands."""
    from megasparse.fp8 import gemm as fp8_gemm
    from megasparse.fp8.scaling import quantize_with, scale_from_amax
    from megasparse.core.masks import weight_mask

    check = f"FP8 e4m3 2:4 (megasparse.fp8.gemm, cuSPARSELt), {n}^3"
    reason = fp8_gemm.fp8_cusparselt_reason(torch.device(device))
    if reason:
        return [_skipped(check, reason)]
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(n, n, device=device, generator=g)
    w = torch.randn(n, n, device=device, generator=g)
    w = w * weight_mask(w)
    sx, sw = scale_from_amax(x.abs().amax()), scale_from_amax(w.abs().amax())
    x_q, x_si, w_q, w_si = (
        quantize_with(x, sx),
        sx.reciprocal(),
        quantize_with(w, sw),
        sw.reciprocal(),
    )
    y = fp8_gemm.sparse_fp8_mm(x_q, x_si, fp8_gemm.compress(w_q), n, w_si, use_cusparselt=True)
    emulated = fp8_gemm.sparse_fp8_mm(x_q.cpu(), x_si.cpu(), w_q.cpu(), n, w_si.cpu())
    exact = (x_q.double() @ w_q.double().t()) * (x_si.double() * w_si.double())
    return [
        compare(check + " vs its CPU emulation", y.cpu(), emulated),
        compare(check + " vs float64 of the e4m3 operands", y, exact),
    ]


def smoke(budget_s: float, n: int = SMOKE_SIZE, checks=(_cusparselt_bf16_rows, _fp8_rows)) -> dict:
    """Every check's rows at size n; a row above its tolerance fails the part."""
    rows = [row for check in checks for row in check(n)]
    failures = [
        f"{r['check']}: relative error {r['relative error']:.3g} > {r['tolerance']}"
        for r in rows
        if r["ok"] is False
    ]
    ran = [r for r in rows if r["ok"] is not None]
    return {
        "summary": f"{len(ran) - len(failures)} of {len(ran)} within tolerance"
        + (f", {len(rows) - len(ran)} skipped" if len(rows) > len(ran) else ""),
        "tables": {"relative error against the reference": rows},
        "failures": failures,
    }


def _search_shapes(n: int) -> tuple:
    """(tokens, out, in): a square GEMM and the reference FFN's fc1 and fc2 at n tokens."""
    ffn = n * 7 // 2
    return ((n // 2, n // 2, n // 2), (n, ffn, n), (n, n, ffn))


def _search_row(check: str, search, operands, reference: torch.Tensor, dense: torch.Tensor):
    """cuSPARSELt's own search on `operands`; the found algorithm's result against algorithm 0
    (megasparse's acceptance check, repeated runs), float64 and the dense GEMM."""
    from megasparse.core import cusparselt_search

    found = cusparselt_search.torch_search(*operands)
    accepted, worst, tolerance, why = search.check(found, operands)
    got = cusparselt_search.sparse_mm(operands.compressed, operands.dense, found, *operands[2:])
    got = got.t() if not operands.transpose_result else got
    row = compare(f"{check}: algorithm {tuple(found)}", got, reference)
    against_dense = relative_error(got, dense)
    row.update(
        {
            "max |found - algorithm 0|": worst,
            "check tolerance": tolerance,
            "relative error vs dense GEMM": against_dense,
            "ok": bool(row["ok"] and accepted and against_dense <= REL_TOL),
        }
    )
    if why:
        row["note"] = why
    return row


def _cusparselt_search_rows(n: int, device="cuda") -> list:
    """The algorithm search (megasparse.core.cusparselt_search) at a few shapes, bf16 and fp16 as
    the backend calls it and e4m3 as megasparse.fp8.gemm calls it: each found algorithm against
    algorithm 0, float64 and the dense GEMM. The check that must pass before
    MEGASPARSE_CUSPARSELT_SEARCH can default on."""
    from megasparse.core.backends import BACKENDS
    from megasparse.core.cusparselt_search import AlgorithmSearch, Operands
    from megasparse.core.masks import weight_mask
    from megasparse.fp8 import gemm as fp8_gemm

    reason = BACKENDS["cusparselt"].device_reason(torch.device(device))
    if reason:
        return [_skipped("cuSPARSELt algorithm search", reason)]
    search = AlgorithmSearch()  # its check only: nothing searched through it, nothing stored
    g = torch.Generator(device=device).manual_seed(2)
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for tokens, out, k in _search_shapes(n):
            w = torch.randn(out, k, device=device, generator=g).to(dtype)
            w = w * weight_mask(w, "transposable")
            x = torch.randn(tokens, k, device=device, generator=g).to(dtype)
            operands = Operands(torch._cslt_compress(w), x.t(), transpose_result=True)
            check = f"search {str(dtype).replace('torch.', '')} {tokens}x{out}x{k}"
            reference = x.double() @ w.double().t()
            rows.append(_search_row(check, search, operands, reference, x @ w.t()))
            del w, x, operands
    fp8_reason = fp8_gemm.fp8_cusparselt_reason(torch.device(device))
    if fp8_reason:
        return rows + [_skipped("search e4m3", fp8_reason)]
    for tokens, out, k in _search_shapes(n):
        w = torch.randn(out, k, device=device, generator=g)
        w_q = (w * weight_mask(w)).to(torch.float8_e4m3fn)
        x_q = torch.randn(tokens, k, device=device, generator=g).to(torch.float8_e4m3fn)
        operands = Operands(
            fp8_gemm.compress(w_q), x_q.t(), out_dtype=torch.bfloat16, transpose_result=False
        )
        reference = x_q.double() @ w_q.double().t()
        one = torch.ones((), device=device)
        dense = fp8_gemm.dense_fp8_mm(x_q, one, w_q, one)
        rows.append(
            _search_row(f"search e4m3 {tokens}x{out}x{k}", search, operands, reference, dense)
        )
    return rows


SWEEP_SHAPE = 512  # pytorch#155333 saw wrong results from 256 rows up (A100, alg_id 20)
SWEEP_LIMIT = 70  # xformers' own sweep bound; the sweep stops at the first id cuSPARSELt refuses


def _algorithm_sweep_rows(n: int, device="cuda", size: int = SWEEP_SHAPE) -> list:
    """Every cuSPARSELt algorithm id at size^3 bf16 (n, the smoke size, is unused), each run
    VALIDATION_RUNS times against algorithm 0: the pytorch#155333 class of bug, whatever the
    search picks."""
    from megasparse.core.backends import BACKENDS
    from megasparse.core.cusparselt_search import Algorithm, AlgorithmSearch, Operands
    from megasparse.core.masks import weight_mask

    check = f"every cuSPARSELt algorithm id, bf16 {size}^3, against algorithm 0"
    reason = BACKENDS["cusparselt"].device_reason(torch.device(device))
    if reason:
        return [_skipped(check, reason)]
    search = AlgorithmSearch()
    g = torch.Generator(device=device).manual_seed(3)
    w = torch.randn(size, size, device=device, generator=g).bfloat16()
    w = w * weight_mask(w, "transposable")
    x = torch.randn(size, size, device=device, generator=g).bfloat16()
    operands = Operands(torch._cslt_compress(w), x.t(), transpose_result=True)
    ran, differing = [], []
    for alg_id in range(SWEEP_LIMIT):
        accepted, worst, tolerance, why = search.check(Algorithm(alg_id), operands)
        if "raised" in why:
            break
        ran.append(alg_id)
        if not accepted:
            differing.append((alg_id, worst))
    reference = x.double() @ w.double().t()
    row = compare(check, x @ w.t(), reference)  # the dense GEMM: the sweep's own sanity
    row["ok"] = bool(row["ok"] and not differing and ran)
    row["note"] = f"ids 0..{ran[-1] if ran else '-'} ran; differing from algorithm 0: " + (
        ", ".join(f"{i} (max |diff| {d:.3g})" for i, d in differing) or "none"
    )
    return [row]


def cusparselt_search_part(budget_s: float, n: int = SMOKE_SIZE // 2) -> dict:
    return smoke(budget_s, n, checks=(_cusparselt_search_rows, _algorithm_sweep_rows))


def kernel_rows(bandwidths: dict, device: Optional[str] = None) -> list:
    """bench.kernel_bandwidths as table rows: each kernel's time beside the projection's (perfmodel
    runs memory-bound kernels at MEMORY_EFFICIENCY of the device's HBM bandwidth), and its speed
    against a copy of the same bytes judged by the bench's memory-bound target."""
    from megasparse.tools.perf.roofline import DEVICES, memory_time
    from megasparse.tools.bench import TARGETS

    target = TARGETS["mask_bandwidth"][1]
    return [
        {
            "kernel": name,
            "MB moved": b["bytes"] / 1e6,
            "kernel ms, measured": b["ms"],
            "kernel ms, projected": memory_time(b["bytes"], DEVICES[device]) * 1e3
            if device
            else None,
            "copy ms": b["copy_ms"],
            "vs copy": b["vs_copy"],
            f"vs copy >= {target}": "met" if b["vs_copy"] >= target else "MISSED",
        }
        for name, b in bandwidths.items()
    ]


def kernel_bandwidth(budget_s: float) -> dict:
    from megasparse.tools import bench, perfmodel

    bandwidths = bench.kernel_bandwidths(perfmodel.HIDDEN, perfmodel.FFN)
    slowest = min(bandwidths, key=lambda k: bandwidths[k]["vs_copy"])
    device = bench.device_key(torch.cuda.get_device_name())
    return {
        "summary": f"{len(bandwidths)} kernels; slowest {slowest} at "
        f"{bandwidths[slowest]['vs_copy']:.2f}x a copy of the same bytes",
        "tables": {
            "bandwidth against a device copy of the same bytes": kernel_rows(bandwidths, device)
        },
        "failures": [],
        "kernels": bandwidths,
    }


def junit_counts(path) -> dict:
    """passed / failed / errors / skipped and the failed tests' ids from pytest's JUnit XML."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failed_tests": []}
    for suite in suites:
        for case in suite.iter("testcase"):
            outcome = next(
                (c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed"
            )
            key = {"failure": "failed", "error": "errors"}.get(outcome, outcome)
            counts[key] += 1
            if outcome in ("failure", "error"):
                counts["failed_tests"].append(f"{case.get('classname')}::{case.get('name')}")
    return counts


def gpu_tests(budget_s: float, tests_dir: Optional[Path] = None) -> dict:
    """pytest -m gpu in a process of its own (stopped a little before the part's budget)."""
    tests_dir = Path(tests_dir or ROOT / "tests")
    if not tests_dir.is_dir():
        raise FileNotFoundError(
            f"no tests at {tests_dir}: run gpu_check from a source checkout (pip install -e .)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
        command += [f"--junitxml={xml}", str(tests_dir)]
        timeout = max(budget_s - PYTEST_MARGIN_S, MIN_PART_S)
        code, output, timed_out = run_process_group(command, timeout, cwd=tests_dir.parent)
        if timed_out:
            raise TimeoutError(f"pytest -m gpu ran past {timeout:.0f} s:\n{output[-2000:]}")
        if not os.path.exists(xml):
            raise RuntimeError(f"pytest exited with {code} and no report:\n{output[-2000:]}")
        counts = junit_counts(xml)
    failures = [f"test failed: {name}" for name in counts["failed_tests"]]
    if sum(counts[k] for k in ("passed", "failed", "errors", "skipped")) == 0:
        failures.append(f"no gpu-marked test ran (pytest exit code {code})")
    summary = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "errors", "skipped"))
    return {
        "summary": summary,
        "tables": {
            "pytest -m gpu": [{k: counts[k] for k in ("passed", "failed", "errors", "skipped")}]
        },
        "failures": failures,
        "counts": counts,
        "output_tail": output[-3000:] if failures else "",
    }


def bench_tables(results: dict, projected_targets: dict) -> dict:
    """bench's measured rows and targets, each measured figure beside its projection."""
    from megasparse.tools.bench import MICROBATCHES, TARGETS

    steps = [
        {
            "recipe": r["recipe"],
            "tokens": r["tokens"],
            "ratio vs dense, measured": r["measured_ratio"],
            "ratio vs dense, projected": r.get("projected_ratio"),
            "step ms, measured": r["step_ms"],
            "step ms, projected": r.get("projected_step_ms"),
            "dense step ms, measured": r.get("dense_step_ms"),
            "dense step ms, projected": r.get("projected_dense_step_ms"),
            "weight prep share, measured": r.get("weight_prep_share"),
            "weight prep share, projected": r.get("projected_weight_prep_share"),
        }
        for r in results["rows"]
    ]
    targets = []
    for key, (what, threshold, higher) in TARGETS.items():
        measured = results["targets"].get(key)
        met = (
            None
            if measured is None
            else (measured >= threshold if higher else measured <= threshold)
        )
        targets.append(
            {
                "target": what,
                "measured": measured,
                "projected": projected_targets.get(key),
                "threshold": f"{'>=' if higher else '<='} {threshold}",
                "measured verdict": {None: "not measured", True: "met", False: "MISSED"}[met],
            }
        )
    return {
        f"FFN optimizer step (k={MICROBATCHES}) against dense bf16": steps,
        "bench targets": targets,
    }


def bench(budget_s: float) -> dict:
    from megasparse.testing import free_port, init_megatron, shutdown_megatron
    from megasparse.tools import bench as bench_tool
    from megasparse.tools import perfmodel

    init_megatron(0, 1, free_port(), tensor_model_parallel_size=1)
    try:
        results = bench_tool.bench_gpu(
            argparse.Namespace(quick=False),
            shapes=[(perfmodel.HIDDEN, perfmodel.FFN)],
            tokens_list=bench_tool.TOKENS,
        )
    finally:
        shutdown_megatron()
    device = bench_tool.device_key(results["device"])
    projected = bench_tool.projected_targets(device) if device else {}
    tables = bench_tables(results, projected)
    missed = sum(row["measured verdict"] == "MISSED" for row in tables["bench targets"])
    return {
        "summary": f"{len(results['rows'])} FFN cases at hidden {perfmodel.HIDDEN}, ffn "
        f"{perfmodel.FFN}; {missed} of {len(bench_tool.TARGETS)} targets missed"
        + ("" if device else "; no projection for this device"),
        "tables": tables,
        "failures": [],
        "bench": results,
        "projected_targets": projected,
    }


PARTS = (
    Part("smoke", "cuSPARSELt bf16 and FP8 e4m3 2:4 at real shapes against references", 60, smoke),
    Part(
        "kernel_bandwidth", "Triton kernels against a copy of the same bytes", 60, kernel_bandwidth
    ),
    Part(
        "cusparselt_search",
        "cuSPARSELt algorithm search at a few shapes and every algorithm id against algorithm 0",
        45,
        cusparselt_search_part,
    ),
    Part("gpu_tests", "the gpu-marked tests (pytest -m gpu)", 150, gpu_tests),
    Part("bench", "megasparse.tools.bench beside megasparse.tools.perfmodel", 180, bench),
)


# --- running the parts ----------------------------------------------------------------------


def run_process_group(command, timeout_s: float, **kwargs):
    """(exit code, stdout + stderr, timed out) of `command`; past `timeout_s` its whole process
    group is killed (pytest's or a part's children included)."""
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kwargs,
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, output, False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        output, _ = proc.communicate()
        return proc.returncode, output, True
    except BaseException:  # Ctrl-C: the part's processes stop with the check
        _kill_group(proc)
        proc.wait()
        raise


def _kill_group(proc) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, signal.SIGKILL)


def _result(part: Part, status: str, wall_s: float, error=None, **data) -> dict:
    return {
        "name": part.name,
        "what": part.what,
        "status": status,
        "budget_s": part.budget_s,
        "wall_s": round(wall_s, 1),
        "error": error,
        **data,
    }


def run_part(part: Part, budget_s: Optional[float] = None) -> dict:
    """Run one part in this process; an exception or a failed check makes it "failed"."""
    start = time.monotonic()
    try:
        data = part.run(part.budget_s if budget_s is None else budget_s)
    except Exception as exc:  # noqa: BLE001 - a failing part must not stop the others
        return _result(
            part,
            "failed",
            time.monotonic() - start,
            f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(),
        )
    failures = data.get("failures", [])
    return _result(
        part,
        "failed" if failures else "passed",
        time.monotonic() - start,
        "; ".join(failures) or None,
        **data,
    )


def part_command(name: str, result_path: str, budget_s: float) -> list:
    return [
        sys.executable,
        "-m",
        "megasparse.tools.gpu_check",
        "--run-part",
        name,
        "--result",
        result_path,
        "--budget",
        str(budget_s),
    ]


def run_isolated(part: Part, budget_s: float) -> dict:
    """Run one part in a process of its own, killed at `budget_s`."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        code, output, timed_out = run_process_group(
            part_command(part.name, path, budget_s), budget_s
        )
        wall = time.monotonic() - start
        if timed_out:
            return _result(
                part,
                "failed",
                wall,
                f"ran past its budget of {budget_s:.0f} s",
                output_tail=output[-3000:],
            )
        if not os.path.exists(path):
            return _result(
                part,
                "failed",
                wall,
                f"its process exited with code {code} before writing a result",
                output_tail=output[-3000:],
            )
        with open(path) as f:
            result = json.load(f)
    result["wall_s"] = round(wall, 1)
    if result["status"] == "failed":
        result.setdefault("output_tail", output[-3000:])
    return result


def run_parts(parts, runner=run_isolated, total_budget_s: float = TOTAL_BUDGET_S) -> list:
    """Every part in order within the total budget; one failing part does not stop the others."""
    deadline = time.monotonic() + total_budget_s
    results = []
    for part in parts:
        budget = min(part.budget_s, deadline - time.monotonic())
        if budget < MIN_PART_S:
            results.append(
                _result(part, "failed", 0.0, "not run: the check's total budget was spent")
            )
        else:
            print(f"gpu_check: {part.name} ({part.what}), budget {budget:.0f} s ...", flush=True)
            results.append({**runner(part, budget), "budget_s": round(budget, 1)})
        print(
            f"gpu_check: {part.name} {results[-1]['status']} in {results[-1]['wall_s']} s",
            flush=True,
        )
    return results


# --- the report -----------------------------------------------------------------------------


def environment() -> dict:
    """The device and the versions the figures were measured with."""
    from importlib import metadata

    def version(package):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    cusparselt = torch.backends.cusparselt.version()  # major * 1000 + minor * 100 + patch
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:  # no git
        commit = ""
    major, minor = torch.cuda.get_device_capability()
    return {
        "device": torch.cuda.get_device_name(),
        "capability": f"sm{major}{minor}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cusparselt": None
        if cusparselt is None
        else f"{cusparselt // 1000}.{cusparselt % 1000 // 100}.{cusparselt % 100}",
        "triton": version("triton"),
        "megatron_core": version("megatron-core"),
        "megasparse_commit": commit or None,
    }


def build_report(env: dict, results: list) -> dict:
    failed = [r["name"] for r in results if r["status"] != "passed"]
    return {
        "environment": env,
        "ok": not failed,
        "failed_parts": failed,
        "total_budget_s": TOTAL_BUDGET_S,
        "wall_s": round(sum(r["wall_s"] for r in results), 1),
        "parts": results,
    }


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list) -> list:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# megasparse GPU check",
        "",
        f"{env['device']} ({env['capability']}); torch {env['torch']}, CUDA {env['cuda']}, "
        f"cuSPARSELt {env['cusparselt']}, Triton {env.get('triton')}, megatron-core "
        f"{env.get('megatron_core')}, megasparse {env.get('megasparse_commit')}",
        "",
        f"**{'PASSED' if report['ok'] else 'FAILED'}**"
        + (f": failed parts: {', '.join(report['failed_parts'])}" if report["failed_parts"] else "")
        + f" ({report['wall_s']} s of a {report['total_budget_s']} s budget)",
        "",
    ]
    lines += markdown_table(
        [
            {
                "part": r["name"],
                "status": r["status"],
                "seconds": r["wall_s"],
                "budget s": r["budget_s"],
                "summary": r.get("summary") or r.get("error"),
            }
            for r in report["parts"]
        ]
    )
    for r in report["parts"]:
        lines += ["", f"## {r['name']}: {r['what']} ({r['status']})"]
        if r.get("error"):
            lines += ["", f"Failed: {_cell(r['error'])}"]
        for title, rows in r.get("tables", {}).items():
            if rows:
                lines += ["", f"{title}:", ""] + markdown_table(rows)
    return "\n".join(lines) + "\n"


def main(argv=None, parts=PARTS, runner=run_isolated) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--json", default="gpu_check.json", help="the JSON report (default: %(default)s)"
    )
    parser.add_argument(
        "--md", help="also write the Markdown report here (it is printed either way)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=[p.name for p in parts],
        help="run only this part (repeatable)",
    )
    parser.add_argument("--run-part", help=argparse.SUPPRESS)  # a part's own process
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    by_name = {p.name: p for p in parts}
    if args.run_part:
        result = run_part(by_name[args.run_part], args.budget)
        with open(args.result, "w") as f:
            json.dump(result, f, indent=1, default=str)
        return 0
    if not torch.cuda.is_available():
        print(
            "megasparse gpu_check: no CUDA GPU here, nothing to check (run it on a machine with one)."
        )
        return 0
    env = environment()
    print(f"gpu_check on {env['device']} ({env['capability']}), torch {env['torch']}", flush=True)
    chosen = [by_name[name] for name in args.only] if args.only else list(parts)
    report = build_report(env, run_parts(chosen, runner))
    text = markdown(report)
    for path in (args.json, args.md):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1, default=str)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    print(text)
    print(f"wrote {args.json}" + (f" and {args.md}" if args.md else ""))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
