"""V:N:M selection written straight into the compact layout (M >= 8): along ffn, fused with the
Squared-ReLU (activation_compact), and along tokens on x^T read in place (compact_tokens).

activation_compact(x [T, F], v, n, m, squared_relu) selects exactly as activation_sparsify (same
column norms, ties, NaN rule and N = 2 row step; see there) and returns the compact layout of
kernels.compact: values_c [T, 4F/M] (a = relu(x)^2, or x, at the chosen columns, rounded to x's
dtype, 0 where N = 2 drops), preact_c [T, 4F/M] (x at the same positions, 0 where dropped),
columns int16 [ceil(T/V), F/M, 4] and stats [zeros, sum|a|, dropped sum|a|, numel] (float64).
The kernel writes only these: no dense values or mask (what the compact path saves).

compact_tokens(x [T, F], v, n, m) applies the same rule to x^T (no activation function): blocks of
V neurons x M tokens keep the 4 tokens of largest L2 norm over the block's neurons, returning
values_c [F, 4 ceil(T/M)] and columns int16 [ceil(F/V), ceil(T/M), 4]. Tokens past T count as
zeros: with ties to the lower index they are chosen only in a group of fewer than 4 real tokens.
"""

import torch

from .activation_sparsify import _check, activation_sparsify_reference, groups_per_program
from .common import HAVE_TRITON, compile_spec, require_triton
from .compact import compact

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .activation_sparsify import (
        activate_triton,
        choose_columns_triton,
        stats_from_partials,
        store_columns_triton,
    )
    from .common import rank_key_triton, top2_of_4
    from .compact import join_columns_triton, pick_column_triton

NUM_WARPS = 4


def _groups(v: int, m: int, dtype: torch.dtype) -> int:
    """Groups of M per program: activation_sparsify's tile, halved for 4- and 8-byte inputs (their
    x and a take twice the registers)."""
    return max(1, groups_per_program(v, m) // max(1, torch.finfo(dtype).bits // 16))


REPORT_PATTERNS = ((64, 2, 8), (64, 2, 16), (64, 4, 8))  # (V, N, M) compiled by the offline report


def _check_compact(x: torch.Tensor, v: int, n: int, m: int) -> None:
    if m < 8:
        raise ValueError(
            f"megasparse: the compact layout needs M >= 8 (V:N:M with M = 4 is 2:4, which keeps "
            f"all 4 columns and runs activation_sparsify), got V={v}, N={n}, M={m}"
        )
    _check(x, v, m, n)


def _check_tokens(x: torch.Tensor, v: int, n: int, m: int) -> int:
    """Check x [T, F] and the pattern along tokens; the number of token groups ceil(T/M)."""
    if x.dim() != 2:
        raise ValueError(
            f"megasparse: compact_tokens needs a 2-D [tokens, features] input, got {tuple(x.shape)}"
        )
    groups = -(-x.shape[0] // m) if m > 0 else 0
    _check_compact(x.new_empty(0, groups * m), v, n, m)  # x^T padded to whole groups of M tokens
    return groups


def activation_compact_reference(x: torch.Tensor, v: int, n: int, m: int, squared_relu: bool):
    """Pure-torch reference: activation_sparsify_reference's output, compacted."""
    _check_compact(x, v, n, m)
    values, mask, columns, stats = activation_sparsify_reference(x, v, m, squared_relu, n)
    preact = torch.where(mask, x, 0)
    return compact(values, columns, v, m), compact(preact, columns, v, m), columns, stats


def compact_tokens_reference(x: torch.Tensor, v: int, n: int, m: int):
    """Pure-torch reference: activation_sparsify_reference (no activation) of x^T padded with zero
    tokens to a multiple of M, compacted."""
    groups = _check_tokens(x, v, n, m)
    padded = x.new_zeros(x.shape[1], groups * m)
    padded[:, : x.shape[0]] = x.t()
    values, _, columns, _ = activation_sparsify_reference(padded, v, m, False, n)
    return compact(values, columns, v, m), columns


if HAVE_TRITON:

    @triton.jit
    def _chosen_values(
        tile, k0, k1, k2, k3, N: tl.constexpr, SQUARED_RELU: tl.constexpr, FP64: tl.constexpr
    ):
        """The input and activation at the chosen columns of a [R, G, M] tile, [R, G] each, and
        whether each is kept: N = 2 keeps the 2 largest |a| of the 4 per row (ties to the lower
        column; the columns ascend, so top2_of_4's lower index is the lower column)."""
        x0 = pick_column_triton(tile, k0)
        x1 = pick_column_triton(tile, k1)
        x2 = pick_column_triton(tile, k2)
        x3 = pick_column_triton(tile, k3)
        a0 = activate_triton(x0, SQUARED_RELU, FP64)
        a1 = activate_triton(x1, SQUARED_RELU, FP64)
        a2 = activate_triton(x2, SQUARED_RELU, FP64)
        a3 = activate_triton(x3, SQUARED_RELU, FP64)
        if N == 2:
            keep0, keep1, keep2, keep3 = top2_of_4(
                rank_key_triton(a0), rank_key_triton(a1), rank_key_triton(a2), rank_key_triton(a3)
            )
        else:
            keep0 = tl.full(x0.shape, True, tl.int1)
            keep1, keep2, keep3 = keep0, keep0, keep0
        return x0, x1, x2, x3, a0, a1, a2, a3, keep0, keep1, keep2, keep3

    @triton.jit
    def _activation_compact_kernel(
        x_ptr,
        values_ptr,
        preact_ptr,
        columns_ptr,
        stats_ptr,
        tokens,
        ffn,
        width,
        V: tl.constexpr,
        M: tl.constexpr,
        GROUPS: tl.constexpr,
        SQUARED_RELU: tl.constexpr,
        FP64: tl.constexpr,
        N: tl.constexpr,
    ):
        block, chunk = tl.program_id(0), tl.program_id(1)
        rows = block * V + tl.arange(0, V)
        cols = chunk * (GROUPS * M) + tl.arange(0, GROUPS * M)
        valid = (rows < tokens)[:, None] & (cols < ffn)[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * ffn + cols[None, :], mask=valid, other=0.0)
        a = activate_triton(x, SQUARED_RELU, FP64)
        chosen, k0, k1, k2, k3 = choose_columns_triton(tl.reshape(a, [V, GROUPS, M]))
        x0, x1, x2, x3, a0, a1, a2, a3, keep0, keep1, keep2, keep3 = _chosen_values(
            tl.reshape(x, [V, GROUPS, M]), k0, k1, k2, k3, N, SQUARED_RELU, FP64
        )
        # where, not a * keep: a dropped NaN/inf becomes 0, so the output is exactly the pattern
        values = join_columns_triton(
            tl.where(keep0, a0, 0.0), tl.where(keep1, a1, 0.0),
            tl.where(keep2, a2, 0.0), tl.where(keep3, a3, 0.0),
        )  # fmt: skip
        preact = join_columns_triton(
            tl.where(keep0, x0, 0.0), tl.where(keep1, x1, 0.0),
            tl.where(keep2, x2, 0.0), tl.where(keep3, x3, 0.0),
        )  # fmt: skip
        cols_c = chunk * (GROUPS * 4) + tl.arange(0, GROUPS * 4)
        out = rows.to(tl.int64)[:, None] * width + cols_c[None, :]
        valid_c = (rows < tokens)[:, None] & (cols_c < width)[None, :]
        tl.store(values_ptr + out, values.to(values_ptr.dtype.element_ty), mask=valid_c)
        tl.store(preact_ptr + out, preact, mask=valid_c)
        store_columns_triton(columns_ptr, block, chunk, ffn // M, k0, k1, k2, k3)
        # dropped |a|: the columns not chosen, plus the chosen ones N = 2 drops in each row
        mag = tl.abs(a)
        unchosen = tl.where(chosen[None, :, :], 0.0, tl.reshape(mag, [V, GROUPS, M]))
        row_dropped = (
            tl.where(keep0, 0.0, tl.abs(a0)) + tl.where(keep1, 0.0, tl.abs(a1))
            + tl.where(keep2, 0.0, tl.abs(a2)) + tl.where(keep3, 0.0, tl.abs(a3))
        )  # fmt: skip
        stats_ptr += (block * tl.num_programs(1) + chunk) * 3
        tl.store(stats_ptr, tl.sum(tl.sum(((a == 0.0) & valid).to(tl.float32), axis=1), axis=0))
        tl.store(stats_ptr + 1, tl.sum(tl.sum(mag, axis=1), axis=0))
        dropped = tl.sum(tl.sum(tl.sum(unchosen, axis=2), axis=1), axis=0)
        tl.store(stats_ptr + 2, dropped + tl.sum(tl.sum(row_dropped, axis=1), axis=0))

    @triton.jit
    def _compact_tokens_kernel(
        x_ptr,
        values_ptr,
        columns_ptr,
        tokens,
        features,
        width,
        x_stride,
        V: tl.constexpr,
        M: tl.constexpr,
        GROUPS: tl.constexpr,
        FP64: tl.constexpr,
        N: tl.constexpr,
    ):
        block, chunk = tl.program_id(0), tl.program_id(1)  # V neurons, GROUPS groups of M tokens
        neurons = block * V + tl.arange(0, V)
        toks = chunk * (GROUPS * M) + tl.arange(0, GROUPS * M)
        valid = (toks < tokens)[:, None] & (neurons < features)[None, :]
        at = toks.to(tl.int64)[:, None] * x_stride + neurons[None, :]
        x = tl.load(x_ptr + at, mask=valid, other=0.0)  # [GROUPS * M, V]: rows of x, in place
        tile = tl.reshape(tl.trans(x), [V, GROUPS, M])  # x^T's V x M blocks
        groups = tl.cdiv(tokens, M)
        _, k0, k1, k2, k3 = choose_columns_triton(tile.to(tl.float64 if FP64 else tl.float32))
        x0, x1, x2, x3, _, _, _, _, keep0, keep1, keep2, keep3 = _chosen_values(
            tile, k0, k1, k2, k3, N, False, FP64
        )
        values = join_columns_triton(
            tl.where(keep0, x0, 0.0), tl.where(keep1, x1, 0.0),
            tl.where(keep2, x2, 0.0), tl.where(keep3, x3, 0.0),
        )  # fmt: skip
        cols_c = chunk * (GROUPS * 4) + tl.arange(0, GROUPS * 4)
        out = neurons.to(tl.int64)[:, None] * width + cols_c[None, :]
        valid_c = (neurons < features)[:, None] & (cols_c < width)[None, :]
        tl.store(values_ptr + out, values, mask=valid_c)
        store_columns_triton(columns_ptr, block, chunk, groups, k0, k1, k2, k3)


def activation_compact_triton(x: torch.Tensor, v: int, n: int, m: int, squared_relu: bool):
    """Triton kernel (GPU, or CPU under TRITON_INTERPRET=1); the reference's results, bit for bit
    (stats: float32 partial sums per program)."""
    require_triton()
    _check_compact(x, v, n, m)
    x = x.contiguous()
    tokens, ffn = x.shape
    blocks, groups = triton.cdiv(tokens, v), _groups(v, m, x.dtype)
    values = torch.empty(tokens, ffn // m * 4, dtype=x.dtype, device=x.device)
    preact = torch.empty_like(values)
    columns = torch.empty(blocks, ffn // m, 4, dtype=torch.int16, device=x.device)
    grid = (blocks, triton.cdiv(ffn // m, groups))
    partial = torch.zeros(grid[0] * grid[1], 3, dtype=torch.float32, device=x.device)
    if x.numel():
        _activation_compact_kernel[grid](
            x, values, preact, columns, partial, tokens, ffn, values.shape[1],
            V=v, M=m, GROUPS=groups, SQUARED_RELU=squared_relu, FP64=x.dtype == torch.float64,
            N=n, num_warps=NUM_WARPS, enable_fp_fusion=False,
        )  # fmt: skip
    return values, preact, columns, stats_from_partials(partial, x)


def compact_tokens_triton(x: torch.Tensor, v: int, n: int, m: int):
    """Triton kernel (GPU, or CPU under TRITON_INTERPRET=1) reading x [T, F] in place (any row
    stride); the reference's results, bit for bit."""
    require_triton()
    groups = _check_tokens(x, v, n, m)
    tokens, features = x.shape
    if x.stride(1) != 1 and features > 1:
        x = x.contiguous()
    blocks = triton.cdiv(features, v)
    values = torch.empty(features, groups * 4, dtype=x.dtype, device=x.device)
    columns = torch.empty(blocks, groups, 4, dtype=torch.int16, device=x.device)
    per_program = _groups(v, m, x.dtype)
    if values.numel():
        _compact_tokens_kernel[(blocks, triton.cdiv(groups, per_program))](
            x, values, columns, tokens, features, values.shape[1], x.stride(0),
            V=v, M=m, GROUPS=per_program, FP64=x.dtype == torch.float64, N=n,
            num_warps=NUM_WARPS, enable_fp_fusion=False,
        )  # fmt: skip
    return values, columns


def compile_specs(dtype: torch.dtype) -> list:
    """The launches above at REPORT_PATTERNS, described for the offline compile report."""
    specs = []
    for v, n, m in REPORT_PATTERNS:
        groups = _groups(v, m, dtype)
        elements = v * groups * m
        arguments = (
            "x_ptr:*T/16 values_ptr:*T/16 preact_ptr:*T/16 columns_ptr:*i16/16 "
            "stats_ptr:*fp32/16 tokens:i32 ffn:i32/16 width:i32/16"
        )
        constexprs = {"V": v, "M": m, "GROUPS": groups, "SQUARED_RELU": True, "FP64": False, "N": n}
        specs.append(
            compile_spec(
                f"activation_compact_{v}_{n}_{m}_squared_relu", _activation_compact_kernel, dtype,
                arguments, constexprs, elements, NUM_WARPS,
            )
        )  # fmt: skip
        if n == 4:  # the both-ways weight gradients' pattern
            arguments = (
                "x_ptr:*T/16 values_ptr:*T/16 columns_ptr:*i16/16 tokens:i32 features:i32/16 "
                "width:i32/16 x_stride:i32/16"
            )
            constexprs = {"V": v, "M": m, "GROUPS": groups, "FP64": False, "N": n}
            specs.append(
                compile_spec(
                    f"compact_tokens_{v}_{n}_{m}", _compact_tokens_kernel, dtype, arguments,
                    constexprs, elements, NUM_WARPS,
                )
            )  # fmt: skip
    return specs
