"""Offline GPU compile of every Triton kernel (no GPU needed): no spills, each input element read once.

The CPU proxy for "runs at memory bandwidth": compiled at the launch
parameters the code uses (bf16, the training dtype; sm_90a here to keep CI short, the CLI
does sm_80 too), counted from ptxas -v and cuobjdump -sass.
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
    "fp8_cast_e4m3",
    "fp8_cast_e5m2",
    "fp8_cast_transpose_e4m3",
    "fp8_cast_transpose_e5m2",
    "fp8_cast_amax_e4m3",
    "fp8_cast_amax_e5m2",
    "fp8_cast_transpose_amax_e4m3",
    "fp8_cast_transpose_amax_e5m2",
}


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
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, "sm_90a") for k in KERNELS}
    for r in rows:
        assert {"kernel", "arch", "dtype", "registers", "spill_bytes"} <= r.keys() and r[
            "dtype"
        ] == "bfloat16"


def test_no_spills_and_registers_leave_room_for_occupancy(rows):
    for r in rows:
        assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0, r
        assert r["registers"] <= 168, r  # >= 3 warps of 128 threads per SM partition


def test_each_input_element_is_loaded_once_with_vector_loads(rows):
    for r in rows:
        assert r["load_redundancy"] == 1.0, r
        assert min(r["load_widths_bits"]) >= 64, r


def test_sass_parser_counts_widths():
    sass = "LDG.E.128 R4, desc[UR4][R2.64] ;\n@!P0 LDG.E.U16 R9, [R2] ;\nSTG.E.U8 [R2], R5 ;\nLDG.E R1, [R2]"
    ops = kernel_report.sass_memory_ops(sass)
    assert (ops["ldg"], ops["ldg_bytes"], ops["stg"], ops["stg_bytes"]) == (3, 16 + 2 + 4, 1, 1)


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
