"""The activation speed path's projection against hand counts: compact FLOPs, bytes, the gather
efficiency, the baselines, the named layers and the schedule (meta tensors, no timing)."""

import math

import pytest
import torch

from megasparse import kernels
from megasparse.config import ActivationPattern
from megasparse.core.backends import BACKENDS
from megasparse.core.activation_sparsity import ActivationStats, squared_relu_sparsify
from megasparse.core.linear_op import LinearPlan, sparse_linear_step
from megasparse.core.weight_state import WeightStep
from megasparse.tools import perfmodel
from megasparse.tools.perf import compact_ops, meta_model
from megasparse.tools.perf.models import LLAMA_7B, REFERENCE, SCHEDULE, Recipe, schedule_ratio
from megasparse.tools.perf.recorder import COMPACT, OpRecorder
from megasparse.tools.perf.roofline import (
    DEVICES,
    GATHER_EFFICIENCY,
    GEMM_EFFICIENCY,
    SPEEDUPS,
    op_time,
    project,
)

BF16 = torch.bfloat16
H100 = DEVICES["H100"]


def meta(*shape, dtype=BF16, grad=False):
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)


def _record_ffn(tokens, hidden, ffn, pattern, wgrad=None):
    """megasparse's own ops: fc1, the fused Squared-ReLU + compaction, fc2 (dense weights)."""
    x = meta(tokens, hidden, grad=True)
    w1, w2 = meta(ffn, hidden, grad=True), meta(hidden, ffn, grad=True)
    plan = LinearPlan(backend=BACKENDS["dense"])
    s1, s2 = (WeightStep(w, None, plan.backend, False, True) for w in (w1, w2))
    with meta_model._standins(), OpRecorder() as rec:
        h = sparse_linear_step(x, w1, None, s1, plan)
        a, _ = squared_relu_sparsify(h, pattern, ActivationStats(), wgrad)
        y = sparse_linear_step(a, w2, None, s2, plan)
        y.backward(torch.empty_like(y))
    return rec.records


@pytest.mark.parametrize("tokens", [256, 200])  # 200: a short last block of V tokens
def test_compact_gemms_record_their_compact_flops(tokens):
    hidden, ffn, (v, n, m) = 128, 512, (64, 2, 8)
    records = _record_ffn(tokens, hidden, ffn, ActivationPattern(v, n, m))
    gemms = [(r.op, r.flops, r.sparse_operand) for r in records if r.kind == "gemm"]
    kept = 4 * ffn // m
    gather, compact = "megasparse_perf.gather_k_matmul", "megasparse_perf.compact_matmul"
    assert gemms == [
        ("mm", 2 * tokens * ffn * hidden, None),  # fc1 forward (dense weight here)
        (gather, 2 * tokens * kept * hidden, COMPACT),  # fc2 forward over 4F/M of ffn
        (compact, 2 * tokens * hidden * kept, COMPACT),  # fc2 dgrad: dA only where kept
        ("mm", 2 * hidden * tokens * ffn, None),  # dW2 exact, on the scattered A
        (gather, 2 * tokens * kept * hidden, COMPACT),  # fc1 dgrad dX = dH W1
        ("mm", 2 * ffn * tokens * hidden, None),  # dW1 exact, on the scattered dH
    ]
    select = next(r for r in records if r.op == "megasparse_perf.activation_compact")
    blocks = math.ceil(tokens / v)
    assert select.bytes_read == tokens * ffn * 2
    # values_c and preact_c in bf16, int16 columns, float64 stats
    assert select.bytes_written == 2 * tokens * kept * 2 + blocks * (ffn // m) * 4 * 2 + 4 * 8
    # the activation's backward: one fused pass over preact_c and dA_c, writing dH_c
    (backward,) = [r for r in records if r.op == "megasparse_perf.squared_relu_compact_backward"]
    assert (backward.bytes_read, backward.bytes_written) == (
        2 * tokens * kept * 2,
        tokens * kept * 2,
    )


def test_both_ways_weight_gradients_are_gather_gemms_over_the_kept_tokens():
    tokens, hidden, ffn = 200, 128, 512
    wgrad = ActivationPattern(64, 4, 16)
    records = _record_ffn(tokens, hidden, ffn, ActivationPattern(64, 4, 8), wgrad)
    fc1_forward, *gemms = [r for r in records if r.kind == "gemm"]
    kept_tokens = 4 * math.ceil(tokens / 16)
    assert fc1_forward.op == "mm"
    assert all(r.sparse_operand == COMPACT for r in gemms) and len(gemms) == 5
    dw2, dw1 = gemms[2], gemms[4]
    assert dw2.mnk == dw1.mnk == (ffn, hidden, kept_tokens)
    assert dw1.flops == 2 * ffn * kept_tokens * hidden
    selections = [r for r in records if r.op == "megasparse_perf.compact_tokens"]
    # each reads its dense [T, F] operand (A, dH) and writes [F, 4 ceil(T/M)] values + int16 columns
    assert [r.bytes_read for r in selections] == [tokens * ffn * 2] * 2
    columns = math.ceil(ffn / 64) * math.ceil(tokens / 16) * 4 * 2
    assert [r.bytes_written for r in selections] == [ffn * kept_tokens * 2 + columns] * 2
    scatters = [r for r in records if r.op == "megasparse_perf.scatter"]
    assert scatters and all(r.bytes_written == tokens * ffn * 2 for r in scatters)


def test_compact_gemm_time_is_its_flops_at_the_gather_efficiency():
    (r,) = [
        r
        for r in perfmodel.record_case(Recipe("1d", "64:2:8"), "ffn", 16384, 1).records
        if r.op == "megasparse_perf.compact_matmul"
    ]
    assert r.flops == 2 * 16384 * REFERENCE.hidden * (4 * REFERENCE.ffn // 8)
    for bound, e in GATHER_EFFICIENCY.items():
        expected = r.flops / (989.4e12 * GEMM_EFFICIENCY * e)
        assert op_time(r, H100, bound) == pytest.approx(expected)


def test_weight_only_2_4_bounds_are_the_sxm_low_and_the_pcie_high():
    low, high, source = SPEEDUPS[("sm90", BF16)]
    assert (low, high) == (1.20, 1.59)
    assert "CUDALibrarySamples#203" in source and "vllmbench" in source
    # fc1 forward of 2:4 weights on cuSPARSELt: the dense GEMM's time over the bound's speed-up
    records = perfmodel.record_case("2:4 (1d)", "ffn", 16384, 1).records
    sparse = next(r for r in records if r.sparse_operand == "A")
    dense = 2 * 16384 * REFERENCE.hidden * REFERENCE.ffn / (989.4e12 * GEMM_EFFICIENCY)
    assert op_time(sparse, H100, "low") == pytest.approx(dense / 1.20)
    assert op_time(sparse, H100, "high") == pytest.approx(dense / 1.59)


def test_compact_path_builds_each_w_times_m_once_per_step():
    records = perfmodel.record_case(Recipe("transposable", "64:2:8"), "ffn", 16384, 1).records
    prep = [r.op for r in records if r.phase == "weight_prep"]
    assert prep.count("megasparse_perf.mask_2_4") == 2
    assert prep.count("_cslt_compress") == 1  # fc1's forward only
    # W*M per weight: one unpack + multiply each (no W*M rebuilt for compression)
    assert prep.count("bitwise_and") == 2


def test_baselines_match_the_existing_rows():
    for name in ("dense bf16", "2:4 (transposable)", "2:4 + 2:4 act"):
        legacy = perfmodel.rows(
            devices={"H100": H100},
            tokens_list=(16384,),
            tps=(1,),
            ks=(4,),
            scopes=("ffn",),
            recipes=("dense bf16", name),
        )
        ratio = next(r["ratio_vs_dense"] for r in legacy if r["recipe"] == name)
        assert perfmodel.step_ratio(name, "ffn") == pytest.approx(ratio)
    assert perfmodel.projected_speedups(None, weights=None) == dict.fromkeys(
        ("ffn", "layer_1b", "layer_7b", "layer_7b_schedule"), 1.0
    )
    dense = project(perfmodel.record_case(Recipe(), "ffn", 16384, 1).records, H100)
    gemms = 6 * 2 * 16384 * REFERENCE.hidden * REFERENCE.ffn / (989.4e12 * GEMM_EFFICIENCY)
    memory = sum(
        op_time(r, H100)
        for r in perfmodel.record_case(Recipe(), "ffn", 16384, 1).records
        if r.kind == "memory"
    )
    assert dense.microbatch_s == pytest.approx(gemms + memory)


def test_llama_7b_layer_records_its_attention_and_gemm_shapes():
    tokens = 16384
    records = perfmodel.record_case("dense bf16", "layer_7b", tokens, 1).records
    h, s, d = LLAMA_7B.hidden, LLAMA_7B.seq, LLAMA_7B.head_dim
    fwd = next(r for r in records if r.op == "megasparse_perf.attention_fwd")
    # causal: QK^T and PV over half the square, per sequence and head
    assert fwd.flops == 2 * 2 * (tokens // s) * LLAMA_7B.heads * s * s * d // 2
    mnks = {r.mnk for r in records if r.kind == "gemm"}
    assert {(tokens, 3 * h, h), (tokens, h, h), (tokens, LLAMA_7B.ffn, h)} <= mnks


def test_schedule_is_the_harmonic_combination_of_its_phases():
    args = ("64:2:16", "64:4:16", "2:4 transposable")
    got = perfmodel.projected_speedups(*args)
    dense = project(perfmodel.record_case(Recipe(), "layer_7b", 16384, 1).records, H100)
    sparse = project(
        perfmodel.record_case(
            Recipe("transposable", "64:2:16", "64:4:16"), "layer_7b", 16384, 1
        ).records,
        H100,
    )
    # one run of S steps: 10% + 20% dense steps, 70% sparse steps (4 micro-batches + weight prep)
    sparse_ratio = (4 * dense.microbatch_s) / (sparse.prep_s + 4 * sparse.microbatch_s)
    by_hand = 1.0 / (0.10 * 1.0 + 0.70 / sparse_ratio + 0.20 * 1.0)
    assert got["layer_7b"] == pytest.approx(sparse_ratio)
    assert got["layer_7b_schedule"] == pytest.approx(by_hand)
    assert schedule_ratio(2.0, SCHEDULE) == pytest.approx(1 / (0.3 + 0.35))
    assert 1.0 < got["layer_7b_schedule"] < got["layer_7b"] < got["ffn"]


def test_projected_speedups_refuses_unknown_inputs():
    with pytest.raises(ValueError, match="weights must be one of"):
        perfmodel.projected_speedups("64:2:8", weights="2:8")
    with pytest.raises(ValueError, match="needs V:N:M activations with M >= 8"):
        perfmodel.projected_speedups("2:4", activation_wgrad="64:4:8")
    with pytest.raises(ValueError, match="activations"):
        perfmodel.projected_speedups("64:3:8")


def test_pick_is_redirected_to_the_standins_only_for_the_compact_kernels():
    def gather_k_matmul_triton(*args):
        raise AssertionError("the Triton kernel must not run on meta")

    def unrelated_triton(*args):
        return "triton"

    def unrelated_reference(*args):
        return "reference"

    with compact_ops.redirected_pick():
        picked = kernels.pick(gather_k_matmul_triton, kernels.gather_k_matmul_reference, meta(1))
        assert picked is compact_ops.gather_k_matmul
        assert kernels.pick(unrelated_triton, unrelated_reference, torch.zeros(1))() == "reference"
    assert kernels.pick(unrelated_triton, unrelated_reference, torch.zeros(1))() == "reference"


def test_targets_block_gives_a_projected_verdict_per_target():
    recipes = (
        Recipe("transposable", "64:2:8"),
        Recipe("transposable", "64:2:16", "64:4:16"),
        Recipe("transposable", "64:4:32", "64:4:16"),
    )
    lines = perfmodel.activation_targets(recipes=recipes)
    verdicts = [line for line in lines if "-> PROJECTED" in line]
    assert "PROJECTED" in lines[0] and 2 <= len(verdicts) <= 4
    assert all(v.endswith(("MET (mid)", "MISSED (mid)")) for v in verdicts)
    assert ">= 2.0x" in verdicts[0] and ">= 1.4x" in verdicts[-1]
    # every bound that misses says by how much and splits the time by kind of work
    for line in verdicts:
        misses = line.count("MISSED") - line.endswith("MISSED (mid)")
        start = lines.index(line)
        assert sum("missed by" in x for x in lines[start + 1 : start + 4 + 8 * misses]) >= misses


def test_scope_flag_prints_the_named_layer(capsys):
    perfmodel.main(["--scope", "layer_7b"])
    out = capsys.readouterr().out
    assert "Llama-7B-like" in out and "Llama-1B-like" not in out
    assert "Targets of the activation speed path" in out
