"""The TE-spec and MoE projection rows: keys, before/after directions, hand counts (meta only)."""

import contextlib
import json

import pytest
import torch

from megasparse.tools import perfmodel
from megasparse.tools.perf import bench_te, moe, te_report, te_spec
from megasparse.tools.perf.models import REFERENCE
from megasparse.tools.perf.roofline import DEVICES, GEMM_EFFICIENCY, memory_time, op_time

H100 = DEVICES["H100"]
MID = ("mid",)
COMMON = {"section", "projected", "device", "bound"}


@pytest.fixture(scope="module")
def bf16():
    return te_spec.bf16_rows("H100", MID)


@pytest.fixture(scope="module")
def fp8():
    return te_spec.fp8_rows("H100", MID)


@pytest.fixture(scope="module")
def changes():
    return {r["change"]: r for r in te_spec.change_rows("H100", MID)}


def _one(rows, **where):
    (row,) = [r for r in rows if all(r[k] == v for k, v in where.items())]
    return row


def test_bf16_rows_have_their_keys_and_the_sparse_route_beats_the_dense_gemm_on_w_times_m(bf16):
    keys = {"weights", "scope", "tokens", "gate_roles", "te_dense_ms", "before_ms", "after_ms"}
    keys |= {"local_ms", "forced_dense_ms", "after_vs_local", "before_vs_te_dense"}
    for r in bf16:
        assert COMMON | keys <= set(r) and r["projected"] is True
        # TE's dense GEMM on W*M: the dense model's GEMMs plus the per-step mask and W*M
        assert r["before_ms"] > r["te_dense_ms"]
        assert r["before_ms"] == pytest.approx(r["forced_dense_ms"])
    for w in ("1d", "transposable"):
        big = _one(bf16, weights=w, scope="ffn", tokens=te_spec.TOKENS)
        assert big["gate_roles"] == list(te_spec.SPARSE_ROLES)
        assert big["after_ms"] < big["before_ms"] and big["after_ms"] <= big["local_ms"] * (
            1 + 1e-9
        )
        small = _one(bf16, weights=w, scope="ffn", tokens=te_spec.GATE_DENSE_TOKENS)
        assert small["gate_roles"] == [] and small["after_ms"] == pytest.approx(small["before_ms"])


def test_transposable_after_is_the_local_spec_op(bf16):
    row = _one(bf16, weights="transposable", scope="ffn", tokens=te_spec.TOKENS)
    assert row["after_ms"] == pytest.approx(row["local_ms"], rel=1e-9)


def test_fp8_each_change_helps_and_both_together_help_most(fp8):
    for r in fp8:
        for part in ("ffn", "fc1"):
            before, after = r[f"before_{part}_ms"], r[f"after_{part}_ms"]
            assert after < r[f"fused_norm_only_{part}_ms"] < before
            assert after < r[f"accumulate_only_{part}_ms"] < before
        # fc2 has no norm: only the in-GEMM accumulation changes it
        assert r["fused_norm_only_fc2_ms"] == pytest.approx(r["before_fc2_ms"])
        assert r["after_fc2_ms"] < r["before_fc2_ms"]


def test_eager_norm_moves_the_hand_counted_bytes(changes):
    row = changes["FP8 LayerNormLinear: TE's fused norm"]
    elems = te_spec.TOKENS * REFERENCE.hidden
    # forward: x -> fp32 (2 + 4 bytes), fp32 layer_norm (4 + 4), -> bf16 (4 + 2); backward: dy ->
    # fp32 (2 + 4), layer_norm backward reads x, dy, writes dx in fp32 (3 * 4), dx -> bf16 (4 + 2)
    eager = (6 + 8 + 6 + 6 + 12 + 6) * elems
    fused = (2 + 2 + 3 * 2) * elems  # TE's kernel: x in, y out; x, dy in, dx out, all bf16
    assert row["before_gb"] == pytest.approx(eager / 1e9, rel=0.01)
    assert row["after_gb"] == pytest.approx(fused / 1e9, rel=0.01)
    assert row["before"] == pytest.approx(memory_time(eager, H100) * 1e3, rel=0.01)
    assert row["before_forward_ms"] == pytest.approx(memory_time(20 * elems, H100) * 1e3, rel=0.01)


def test_in_gemm_accumulation_saves_the_add_pass(changes):
    row = changes["FP8 wgrad accumulates into main_grad in the GEMM"]
    elems = REFERENCE.ffn * REFERENCE.hidden
    assert row["temporary_gb"] == pytest.approx(elems * 4 / 1e9)
    assert row["add_pass_gb"] == pytest.approx(3 * row["temporary_gb"])
    # the GEMM is compute-bound: reading main_grad in it costs nothing; the add_ pass goes
    assert row["before"] - row["after"] == pytest.approx(memory_time(3 * elems * 4, H100) * 1e3)


def test_1d_hold_saves_the_rebuild_of_both_weights_each_micro_batch(changes):
    row = changes["1d masks hold W*M for the dgrad"]
    case = te_spec.TeCase("1d", hold=False)
    shape = REFERENCE
    rebuild = te_spec.rebuild_records(case, shape.ffn, shape.hidden)
    rebuild += te_spec.rebuild_records(case, shape.hidden, shape.ffn)
    assert row["before"] - row["after"] == pytest.approx(
        sum(op_time(r, H100) for r in rebuild) * 1e3, rel=1e-6
    )
    assert te_spec.rebuild_records(te_spec.TeCase("1d", hold=True), 64, 128) == []
    assert row["state_gb_per_ffn"] == pytest.approx(2 * shape.ffn * shape.hidden * 2 / 1e9)


def test_alg_search_scales_only_the_sparse_gemms(changes):
    for label in ("bf16", "FP8"):
        row = changes[f"cuSPARSELt algorithm search, {label} (transposable)"]
        assert row["assumed_gain"] == te_spec.ALG_SEARCH_GAIN
        assert 1.0 < row["gain"] < te_spec.ALG_SEARCH_GAIN
    records = te_spec.case_records(te_spec.TeCase(route="te_gemm"))
    assert te_spec.step_ms(records, alg_gain=2.0) == te_spec.step_ms(records)  # nothing sparse


def test_accumulate_in_gemm_refuses_a_path_without_the_add():
    with pytest.raises(RuntimeError, match="recorded FP8 path changed"):
        te_spec._accumulate_in_gemm([], 4 * 64 * 128)


def test_uneven_loads_are_a_fixed_ramp_summing_to_the_routed_tokens():
    loads = moe.uneven_loads(8, 2)
    assert loads == moe.uneven_loads(8, 2) and sum(loads) == moe.TOKENS * 2
    mean = moe.TOKENS * 2 / 8
    assert min(loads) == pytest.approx(mean * 0.5, abs=2) and max(loads) == pytest.approx(
        1.5 * mean, abs=8
    )
    assert moe.uneven_loads(4, 1, 1000, 0.0) == (250, 250, 250, 250)


def test_dense_grouped_experts_equal_the_hand_count():
    loads = (8192, 4096)
    got = moe.experts_seconds(loads, H100, "mid")["dense"]
    h, f = REFERENCE.hidden, REFERENCE.ffn
    flops = sum(6 * 2 * t * h * f for t in loads)
    act_bytes = sum(5 * t * f * 2 for t in loads)
    want = flops / (H100.bf16_tflops * 1e12 * GEMM_EFFICIENCY) + memory_time(act_bytes, H100)
    assert got == pytest.approx(want + moe.GEMMS_PER_EXPERT * moe.LAUNCH_US * 1e-6, rel=1e-6)


def test_moe_ratio_follows_the_load_vector():
    below = moe.moe_row(8, 2, loads=(2048,) * 8)
    above = moe.moe_row(8, 2, loads=(16384,) * 8)
    assert below["sparse_experts"] == 0 and below["after_vs_dense"] < 1.0
    assert above["sparse_experts"] == 8 and above["after_vs_dense"] > 1.0
    # the same tokens, more uneven: more padding for the batched binding, and it loses ground
    even, uneven = moe.moe_row(8, 2, loads=(8192,) * 8), moe.moe_row(8, 2)
    assert even["batched_padding_waste"] == 0 < uneven["batched_padding_waste"]
    assert even["batched_vs_after"] > uneven["batched_vs_after"]
    assert uneven["fp8_host_after_ms"] < uneven["fp8_host_before_ms"]
    assert uneven["before_vs_dense"] < 1.0  # dense grouped GEMMs on W*M: only the prep added


def test_cli_prints_the_tables_and_targets_and_writes_projected_rows(tmp_path, capsys):
    out = tmp_path / "te.json"
    perfmodel.main(["--te", "--moe", "--json", str(out)])
    text = capsys.readouterr().out
    for needle in (
        "Targets of the TE spec and MoE (PROJECTED",
        ">= local spec",
        "within 3% of TE dense",
        "vs FP8 dense >= 1.1x",
        "MoE 8 experts top-2",
        "ASSUMPTION",
        "assumed host costs",
        "TE spec and MoE summary",
    ):
        assert needle in text
    assert "MET" in text or "MISSED" in text
    rows = json.loads(out.read_text())
    sections = {r["section"] for r in rows}
    assert sections == {"te_bf16", "te_fp8", "change", "te_activation", "moe"}
    assert all(r["projected"] is True and r["bound"] in te_spec.BOUNDS for r in rows)
    act = [r for r in rows if r["section"] == "te_activation"]
    assert {r["recipe"] for r in act} == {"2:4 + 2:4 act", "2:4 (transposable) + 64:2:16 act"}
    assert all(r["after_vs_te_dense"] > 1.0 for r in act)


def test_summary_reads_only_mid_rows():
    lines = te_report.summary(te_report.summary_rows())
    assert lines[0].startswith("== TE spec and MoE summary (PROJECTED")
    assert any("FP8 dense" in line for line in lines)
    with pytest.raises(KeyError, match="no projected row"):
        te_report._pick([], section="moe")


class _TinyMLP(torch.nn.Module):
    """A stand-in for Megatron's MLP: (output, bias) like it, the sparsity it was built with."""

    def __init__(self, hidden, ffn, sparsity):
        super().__init__()
        self.fc1, self.fc2, self.sparsity = (
            torch.nn.Linear(hidden, ffn),
            torch.nn.Linear(ffn, hidden),
            sparsity,
        )

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)) ** 2), None


def test_bench_te_skips_cleanly_without_a_gpu_or_te():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    (row,) = bench_te.te_ffn_rows(lambda fn: 1.0, 64, 128, 16)
    assert "no CUDA device" in row["skipped"]


def test_bench_te_pairs_each_recipe_with_its_baseline_and_runs_each_step(monkeypatch):
    monkeypatch.setattr(bench_te, "_fp8_context", lambda fp8: contextlib.nullcontext)
    built, ms = [], iter((10.0, 8.0, 5.0, 4.0, 2.0))

    def build(hidden, ffn, sparsity):
        built.append(None if sparsity is None else sparsity.mask)
        return _TinyMLP(hidden, ffn, sparsity).to(torch.bfloat16)

    def timer(step):
        step()  # k micro-batches and the optimizer step run for real
        return next(ms)

    rows = bench_te.te_ffn_rows(timer, 16, 32, 8, k=2, build=build, device="cpu")
    assert built == [None, "1d", "transposable", None, "transposable"]
    got = {r["recipe"]: (r["baseline"], r["measured_ratio"], r["projected_ratio"]) for r in rows}
    assert got == {
        "2:4 1d": ("dense", 10.0 / 8.0, None),
        "2:4": ("dense", 10.0 / 5.0, None),
        "FP8 2:4": ("FP8 dense", 4.0 / 2.0, None),
    }


def test_bench_te_projection_is_te_specs_row():
    row = _one(te_spec.fp8_rows("H100", MID), weights="transposable")
    assert bench_te.projected_ratio("FP8 2:4") == row["after_vs_fp8_dense"]
    assert bench_te.projected_ratio("dense") == 1.0
