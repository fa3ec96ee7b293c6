"""The compact layout of a V:N:M activation (M >= 8) and the gather GEMMs on it: torch references.

A [T, F] tensor whose V x M blocks keep 4 columns shared by the block's V rows (`columns`, int16
[ceil(T/V), F/M, 4], ascending; see activation_sparsify) is held as values_c [T, 4F/M]:
values_c[t, 4g + j] = a[t, g*M + columns[t // V, g, j]]. The GEMMs that reduce over F read only
the chosen columns (they skip 1 - 4/M of the work), and the GEMM whose output is the activation's
gradient computes only the chosen columns.

These references are the CPU path and the tests' reference for the Triton kernels; they
materialize the dense operand, so on a GPU they save nothing. compact_triton / scatter_triton are
the memory-bound GPU versions of compact / scatter: they read the small `columns` once per program
and move values bit for bit (NaN payloads and signed zeros included), with no index tensor.
"""

import torch

from .common import HAVE_TRITON, compile_spec, require_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .common import split4


def check_layout(columns: torch.Tensor, v: int, m: int, tokens: int, ffn: int) -> None:
    """Raise a clear error unless `columns` describes a [tokens, ffn] tensor in V x M blocks."""
    if m < 4 or m & (m - 1) or v < 1 or v & (v - 1) or ffn % m:
        raise ValueError(
            f"megasparse: the compact layout needs V and M powers of two, M >= 4 and F a multiple "
            f"of M, got V={v}, M={m}, F={ffn}"
        )
    shape = (-(-tokens // v), ffn // m, 4)
    if columns.dtype != torch.int16 or tuple(columns.shape) != shape:
        raise ValueError(
            f"megasparse: the compact layout of a [{tokens}, {ffn}] tensor with V={v}, M={m} needs "
            f"int16 columns [ceil(T/V), F/M, 4] = {list(shape)}, got {columns.dtype} "
            f"{list(columns.shape)}; pass the columns its selection returned"
        )


def global_columns(columns: torch.Tensor, v: int, m: int, tokens: int) -> torch.Tensor:
    """int64 [tokens, 4F/M]: the dense column of every compact column of every row."""
    blocks, groups, _ = columns.shape
    base = torch.arange(groups, device=columns.device, dtype=torch.int64)[:, None] * m
    per_block = (columns.long() + base).reshape(blocks, 4 * groups)
    return per_block.repeat_interleave(v, dim=0)[:tokens]


def compact(dense: torch.Tensor, columns: torch.Tensor, v: int, m: int) -> torch.Tensor:
    """values_c [T, 4F/M] of a dense [T, F] tensor: its chosen columns, row by row."""
    check_layout(columns, v, m, *dense.shape)
    return torch.gather(dense, 1, global_columns(columns, v, m, dense.shape[0]))


def scatter(
    values_c: torch.Tensor, columns: torch.Tensor, v: int, m: int, ffn: int
) -> torch.Tensor:
    """The dense [T, F] tensor of values_c: zero outside the chosen columns."""
    check_layout(columns, v, m, values_c.shape[0], ffn)
    dense = values_c.new_zeros(values_c.shape[0], ffn)
    return dense.scatter_(1, global_columns(columns, v, m, values_c.shape[0]), values_c)


def gather_k_matmul_reference(a_c, columns, b, v: int, m: int) -> torch.Tensor:
    """C [T, N] = A [T, F] @ b [F, N] with A held compact: fc2's forward (b = W2^T) and fc1's
    input gradient (A = dH, b = W1); along tokens, the both-ways weight gradients. Along tokens
    the last group of M may be short: chosen columns >= F (b's rows) read as zero."""
    padded = columns.shape[1] * m
    return scatter(a_c, columns, v, m, padded)[:, : b.shape[0]] @ b


def compact_matmul_reference(g, b, columns, v: int, m: int) -> torch.Tensor:
    """compact(g [T, K] @ b [K, F]): only the chosen columns of the product, as fc2's input
    gradient dA = dY W2 where A is kept."""
    return compact(g @ b, columns, v, m)


# Launch of compact / scatter: one program takes one block of V rows and GROUPS groups (one
# group's 4 columns per thread: each thread loads its 64-bit `columns` entry once), and walks the
# block's rows ROWS at a time, about ELEMENTS dense elements per step. The compact width 4F/M is
# an argument of its own so that Triton sees it divisible by 16 (full-width vector accesses).
NUM_WARPS = 4
GROUPS = 32 * NUM_WARPS
ELEMENTS = 4096
REPORT_PATTERNS = ((64, 8), (64, 16))  # (V, M) compiled by the offline report


def rows_per_step(v: int, m: int) -> int:
    return max(1, min(v, ELEMENTS // (GROUPS * m)))


if HAVE_TRITON:

    @triton.jit
    def as_bits_triton(x):
        """x reinterpreted as signed integers of its width (moves values bit for bit)."""
        if x.dtype.primitive_bitwidth == 64:
            bits = x.to(tl.int64, bitcast=True)
        elif x.dtype.primitive_bitwidth == 32:
            bits = x.to(tl.int32, bitcast=True)
        else:
            bits = x.to(tl.int16, bitcast=True)
        return bits

    @triton.jit
    def pick_column_triton(x3, k):
        """x3 [R, G, M], k [G] -> x3[r, g, k[g]] as [R, G], bit for bit: a masked integer sum
        over the M columns has exactly one nonzero term."""
        bits = as_bits_triton(x3)
        hit = tl.arange(0, x3.shape[2])[None, None, :] == k[None, :, None]
        picked = tl.sum(tl.where(hit, bits, 0), axis=2).to(bits.dtype)
        return picked.to(x3.dtype, bitcast=True)

    @triton.jit
    def join_columns_triton(x0, x1, x2, x3):
        """Four [R, G] tensors -> [R, 4G] with element (r, 4g + j) = x_j[r, g]."""
        joined = tl.join(tl.join(x0, x2), tl.join(x1, x3))  # [R, G, 2, 2]: (j // 2, j % 2)
        return tl.reshape(joined, [x0.shape[0], x0.shape[1] * 4])

    @triton.jit
    def split_columns_triton(x):
        """Inverse of join_columns_triton: [R, 4G] -> its four [R, G] tensors."""
        halves = tl.reshape(x, [x.shape[0], x.shape[1] // 4, 2, 2])
        even, odd = tl.split(halves)  # [R, G, 2]: j in (0, 2), (1, 3)
        x0, x2 = tl.split(even)
        x1, x3 = tl.split(odd)
        return x0, x1, x2, x3

    @triton.jit
    def _block_columns(columns_ptr, block, chunk, groups, GROUPS: tl.constexpr):
        """The chosen columns k0..k3 [GROUPS] of groups chunk * GROUPS... of `block`."""
        group = chunk * GROUPS + tl.arange(0, GROUPS)
        at = (block * groups + group).to(tl.int64)[:, None] * 4 + tl.arange(0, 4)[None, :]
        k = tl.load(columns_ptr + at, mask=(group < groups)[:, None], other=0)
        k0, k1, k2, k3 = split4(k.to(tl.int32))
        return k0, k1, k2, k3

    @triton.jit
    def _compact_kernel(
        dense_ptr,
        columns_ptr,
        out_ptr,
        tokens,
        ffn,
        width,
        dense_stride,
        V: tl.constexpr,
        M: tl.constexpr,
        GROUPS: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        block, chunk = tl.program_id(0), tl.program_id(1)
        groups = ffn // M
        k0, k1, k2, k3 = _block_columns(columns_ptr, block, chunk, groups, GROUPS)
        cols = chunk * (GROUPS * M) + tl.arange(0, GROUPS * M)
        cols_c = chunk * (GROUPS * 4) + tl.arange(0, GROUPS * 4)
        for step in range(0, tl.minimum(V, tokens - block * V), ROWS):  # the block's rows
            rows = block * V + step + tl.arange(0, ROWS)
            valid = (rows < tokens)[:, None] & (cols < ffn)[None, :]
            x = tl.load(
                dense_ptr + rows.to(tl.int64)[:, None] * dense_stride + cols[None, :], mask=valid
            )
            tile = tl.reshape(x, [ROWS, GROUPS, M])
            x0 = pick_column_triton(tile, k0)
            x1 = pick_column_triton(tile, k1)
            x2 = pick_column_triton(tile, k2)
            x3 = pick_column_triton(tile, k3)
            out = rows.to(tl.int64)[:, None] * width + cols_c[None, :]
            valid_c = (rows < tokens)[:, None] & (cols_c < width)[None, :]
            tl.store(out_ptr + out, join_columns_triton(x0, x1, x2, x3), mask=valid_c)

    @triton.jit
    def _scatter_kernel(
        values_ptr,
        columns_ptr,
        dense_ptr,
        tokens,
        ffn,
        width,
        values_stride,
        V: tl.constexpr,
        M: tl.constexpr,
        GROUPS: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        block, chunk = tl.program_id(0), tl.program_id(1)
        groups = ffn // M
        k0, k1, k2, k3 = _block_columns(columns_ptr, block, chunk, groups, GROUPS)
        c = tl.arange(0, M)[None, None, :]
        cols = chunk * (GROUPS * M) + tl.arange(0, GROUPS * M)
        cols_c = chunk * (GROUPS * 4) + tl.arange(0, GROUPS * 4)
        for step in range(0, tl.minimum(V, tokens - block * V), ROWS):  # the block's rows
            rows = block * V + step + tl.arange(0, ROWS)
            valid_c = (rows < tokens)[:, None] & (cols_c < width)[None, :]
            at = rows.to(tl.int64)[:, None] * values_stride + cols_c[None, :]
            x0, x1, x2, x3 = split_columns_triton(tl.load(values_ptr + at, mask=valid_c))
            # each dense column takes the bits of the compact column that chose it, else 0
            bits = tl.where(c == k0[None, :, None], as_bits_triton(x0)[:, :, None], 0)
            bits += tl.where(c == k1[None, :, None], as_bits_triton(x1)[:, :, None], 0)
            bits += tl.where(c == k2[None, :, None], as_bits_triton(x2)[:, :, None], 0)
            bits += tl.where(c == k3[None, :, None], as_bits_triton(x3)[:, :, None], 0)
            dense = tl.reshape(bits, [ROWS, GROUPS * M]).to(x0.dtype, bitcast=True)
            valid = (rows < tokens)[:, None] & (cols < ffn)[None, :]
            out = rows.to(tl.int64)[:, None] * ffn + cols[None, :]
            tl.store(dense_ptr + out, dense, mask=valid)


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t itself when its rows are contiguous (any row stride), else a contiguous copy."""
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def _grid(tokens: int, ffn: int, v: int, m: int) -> tuple:
    return (triton.cdiv(tokens, v), triton.cdiv(ffn // m, GROUPS))


def compact_triton(dense: torch.Tensor, columns: torch.Tensor, v: int, m: int) -> torch.Tensor:
    """Triton compact (GPU, or CPU under TRITON_INTERPRET=1): the same values_c, bit for bit."""
    require_triton()
    check_layout(columns, v, m, *dense.shape)
    dense, columns = _rows_contiguous(dense), columns.contiguous()
    tokens, ffn = dense.shape
    out = torch.empty(tokens, ffn // m * 4, dtype=dense.dtype, device=dense.device)
    if out.numel():
        _compact_kernel[_grid(tokens, ffn, v, m)](
            dense, columns, out, tokens, ffn, out.shape[1], dense.stride(0),
            V=v, M=m, GROUPS=GROUPS, ROWS=rows_per_step(v, m), num_warps=NUM_WARPS,
        )  # fmt: skip
    return out


def scatter_triton(
    values_c: torch.Tensor, columns: torch.Tensor, v: int, m: int, ffn: int
) -> torch.Tensor:
    """Triton scatter (GPU, or CPU under TRITON_INTERPRET=1): the same dense tensor, bit for bit."""
    require_triton()
    tokens = values_c.shape[0]
    check_layout(columns, v, m, tokens, ffn)
    if values_c.shape[1] != ffn // m * 4:
        raise ValueError(
            f"megasparse: scatter needs values_c [T, 4F/M] = [{tokens}, {ffn // m * 4}], got "
            f"{tuple(values_c.shape)}"
        )
    values_c, columns = _rows_contiguous(values_c), columns.contiguous()
    dense = torch.empty(tokens, ffn, dtype=values_c.dtype, device=values_c.device)
    if dense.numel():
        _scatter_kernel[_grid(tokens, ffn, v, m)](
            values_c, columns, dense, tokens, ffn, values_c.shape[1], values_c.stride(0),
            V=v, M=m, GROUPS=GROUPS, ROWS=rows_per_step(v, m), num_warps=NUM_WARPS,
        )  # fmt: skip
    return dense


def compile_specs(dtype: torch.dtype) -> list:
    """The compact / scatter launches at REPORT_PATTERNS, described for the offline report
    (elements: one step of ROWS rows; `columns` is read once per program, before the steps)."""
    specs = []
    for v, m in REPORT_PATTERNS:
        rows = rows_per_step(v, m)
        constexprs = {"V": v, "M": m, "GROUPS": GROUPS, "ROWS": rows}
        dense, compacted = rows * GROUPS * m, rows * GROUPS * 4
        reads = {"columns_ptr": GROUPS * 4}
        for name, kernel, first, elements in (
            ("compact", _compact_kernel, "dense_ptr", dense),
            ("scatter", _scatter_kernel, "values_ptr", compacted),
        ):
            out = "out_ptr" if name == "compact" else "dense_ptr"
            arguments = (
                f"{first}:*T/16 columns_ptr:*i16/16 {out}:*T/16 tokens:i32 ffn:i32/16 width:i32/16 "
                f"{first.replace('_ptr', '_stride')}:i32/16"
            )
            spec = compile_spec(
                f"{name}_{v}_{m}", kernel, dtype, arguments, constexprs, elements, NUM_WARPS,
                reads=(first,),
            )  # fmt: skip
            spec.reads = {first: elements, **reads}
            specs.append(spec)
    return specs
