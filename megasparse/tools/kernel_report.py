"""Offline GPU compile report of the Triton kernels (no GPU needed).

For sm_80 and sm_90a, at the dtypes and constexprs the launchers really use (each kernel module's
`compile_specs`, built from the same constants as its launcher), it compiles every kernel with
`triton.compile` for an explicit target and reads the machine code with the `ptxas` and
`cuobjdump` that ship in Triton's wheel: registers per thread, spill bytes, shared memory, the
global load/store instructions per element, and the tensor-core MMAs (HMMA, HGMMA) and
asynchronous copies (LDGSTS = cp.async, UTMALDG = TMA) a GEMM's tiles use. `load_redundancy` is
the bytes all threads of one program load divided by the input bytes the program needs: 1.0 means
every input element is read exactly once (LDG only: a GEMM's cp.async / TMA tile loads are the
ldgsts / tma_loads columns). A device-side scalar a kernel reads (the FP8 cast's scale: one
32-bit load per thread of one address) is counted apart (`scalar_loads_per_thread`), not as a
tensor load.
These are compile-time proxies, not measurements.

    python -m megasparse.tools.kernel_report [--json FILE] [--arch sm_90a] [--dtype bfloat16]
                                             [--kernel fp8_cast --kernel gather_k_matmul]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

ARCHS = {"sm_80": 80, "sm_90a": 90}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TRITON_TYPE_BYTES = {
    "fp64": 8,
    "fp32": 4,
    "bf16": 2,
    "fp16": 2,
    "i32": 4,
    "i16": 2,
    "i8": 1,
    "u8": 1,
}


def tools_available():
    """(ptxas for `capability`, cuobjdump) paths from Triton's wheel, or None when missing."""
    try:
        from triton import knobs
        from triton.backends.nvidia.compiler import get_ptxas

        paths = [get_ptxas(90).path, get_ptxas(80).path, knobs.nvidia.cuobjdump.path]
    except Exception:  # noqa: BLE001 - no Triton, or no NVIDIA backend in it
        return False
    return all(p and os.path.exists(p) for p in paths)


def _access_bytes(opcode: str) -> int:
    """Bytes one thread moves with an LDG/STG opcode such as LDG.E.128 or STG.E.U8."""
    parts = opcode.split(".")
    for width in ("128", "64"):
        if width in parts:
            return int(width) // 8
    if {"U8", "S8"} & set(parts):
        return 1
    if {"U16", "S16"} & set(parts):
        return 2
    return 4


def sass_memory_ops(sass: str) -> dict:
    """Global loads and stores in SASS: instruction counts and bytes per thread."""
    out = {"ldg": 0, "stg": 0, "ldg_bytes": 0, "stg_bytes": 0, "ldg_by_width": {}}
    # LDG/STG only: LDGSTS (cp.async) and LDGDEPBAR are counted by sass_gemm_ops
    for op in re.findall(r"\b((?:LDG|STG)(?:\.[A-Z0-9_]+)*)(?![A-Z0-9_])", sass):
        kind = op[:3].lower()
        out[kind] += 1
        out[f"{kind}_bytes"] += _access_bytes(op)
        if kind == "ldg":
            width = 8 * _access_bytes(op)
            out["ldg_by_width"][width] = out["ldg_by_width"].get(width, 0) + 1
    out["ldg_widths"] = sorted(out["ldg_by_width"])
    return out


GEMM_OPCODES = {
    "HMMA": "hmma",  # warp-level tensor-core MMA (mma.sync; sm_80 and later)
    "HGMMA": "hgmma",  # warpgroup tensor-core MMA (wgmma; sm_90a)
    "LDGSTS": "ldgsts",  # cp.async: global -> shared without registers (sm_80 and later)
    "UTMALDG": "tma_loads",  # TMA bulk tensor load (sm_90a)
}


def sass_gemm_ops(sass: str) -> dict:
    """Tensor-core MMAs and asynchronous global -> shared copies in SASS (static instruction
    counts, every opcode variant included): what a GEMM's tiles run on and are loaded with."""
    counts = dict.fromkeys(GEMM_OPCODES.values(), 0)
    for opcode in re.findall(r"\b(HMMA|HGMMA|LDGSTS|UTMALDG)(?![A-Z0-9_])", sass):
        counts[GEMM_OPCODES[opcode]] += 1
    return counts


def without_scalar_loads(mem: dict, scalars: int) -> dict:
    """`mem` less one 32-bit LDG per thread for each device scalar the kernel reads (a scale:
    the same address across a warp, one transaction), so the counts describe the tensor loads."""
    if not scalars:
        return mem
    by_width = dict(mem["ldg_by_width"])
    if by_width.get(32, 0) < scalars:
        raise RuntimeError(f"expected {scalars} 32-bit scalar load(s) per thread, SASS has {mem}")
    by_width[32] -= scalars
    by_width = {w: n for w, n in by_width.items() if n}
    return {
        **mem,
        "ldg": mem["ldg"] - scalars,
        "ldg_bytes": mem["ldg_bytes"] - 4 * scalars,
        "ldg_by_width": by_width,
        "ldg_widths": sorted(by_width),
    }


def _ptxas_usage(ptx: str, capability: int, arch: str) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [
                get_ptxas(capability).path,
                "-v",
                f"--gpu-name={arch}",
                src,
                "-o",
                os.path.join(tmp, "k.cubin"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    text = log.stderr + log.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    return {
        "registers": int(regs.group(1)),
        "spill_bytes": int(spills.group(1)) + int(spills.group(2)) if spills else 0,
        "stack_bytes": int(stack.group(1)) if stack else 0,
    }


def _sass(cubin: bytes) -> str:
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-sass", path], capture_output=True, text=True, check=True
        ).stdout


def compile_spec(spec, arch: str) -> dict:
    """Compile one kernel spec for `arch` and describe its machine code (one report row)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    capability = ARCHS[arch]
    signature = {
        name: "constexpr" if name in spec.constexprs else spec.signature[name]
        for name in spec.fn.arg_names
    }
    # the launcher's pointers are 16-byte aligned torch allocations, as Triton's specialization sees them
    attrs = {(spec.fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec.aligned}
    compiled = triton.compile(
        ASTSource(spec.fn, signature, spec.constexprs, attrs),
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": spec.num_warps, "enable_fp_fusion": spec.enable_fp_fusion},
    )
    usage = _ptxas_usage(compiled.asm["ptx"], capability, arch)
    scalars = len(spec.scalar_reads)
    sass = _sass(compiled.asm["cubin"])
    mem = without_scalar_loads(sass_memory_ops(sass), scalars)
    threads = 32 * spec.num_warps
    need = sum(n * _TRITON_TYPE_BYTES[spec.signature[p][1:]] for p, n in spec.reads.items())
    return {
        "kernel": spec.kernel,
        "arch": arch,
        "dtype": spec.dtype,
        **usage,
        "shared_bytes": int(compiled.metadata.shared),
        "num_warps": spec.num_warps,
        "elements_per_program": spec.elements,
        "global_loads_per_element": round(mem["ldg"] * threads / spec.elements, 4),
        "global_stores_per_element": round(mem["stg"] * threads / spec.elements, 4),
        "load_widths_bits": mem["ldg_widths"],
        "load_redundancy": round(mem["ldg_bytes"] * threads / need, 4),
        "ldg_per_thread": mem["ldg"],
        "stg_per_thread": mem["stg"],
        "scalar_loads_per_thread": scalars,
        **sass_gemm_ops(sass),
    }


def all_specs(dtypes=DTYPES, prefix=""):
    """Every kernel's specs at `dtypes` whose name starts with `prefix` (a string or a tuple)."""
    from megasparse.kernels import compile_specs

    specs = [spec for dtype in dtypes for spec in compile_specs(dtype)]
    return [spec for spec in specs if spec.kernel.startswith(prefix)]


def report(archs=tuple(ARCHS), dtypes=DTYPES, prefix="") -> list:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("kernel_report compiles for the GPU: run it without TRITON_INTERPRET=1")
    return [compile_spec(spec, arch) for arch in archs for spec in all_specs(dtypes, prefix)]


def _table(rows) -> str:
    head = (
        f"{'kernel':<34}{'arch':<8}{'dtype':<10}{'regs':>5}{'spill':>6}{'smem':>7}"
        f"{'ld/elem':>9}{'st/elem':>9}{'ld bits':>10}{'redund':>8}{'mma':>7}{'gmma':>6}"
        f"{'ldgsts':>7}{'tma':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['kernel']:<34}{r['arch']:<8}{r['dtype']:<10}{r['registers']:>5}"
            f"{r['spill_bytes']:>6}{r['shared_bytes']:>7}{r['global_loads_per_element']:>9.3f}"
            f"{r['global_stores_per_element']:>9.3f}"
            f"{'/'.join(map(str, r['load_widths_bits'])):>10}{r['load_redundancy']:>8.2f}"
            f"{r['hmma']:>7}{r['hgmma']:>6}{r['ldgsts']:>7}{r['tma_loads']:>5}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows as a JSON list to this file")
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS), help="default: all")
    parser.add_argument("--dtype", action="append", choices=[str(d).split(".")[1] for d in DTYPES])
    parser.add_argument(
        "--kernel", action="append", help="only kernels whose name starts with this (repeatable)"
    )
    args = parser.parse_args(argv)
    if not tools_available():
        print(
            "kernel_report: Triton's NVIDIA backend (ptxas, cuobjdump) is not installed",
            file=sys.stderr,
        )
        return 1
    dtypes = tuple(getattr(torch, d) for d in args.dtype) if args.dtype else DTYPES
    rows = report(tuple(args.arch or ARCHS), dtypes, tuple(args.kernel or ("",)))
    print(
        "Offline compile (no GPU): per-thread registers/spills from ptxas -v, "
        "loads/stores from cuobjdump -sass"
    )
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
