"""The two tensor-core GEMMs of the compact V:N:M layout (Triton): gather along K, compact output.

gather_k_matmul_triton(a_c, columns, b, v, m) = scatter(a_c) @ b: the reduction walks only the
4 chosen columns of every group of M (a_c's contiguous columns) and gathers the matching rows of
b, so it skips 1 - 4/M of the dense work. compact_matmul_triton(g, b, columns, v, m) =
compact(g @ b): only the chosen columns of the product are computed. Both run one program per
block of V rows (every row of the tile shares the block's columns) and a tile of output columns.

Numerics: products of the input dtype accumulated in float32 by tl.dot (fp32 inputs with
input_precision="ieee", as torch's fp32 matmul without TF32), rounded once to the input dtype.
The float32 summation order differs from cuBLAS, so results agree to rounding, not bitwise.
The torch references (kernels.compact) are the CPU path and the tests' reference.

Layout of b: any strides work; the gather is fastest when the gathered index of b is its slow
one, so a tile of b loads as 16-byte cp.async rows: b row-major for gather_k (W1, dY, X, or
W2^T held contiguous [F, H]) and b column-major for compact_matmul (that same contiguous W2^T,
passed as .t()). With the other layout (W2.t() or W2 as stored, [H, F] row-major) each gathered
element is a 2-byte load staged through registers (kernel_report's *_b_cols / *_b_rows rows).
"""

import dataclasses

import torch

from .common import HAVE_TRITON, compile_spec, require_triton
from .compact import compact_matmul_reference, gather_k_matmul_reference

__all__ = [
    "gather_k_matmul_triton",
    "gather_k_matmul_reference",
    "compact_matmul_triton",
    "compact_matmul_reference",
    "compile_specs",
]

if HAVE_TRITON:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

SUPPORTED_V = (16, 32, 64, 128)  # the tile's rows: tensor-core tiles of 16 to 128 rows
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    block_n: int  # output columns per program (b's columns, or compact columns)
    block_k: int  # reduction per step (compact columns for gather_k, dense for compact_matmul)
    num_warps: int
    num_stages: int


def _config(v: int, dtype: torch.dtype, b_via_registers: bool = False) -> GemmConfig:
    """The fixed launch of a V-row tile (no runtime autotuning), for A100 and H100.

    The rows of a tile are one block of V tokens (its columns are shared), so the only way to
    raise a tile's arithmetic intensity, which bounds a gather GEMM fed from L2 (the gathered
    operand cannot use TMA), is a wide BLOCK_N: 2*V*BLOCK_N / (2 * (V + BLOCK_N)) flop per byte.
    V = 64: 64 x 256, 8 warps (two Hopper warpgroups of m64n128 wgmma; 51 flop/B instead of 43 at
    64 x 128). V = 128: 128 x 128, 8 warps (64 flop/B); 128 x 256 needs ~250 registers on sm_80 and
    spills in compact_matmul. V <= 32: 128 columns, 4 warps (HMMA; wgmma needs 64 rows).
    BLOCK_K 64 (32 for fp32: the same bytes), 3 stages: the shared memory of 2-3 stages is
    80-147 KiB, inside A100's 164 KiB and H100's 227 KiB. The float32 accumulator is 64 registers
    per thread; ptxas (kernel_report) gives 100-254 registers and no spills on sm_80 and sm_90a.
    3 stages is also Triton's default, so the offline compile report (which sets only num_warps)
    compiles exactly this launch.
    b_via_registers (gather_k with b's gathered rows strided, e.g. W.t(): each element a 2-byte load
    staged through registers, not cp.async): V = 64 takes 128 columns, 100 registers on sm_90a and
    128 on sm_80 where 64 x 256 needs 174 and 231 (a load path bound by latency, not by L2 bytes,
    gains more from occupancy than from the wider tile's reuse).
    """
    return GemmConfig(
        block_n=256 if v == 64 and not b_via_registers else 128,
        block_k=32 if dtype == torch.float32 else 64,
        num_warps=4 if v < 64 else 8,
        num_stages=3,
    )


CONFIGS = {
    (v, dtype, via_registers): _config(v, dtype, via_registers)
    for v in SUPPORTED_V
    for dtype in DTYPES
    for via_registers in (False, True)
}
GROUP_M = 8  # row blocks that walk the output columns together, so b's tiles are reused in L2
REPORT_PATTERNS = ((64, 8), (64, 16), (128, 8), (128, 16))  # (V, M) compiled by the offline report


def _check(kernel: str, lhs, columns, b, v: int, m: int) -> None:
    """V, M, dtypes, devices and `columns` against the rows of lhs (a_c or g)."""
    if v not in SUPPORTED_V:
        raise ValueError(
            f"megasparse: {kernel} supports V in {SUPPORTED_V} (tensor-core tile rows), got V={v}; "
            "use the torch reference (kernels.compact) for other V"
        )
    if m < 4:
        raise ValueError(f"megasparse: {kernel} needs M >= 4, got M={m}")
    if lhs.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"megasparse: {kernel} needs 2-D operands, got {tuple(lhs.shape)} and {tuple(b.shape)}"
        )
    if lhs.dtype not in DTYPES or b.dtype != lhs.dtype:
        raise ValueError(
            f"megasparse: {kernel} needs two bfloat16, float16 or float32 operands of one dtype, "
            f"got {lhs.dtype} and {b.dtype}; cast them to the training dtype"
        )
    if columns.dtype != torch.int16 or columns.dim() != 3 or columns.shape[2] != 4:
        raise ValueError(
            f"megasparse: {kernel} needs int16 columns [blocks, groups, 4], got "
            f"{tuple(columns.shape)} {columns.dtype}"
        )
    if columns.shape[0] != -(-lhs.shape[0] // v):
        raise ValueError(
            f"megasparse: {kernel} needs columns for ceil(T/V) = {-(-lhs.shape[0] // v)} row blocks "
            f"(T={lhs.shape[0]}, V={v}), got {columns.shape[0]}; pass the V the columns were chosen with"
        )
    if not lhs.device == columns.device == b.device:
        raise ValueError(
            f"megasparse: {kernel} needs its operands on one device, got {lhs.device}, "
            f"{columns.device}, {b.device}"
        )


if HAVE_TRITON:

    @triton.jit
    def _tile(pid, tokens, n, V: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(row block, column tile) of program `pid`: GROUP_M row blocks walk the column tiles
        together, so the column tile of b they read stays in L2 for GROUP_M blocks."""
        blocks, tiles = tl.cdiv(tokens, V), tl.cdiv(n, BLOCK_N)
        per_group = GROUP_M * tiles
        first = (pid // per_group) * GROUP_M
        size = tl.minimum(blocks - first, GROUP_M)
        return first + (pid % per_group) % size, (pid % per_group) // size

    @triton.jit
    def _dot(a, b, acc, UPCAST: tl.constexpr):
        """acc + a @ b in float32. UPCAST (bf16 under TRITON_INTERPRET=1 only: the interpreter
        multiplies bf16's raw bits) computes it from float32 copies, the same exact products."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision="ieee")

    @triton.jit
    def _gather_k_matmul_kernel(
        a_ptr,
        columns_ptr,
        b_ptr,
        c_ptr,
        tokens,
        n,
        k,
        compact_k,
        stride_am,
        stride_ak,
        stride_bk,
        stride_bn,
        stride_cm,
        stride_cn,
        V: tl.constexpr,
        M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        UPCAST: tl.constexpr = False,
    ):
        block, tile = _tile(tl.program_id(0), tokens, n, V, BLOCK_N, GROUP_M)
        rows = block * V + tl.arange(0, V)
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < tokens, cols < n
        a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am
        block_columns = columns_ptr + block * compact_k  # this block's [groups, 4], flattened
        acc = tl.zeros([V, BLOCK_N], dtype=tl.float32)
        for start in range(0, compact_k, BLOCK_K):
            kc = start + tl.arange(0, BLOCK_K)  # compact columns: 4 per group
            kc_ok = kc < compact_k
            chosen = tl.load(block_columns + kc, mask=kc_ok, other=0).to(tl.int32)
            b_row = (kc // 4) * M + chosen  # the dense row of b each compact column multiplies
            b_ok = kc_ok & (b_row < k)  # along tokens the last group may be short: zero rows
            a = tl.load(
                a_rows + kc[None, :] * stride_ak, mask=row_ok[:, None] & kc_ok[None, :], other=0.0
            )
            b = tl.load(
                b_ptr + b_row[:, None] * stride_bk + cols[None, :] * stride_bn,
                mask=b_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc = _dot(a, b, acc, UPCAST)
        c = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :] * stride_cn
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _compact_matmul_kernel(
        g_ptr,
        b_ptr,
        columns_ptr,
        out_ptr,
        tokens,
        k,
        compact_n,
        stride_gm,
        stride_gk,
        stride_bk,
        stride_bn,
        stride_om,
        stride_on,
        V: tl.constexpr,
        M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        UPCAST: tl.constexpr = False,
    ):
        block, tile = _tile(tl.program_id(0), tokens, compact_n, V, BLOCK_N, GROUP_M)
        rows = block * V + tl.arange(0, V)
        nc = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # compact output columns: 4 per group
        row_ok, nc_ok = rows < tokens, nc < compact_n
        chosen = tl.load(columns_ptr + block * compact_n + nc, mask=nc_ok, other=0).to(tl.int32)
        b_cols = b_ptr + ((nc // 4) * M + chosen)[None, :] * stride_bn  # the chosen columns of b
        g_rows = g_ptr + rows.to(tl.int64)[:, None] * stride_gm
        acc = tl.zeros([V, BLOCK_N], dtype=tl.float32)
        for start in range(0, k, BLOCK_K):
            kk = start + tl.arange(0, BLOCK_K)
            k_ok = kk < k
            g = tl.load(
                g_rows + kk[None, :] * stride_gk, mask=row_ok[:, None] & k_ok[None, :], other=0.0
            )
            b = tl.load(
                b_cols + kk[:, None] * stride_bk, mask=k_ok[:, None] & nc_ok[None, :], other=0.0
            )
            acc = _dot(g, b, acc, UPCAST)
        out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + nc[None, :] * stride_on
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & nc_ok[None, :])


def _upcast(dtype: torch.dtype) -> bool:
    """bf16 dots go through float32 under TRITON_INTERPRET=1 (see _dot); never on a GPU."""
    return dtype == torch.bfloat16 and isinstance(_gather_k_matmul_kernel, InterpretedFunction)


def _grid(tokens: int, v: int, width: int, block_n: int) -> tuple:
    return (triton.cdiv(tokens, v) * triton.cdiv(width, block_n),)


def _launch(v: int, m: int, dtype: torch.dtype, b_via_registers: bool = False) -> dict:
    """The constexprs and launch options of both kernels at (V, M, dtype) and b's layout."""
    config = CONFIGS[v, dtype, b_via_registers]
    return dict(
        V=v,
        M=m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=GROUP_M,
        UPCAST=_upcast(dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def _check_b_offsets(kernel: str, b: torch.Tensor) -> None:
    """b's element offsets are int32 in the kernels' inner loop."""
    if b.numel() and sum((size - 1) * abs(s) for size, s in zip(b.shape, b.stride())) >= 2**31:
        raise ValueError(
            f"megasparse: {kernel} addresses b with 32-bit offsets, but b {tuple(b.shape)} with "
            f"strides {b.stride()} spans 2^31 elements or more; split b along its columns"
        )


def gather_k_matmul_triton(a_c, columns, b, v: int, m: int, out=None) -> torch.Tensor:
    """C [T, N] = scatter(a_c) @ b on tensor cores, in a_c's dtype (written into `out` [T, N] of
    that dtype or float32, any strides, when given: float32 keeps the accumulator unrounded).
    a_c [T, 4*groups] compact, columns int16 [ceil(T/V), groups, 4], b [K, N] any strided view
    (W2.t(), W1, dY or X along tokens) with ceil(K/M) = groups: chosen rows >= K (a short last
    group along tokens) read as zero."""
    require_triton()
    kernel = "gather_k_matmul_triton"
    _check(kernel, a_c, columns, b, v, m)
    groups = columns.shape[1]
    if a_c.shape[1] != 4 * groups or -(-b.shape[0] // m) != groups:
        raise ValueError(
            f"megasparse: {kernel} needs a_c [T, 4*groups] and b [K, N] with ceil(K/M) = groups, "
            f"got a_c {tuple(a_c.shape)}, b {tuple(b.shape)}, M={m}, {groups} groups"
        )
    _check_b_offsets(kernel, b)
    tokens, n = a_c.shape[0], b.shape[1]
    if out is None:
        out = torch.empty(tokens, n, dtype=a_c.dtype, device=a_c.device)
    elif (
        out.shape != (tokens, n)
        or out.dtype not in (a_c.dtype, torch.float32)
        or out.device != a_c.device
    ):
        raise ValueError(
            f"megasparse: {kernel}'s out must be [{tokens}, {n}] {a_c.dtype} or float32 on "
            f"{a_c.device}, got "
            f"{tuple(out.shape)} {out.dtype} {out.device}"
        )
    if not out.numel():
        return out
    # b's gathered index (rows) not its slow one: the elements come through registers
    via_registers = b.stride(1) != 1 and b.shape[1] > 1
    _gather_k_matmul_kernel[_grid(tokens, v, n, CONFIGS[v, a_c.dtype, via_registers].block_n)](
        a_c,
        columns.contiguous(),
        b,
        out,
        tokens,
        n,
        b.shape[0],
        a_c.shape[1],
        *a_c.stride(),
        *b.stride(),
        *out.stride(),
        **_launch(v, m, a_c.dtype, via_registers),
    )
    return out


def compact_matmul_triton(g, b, columns, v: int, m: int) -> torch.Tensor:
    """compact(g [T, K] @ b [K, F]) [T, 4F/M] on tensor cores, in g's dtype: only the chosen
    columns are computed (fc2's input gradient dA = dY W2 where A is kept). b may be any strided
    view; columns int16 [ceil(T/V), F/M, 4]."""
    require_triton()
    kernel = "compact_matmul_triton"
    _check(kernel, g, columns, b, v, m)
    groups = columns.shape[1]
    if g.shape[1] != b.shape[0] or b.shape[1] != m * groups:
        raise ValueError(
            f"megasparse: {kernel} needs g [T, K] and b [K, F] with F = M * groups, got "
            f"g {tuple(g.shape)}, b {tuple(b.shape)}, M={m}, {groups} groups"
        )
    _check_b_offsets(kernel, b)
    tokens, compact_n = g.shape[0], 4 * groups
    out = torch.empty(tokens, compact_n, dtype=g.dtype, device=g.device)
    if not out.numel():
        return out
    _compact_matmul_kernel[_grid(tokens, v, compact_n, CONFIGS[v, g.dtype, False].block_n)](
        g,
        b,
        columns.contiguous(),
        out,
        tokens,
        g.shape[1],
        compact_n,
        *g.stride(),
        *b.stride(),
        *out.stride(),
        **_launch(v, m, g.dtype),
    )
    return out


# The layouts of b the FFN passes, as the launch specializes them (unit strides are constexprs):
# b's rows contiguous (W1 for fc1's input gradient, dY / X along tokens; W2^T stored [F, H]) or
# b's columns contiguous (W2.t() for fc2's forward; W2 for fc2's input gradient).
_B_LAYOUTS = {"b_rows": {"stride_bn": 1}, "b_cols": {"stride_bk": 1}}


def compile_specs(dtype: torch.dtype) -> list:
    """Both GEMMs at REPORT_PATTERNS and both b layouts (bf16 and fp16, the training dtypes),
    described for the offline compile report. `reads` is what one step of the K loop needs."""
    if dtype not in (torch.bfloat16, torch.float16):
        return []
    gather_k = (
        "a_ptr:*T/16 columns_ptr:*i16/16 b_ptr:*T/16 c_ptr:*T/16 tokens:i32 n:i32/16 k:i32/16 "
        "compact_k:i32/16 stride_am:i32/16 stride_ak:i32 stride_bk:i32/16 stride_bn:i32/16 "
        "stride_cm:i32/16 stride_cn:i32"
    )
    compact_n = (
        "g_ptr:*T/16 b_ptr:*T/16 columns_ptr:*i16/16 out_ptr:*T/16 tokens:i32 k:i32/16 "
        "compact_n:i32/16 stride_gm:i32/16 stride_gk:i32 stride_bk:i32/16 stride_bn:i32/16 "
        "stride_om:i32/16 stride_on:i32"
    )
    kernels = (
        ("gather_k_matmul", _gather_k_matmul_kernel, gather_k, ("a_ptr", "b_ptr"), "columns_ptr"),
        ("compact_matmul", _compact_matmul_kernel, compact_n, ("g_ptr", "b_ptr"), None),
    )
    specs = []
    for v, m in REPORT_PATTERNS:
        for name, fn, arguments, (lhs, rhs), step_columns in kernels:
            for layout, unit_strides in _B_LAYOUTS.items():
                via_registers = name == "gather_k_matmul" and layout == "b_cols"
                launch = _launch(v, m, dtype, via_registers)  # num_stages: Triton's default
                num_warps, bn, bk = launch.pop("num_warps"), launch["BLOCK_N"], launch["BLOCK_K"]
                del launch["num_stages"]
                unit = ("stride_ak", "stride_cn") if lhs == "a_ptr" else ("stride_gk", "stride_on")
                constexprs = {**launch, **dict.fromkeys(unit, 1), **unit_strides}
                spec = compile_spec(
                    f"{name}_{v}_{m}_{layout}", fn, dtype, arguments, constexprs, v * bn, num_warps
                )
                spec.reads = {
                    lhs: v * bk,
                    rhs: bk * bn,
                    **({step_columns: bk} if step_columns else {}),
                }
                specs.append(spec)
    return specs
