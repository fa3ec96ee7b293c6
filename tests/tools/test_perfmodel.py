"""The perf model's accounting against hand counts (no timing: everything runs on meta tensors)."""

import json

import pytest
import torch

from megasparse.core.backends import BACKENDS
from megasparse.tools.perf.fake_ops import fake_gpu_ops
from megasparse.config import SparsityConfig
from megasparse.tools.perf.recorder import WEIGHT_PREP, OpRecorder
from megasparse.core.linear_op import LinearPlan, sparse_linear, sparse_linear_step
from megasparse.core.weight_state import SparseWeightState
from megasparse.tools.perf.roofline import DEVICES, SPEEDUPS, op_time
from megasparse.tools import perfmodel
from megasparse.tools.perf.meta_model import _standins

BF16 = torch.bfloat16


def meta(*shape, dtype=BF16, grad=False):
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)


def test_gemm_flops_equal_the_hand_count():
    a, b = meta(384, 512), meta(512, 256)
    with OpRecorder() as rec:
        torch.mm(a, b)
    (r,) = rec.records
    assert (r.kind, r.flops, r.mnk, r.sparse_operand) == (
        "gemm",
        2 * 384 * 256 * 512,
        (384, 256, 512),
        None,
    )
    assert (r.bytes_read, r.bytes_written) == ((384 * 512 + 512 * 256) * 2, 384 * 256 * 2)


def test_elementwise_bytes_equal_the_tensor_sizes():
    x, y, bias = meta(64, 128), meta(64, 128), meta(128, dtype=torch.float32)
    with OpRecorder() as rec:
        x + y
        x * bias  # broadcast: the bias is read once, not 64 times
    add, mul = rec.records
    assert (add.kind, add.bytes_read, add.bytes_written) == (
        "memory",
        2 * 64 * 128 * 2,
        64 * 128 * 2,
    )
    assert (mul.bytes_read, mul.bytes_written) == (64 * 128 * 2 + 128 * 4, 64 * 128 * 4)


def test_sparse_linear_on_cusparselt_is_flagged_sparse_and_weight_work_is_per_step():
    tokens, out_f, in_f = 4096, 512, 1024
    x, w = meta(tokens, in_f, grad=True), meta(out_f, in_f, grad=True)
    plan = LinearPlan(backend=BACKENDS["cusparselt"], transposable=True)
    sparsity = SparsityConfig(mask="transposable")
    with _standins(), OpRecorder() as rec:
        rec.mark_weight(w)
        with rec.phase(WEIGHT_PREP):  # the step's first use builds the state
            step = SparseWeightState().step(w, sparsity, plan.backend)
            step.compressed(), step.compressed_t()
        for _ in range(2):  # two micro-batches reuse it
            y = sparse_linear_step(x, w, None, step, plan)
            y.backward(torch.empty_like(y))
    gemms = [r for r in rec.records if r.kind == "gemm"]
    fwd, dgrad, wgrad = gemms[:3]
    assert len(gemms) == 6 and [g.op for g in gemms[3:]] == [g.op for g in gemms[:3]]
    assert (fwd.op, fwd.sparse_operand, fwd.flops) == (
        "_cslt_sparse_mm",
        "A",
        2 * tokens * out_f * in_f,
    )
    assert (dgrad.op, dgrad.sparse_operand, dgrad.mnk) == (
        "_cslt_sparse_mm",
        "A",
        (in_f, tokens, out_f),
    )
    assert (wgrad.op, wgrad.sparse_operand, wgrad.flops) == ("mm", None, 2 * tokens * out_f * in_f)
    assert all(r.phase == "microbatch" for r in gemms)
    # W and W^T compressed once for the step; nothing is compressed per micro-batch
    compressions = [r for r in rec.records if r.op == "_cslt_compress"]
    assert [r.phase for r in compressions] == ["weight_prep", "weight_prep"]
    assert (
        compressions[0].bytes_written == out_f * in_f * 9 // 16 * 2
    )  # cuSPARSELtOps.cpp: numel * 9 / 16


def test_sparse_gemm_time_is_dense_time_over_the_cited_speedup():
    x, w = meta(16384, 8192), meta(3584, 8192)
    mask = meta(3584, 8192, dtype=torch.bool)
    with fake_gpu_ops(), OpRecorder() as rec:
        sparse_linear(x, w, None, mask, LinearPlan(backend=BACKENDS["cusparselt"]))
        torch.mm(x, w.t())
    sparse, dense = [r for r in rec.records if r.kind == "gemm"]
    h100 = DEVICES["H100"]
    low, high, _ = SPEEDUPS[("sm90", BF16)]
    assert op_time(sparse, h100, "low") == pytest.approx(op_time(dense, h100) / low)
    assert op_time(sparse, h100, "high") == pytest.approx(op_time(dense, h100) / high)
    assert op_time(dense, h100) == pytest.approx(2 * 16384 * 3584 * 8192 / (989.4e12 * 0.70))


def test_rows_have_the_json_keys_and_dense_is_one(tmp_path, monkeypatch):
    rows = perfmodel.rows(
        devices={"H100": DEVICES["H100"]},
        tokens_list=(4096,),
        tps=(8,),
        ks=(1, 16),
        scopes=("ffn",),
        recipes=("dense bf16", "2:4 (transposable)"),
    )
    keys = {
        "device",
        "recipe",
        "scope",
        "tokens",
        "tp",
        "microbatches",
        "ratio_vs_dense",
        "weight_prep_share",
    }
    assert len(rows) == 4 and all(keys <= set(r) for r in rows)
    by = {(r["recipe"], r["microbatches"]): r for r in rows}
    assert (
        by[("dense bf16", 1)]["ratio_vs_dense"] == 1.0
        and by[("dense bf16", 1)]["weight_prep_share"] == 0
    )
    # the weight prep is amortized: its share falls with more micro-batches per step
    assert (
        by[("2:4 (transposable)", 16)]["weight_prep_share"]
        < by[("2:4 (transposable)", 1)]["weight_prep_share"]
    )
    act_rows = [
        {"recipe": "dense bf16", "scope": "ffn", "tp": 1, "bound": bound}
        | {"ratio_sparse_steps": 1.0, "ratio_schedule": 1.0}
        for bound in ("low", "mid", "high")
    ]
    monkeypatch.setattr(perfmodel, "rows", lambda bound, scopes: rows)
    monkeypatch.setattr(perfmodel, "activation_rows", lambda: act_rows)
    perfmodel.main(["--json", str(tmp_path / "p.json")])
    assert json.loads((tmp_path / "p.json").read_text()) == rows + act_rows


def test_report_says_projected_and_gives_a_verdict_per_target():
    lines = perfmodel.report()
    assert "PROJECTED" in lines[0]
    verdicts = [line for line in lines if "-> PROJECTED" in line]
    assert len(verdicts) == 3 and all(v.endswith(("MET", "MISSED")) for v in verdicts)
    assert any("ceiling" in line for line in lines)


@pytest.mark.parametrize("recipe", ["FP8 2:4", "FP8 2:4 (transposable)"])
def test_fp8_2_4_quantizes_with_the_fused_cast_kernel(recipe):
    """megasparse's FP8 casts are projected as the fused kernel (megasparse.kernels.fp8_cast: one
    read of t, q and its padded transpose written) under Megatron's default delayed scaling: x and
    dY record their amax from the cast's own pass (as TE's fused cast for the FP8 dense baseline);
    only the e4m3 dY of the sparse dgrad (transposable, current scaling) has an amax pass first.
    No unfused abs / amax / mul / clamp / cast passes over the operands."""
    tokens, tp = 4096, 8
    records = perfmodel.record_case(recipe, "ffn", tokens, tp).records
    micro = [r for r in records if r.phase == "microbatch"]
    assert not any(r.op in ("amax", "clamp", "clamp_min") for r in records)
    assert all(r.bytes_read <= 16 for r in micro if r.op in ("abs", "reciprocal", "ne"))  # scalars
    casts = [r for r in micro if r.op == "megasparse_perf.fp8_cast"]
    ffn, hidden = perfmodel.FFN // tp, perfmodel.HIDDEN
    # fc1 x, fc2 x (forward), fc2 dY, fc1 dY (backward, HYBRID e5m2, for the wgrad; for the dense
    # dgrad too with 1d masks): each with its transpose for the wgrad, its amax fused (one read of
    # t in bf16, its scale and the amax); transposable: the e4m3 dY of the sparse dgrad before
    # each e5m2 one, no transpose, its amax a reduction of its own
    fused = [(tokens * hidden, True), (tokens * ffn, True), (tokens * hidden, True)]
    fused.append((tokens * ffn, True))
    expected = list(fused)
    if "transposable" in recipe:
        expected[2:2] = [(tokens * hidden, False)]
        expected[4:4] = [(tokens * ffn, False)]
    assert [(r.bytes_read - (8 if t else 4)) // 2 for r, (_, t) in zip(casts, expected)] == [
        n for n, _ in expected
    ]
    assert [r.bytes_written for r in casts] == [(2 if t else 1) * n for n, t in expected]
    norms = [r for r in micro if r.op == "linalg_vector_norm"]
    assert [r.bytes_read // 2 for r in norms] == [n for n, t in expected if not t]
