"""Offline GPU compile of every Triton kernel (no GPU needed): no spills; elementwise kernels read
each input element once, the GEMMs run on tensor cores with their tiles copied asynchronously.

The CPU proxy for "runs at memory bandwidth" (or, for a GEMM, "feeds its tensor cores"): compiled
at the launch parameters the code uses (bf16, the training dtype; sm_90a for every kernel to keep CI
short, sm_80 for the GEMMs and the FP8 cast; the CLI does both), counted from ptxas -v and
cuobjdump -sass.
"""

import json
import os
import subprocess
import sys

import pytest

from megasparse.tools import kernel_report

pytestmark = pytest.mark.skipif(
    not kernel_report.tools_available(),
    reason="Triton's NVIDIA backend (ptxas, cuobjdump) is not installed",
)

KERNELS = {
    "mask_1d",
    "mask_transposable",
    "activation_2_4",
    "activation_2_4_squared_relu",
    "activation_64_2_8_squared_relu",
    "activation_64_2_16_squared_relu",
    "activation_compact_64_2_8_squared_relu",
    "activation_compact_64_2_16_squared_relu",
    "activation_compact_64_4_8_squared_relu",
    "compact_tokens_64_4_8",
    "compact_64_8",
    "scatter_64_8",
    "compact_64_16",
    "scatter_64_16",
    "squared_relu_sparsify_backward",
    "squared_relu_compact_backward",
    "fp8_cast_e4m3",
    "fp8_cast_e5m2",
    "fp8_cast_transpose_e4m3",
    "fp8_cast_transpose_e5m2",
    "fp8_cast_amax_e4m3",
    "fp8_cast_amax_e5m2",
    "fp8_cast_transpose_amax_e4m3",
    "fp8_cast_transpose_amax_e5m2",
}
# The compact layout's GEMMs at the (V, M) the FFN uses, with b row-major ("b_rows": the layout
# gather_k_matmul gets, its gathered rows copied by cp.async) or column-major ("b_cols": the one
# compact_matmul gets); the other layout of each is the register-staged fallback for any strides.
GEMMS = {
    f"{gemm}_{v}_{m}_{layout}"
    for gemm in ("gather_k_matmul", "compact_matmul")
    for v, m in ((64, 8), (64, 16), (128, 8), (128, 16))
    for layout in ("b_rows", "b_cols")
}
FAST_LAYOUT = {"gather_k_matmul": "b_rows", "compact_matmul": "b_cols"}
REGISTERS = 168  # >= 3 warps of 128 threads per SM partition


def _cli(out, *args):
    """The CLI, in a process without TRITON_INTERPRET (the test session interprets kernels)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "megasparse.tools.kernel_report", *args, "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text())


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "kernels.json"
    stdout, rows = _cli(out, "--dtype", "bfloat16", "--arch", "sm_90a")
    assert "mask_transposable" in stdout
    return rows


def test_every_kernel_is_compiled(rows):
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, "sm_90a") for k in KERNELS | GEMMS}
    for r in rows:
        assert {"kernel", "arch", "dtype", "registers", "spill_bytes"} <= r.keys() and r[
            "dtype"
        ] == "bfloat16"


def test_no_spills_and_registers_leave_room_for_occupancy(rows):
    for r in rows:
        assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0, r
        assert r["registers"] <= REGISTERS, r


def test_each_input_element_is_loaded_once_with_vector_loads(rows):
    """Elementwise and selection kernels: LDG only, every input byte once, 64/128-bit wide."""
    for r in rows:
        if r["kernel"] in GEMMS:
            continue
        assert r["load_redundancy"] == 1.0, r
        assert min(r["load_widths_bits"]) >= 64, r
        assert r["hmma"] == r["hgmma"] == r["ldgsts"] == r["tma_loads"] == 0, r


def _check_gemm_rows(rows, mma: str, registers: int) -> None:
    """Tensor-core MMAs (`mma`: "hmma" or "hgmma") and no other kind, no spills, registers within
    `registers`; the tiles copied by cp.async (LDGSTS), and in each GEMM's fast layout b's tile too:
    more LDGSTS and fewer LDG than in the register-staged layout, whose LDGs are all 2-byte."""
    by_name = {r["kernel"]: r for r in rows}
    assert set(by_name) == GEMMS
    other = {"hmma": "hgmma", "hgmma": "hmma"}[mma]
    for r in rows:
        assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0, r
        assert r["registers"] <= registers, r
        assert r[mma] > 0 and r[other] == 0, r
        assert r["ldgsts"] > 0, r
        gemm, layout = r["kernel"].rsplit("_", 4)[0], r["kernel"][-6:]
        if layout == FAST_LAYOUT[gemm]:
            slow = by_name[r["kernel"][:-6] + ("b_cols" if layout == "b_rows" else "b_rows")]
            assert r["ldgsts"] > slow["ldgsts"] and r["ldg_per_thread"] < slow["ldg_per_thread"], r
            assert slow["load_widths_bits"] == [16], slow  # bf16 elements, one at a time


def test_gemms_use_wgmma_and_cp_async_on_sm90a(rows):
    """sm_90a: warpgroup MMAs (HGMMA: every tile has V >= 64 rows), the common register limit."""
    _check_gemm_rows([r for r in rows if r["kernel"] in GEMMS], "hgmma", REGISTERS)


def test_gemms_use_mma_sync_and_cp_async_on_sm80(tmp_path):
    """sm_80: HMMA (mma.sync) and no spills. mma.sync holds its A/B fragments in registers and the
    launch is one 8-warp program per SM by design (the 64 x 256 / 128 x 128 tiles' arithmetic
    intensity; cp.async stages in shared memory hide the latency, not extra warps), so the limit
    is the one a program of 8 warps can hold without spilling: 65536 / 256 threads = 255 (the ISA's
    maximum), not the occupancy limit of the elementwise kernels."""
    _, rows = _cli(
        tmp_path / "gemms.json",
        "--dtype", "bfloat16", "--arch", "sm_80",
        "--kernel", "gather_k_matmul", "--kernel", "compact_matmul",
    )  # fmt: skip
    assert all(r["arch"] == "sm_80" and r["num_warps"] == 8 for r in rows)
    _check_gemm_rows(rows, "hmma", 255)


def test_sass_parser_counts_widths():
    sass = "LDG.E.128 R4, desc[UR4][R2.64] ;\n@!P0 LDG.E.U16 R9, [R2] ;\nSTG.E.U8 [R2], R5 ;\nLDG.E R1, [R2]"
    ops = kernel_report.sass_memory_ops(sass)
    assert (ops["ldg"], ops["ldg_bytes"], ops["stg"], ops["stg_bytes"]) == (3, 16 + 2 + 4, 1, 1)


def test_sass_parser_tells_cp_async_and_tensor_core_ops_from_loads():
    sass = (
        "LDGSTS.E.BYPASS.LTC128B.128 [R1], desc[UR4][R2.64] ;\nLDGDEPBAR ;\nLDG.E.U16 R9, [R2] ;\n"
        "HMMA.16816.F32.BF16 R4, R8, R12, R4 ;\nHGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;\n"
        "UTMALDG.2D [UR8], [UR4] ;\nHMMA.16816.F32.BF16 R4, R8, R12, R4"
    )
    ops = kernel_report.sass_memory_ops(sass)
    assert (ops["ldg"], ops["ldg_bytes"], ops["ldg_widths"]) == (1, 2, [16])
    assert kernel_report.sass_gemm_ops(sass) == {"hmma": 2, "hgmma": 1, "ldgsts": 1, "tma_loads": 1}


def test_sass_parser_sets_the_scalar_scale_load_apart():
    ops = kernel_report.sass_memory_ops(
        "LDG.E.128 R4, [R2] ;\nLDG.E.128 R8, [R2] ;\nLDG.E R1, [R6]"
    )
    tensor_loads = kernel_report.without_scalar_loads(ops, 1)
    assert (tensor_loads["ldg"], tensor_loads["ldg_bytes"], tensor_loads["ldg_widths"]) == (
        2,
        32,
        [128],
    )
    with pytest.raises(RuntimeError, match="scalar"):
        kernel_report.without_scalar_loads(kernel_report.sass_memory_ops("LDG.E.128 R4, [R2]"), 1)


def test_fp8_cast_compiles_for_sm80_and_sm90a_without_spills(tmp_path):
    """The fused FP8 cast (+ transpose, + the amax of delayed scaling), every input dtype, both
    archs: no spills, each input element loaded once with 128-bit loads, the scale one scalar load,
    128-bit stores; the amax's cross-warp max through 32 bytes of shared memory (or the
    transpose's 4 KiB), one atomic max per program (not a store)."""
    _, rows = _cli(tmp_path / "fp8.json", "--kernel", "fp8_cast")
    assert {(r["kernel"], r["arch"], r["dtype"]) for r in rows} == {
        (f"fp8_cast{t}_{f}", a, d)
        for t in ("", "_transpose", "_amax", "_transpose_amax")
        for f in ("e4m3", "e5m2")
        for a in ("sm_80", "sm_90a")
        for d in ("bfloat16", "float16", "float32")
    }
    for r in rows:
        assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0 and r["registers"] <= 64, r
        assert r["load_redundancy"] == 1.0 and r["load_widths_bits"] == [128], r
        assert r["scalar_loads_per_thread"] == 1, r
        # q: one 16-byte store per 16 elements; q^T another, through shared memory
        transposed = "transpose" in r["kernel"]
        assert r["global_stores_per_element"] == (0.125 if transposed else 0.0625), r
        amax = "amax" in r["kernel"]
        assert r["shared_bytes"] == (4096 if transposed else 32 if amax else 0), r
