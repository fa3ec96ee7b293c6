"""FFN activation sparsity: Squared-ReLU (optional) and V:N:M / 2:4 sparsification in one pass.

Input x [tokens, ffn] (the fc1 output plus bias). a = relu(x)^2 when `squared_relu`, else a = x.
V:N:M: tokens are cut into blocks of V rows and ffn into groups of M columns; each V x M block
keeps the same 4 columns (largest column L2 norm over the block, norms summed in float64, ties
to the lower column). N = 2 (VENOM) then keeps, inside those 4, the 2 largest |a| of each row
(ties to the lower column); N = 4 keeps all 4. Density N/M. 2:4 is the case N = 2, M = 4: all 4
columns are kept, 2 per row.
The last row block may be shorter than V (no padding is materialized).

NaN/Inf follow the NaN rule of kernels.common, in the reference and the kernels alike: rank keys
are |a| and the column norms with NaN ranked as +inf, ties to the lower column. A column holding
a NaN or Inf has norm +inf, so it is chosen (the lowest 4 such columns when more are), and in
its rows the NaN/Inf is kept (the lowest 2 when more are): every block group that holds a NaN
or Inf keeps one, so it reaches the loss. Values are where(mask, a, 0), so the output is
exactly the pattern: a dropped NaN/Inf becomes 0. (Squared-ReLU maps -inf to 0, as torch.relu.)

a is computed in float32 (float64 for float64 inputs); ranking and statistics use it, and the
values are a rounded to x's dtype. Returns
values (a masked, in x's dtype), the bool mask, the kept columns per block
[ceil(tokens/V), ffn/M, 4] (ascending; what a V:N:M GEMM consumes besides the 2:4 values) and
stats [zeros, sum|a|, dropped sum|a|, numel] in float64.
"""

import torch

from .activation_2_4 import activation_2_4_reference
from .common import HAVE_TRITON, compile_spec, rank_key, require_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .activation_2_4 import activation_2_4_triton
    from .common import join4, rank_key_triton


def _check(x: torch.Tensor, v: int, m: int, n: int = 2) -> None:
    if x.dim() != 2:
        raise ValueError(
            f"megasparse: activation sparsity needs a 2-D [tokens, ffn] input, got {tuple(x.shape)}"
        )
    if n not in (2, 4) or m < 2 * n or m & (m - 1) or v < 1 or v & (v - 1):
        raise ValueError(
            f"megasparse: V:N:M needs V and M powers of two, N = 2 with M >= 4 or N = 4 with "
            f"M >= 8, got V={v}, N={n}, M={m}"
        )
    if x.shape[1] % m:
        raise ValueError(
            f"megasparse: V:N:M activation sparsity with M={m} needs the ffn size per tensor-parallel rank "
            f"to be a multiple of {m}, got {x.shape[1]}"
        )


def _all_columns(blocks: int, ffn: int, device) -> torch.Tensor:
    """`columns` of 2:4: every block keeps columns 0..3 of every group."""
    return (
        torch.arange(4, dtype=torch.int16, device=device).expand(blocks, ffn // 4, 4).contiguous()
    )


def _keep_top(score: torch.Tensor, eligible: torch.Tensor, k: int) -> torch.Tensor:
    """Along the last dim keep the k largest eligible scores (rank keys); ties go to the lower index."""
    n = score.shape[-1]
    lower = torch.ones(n, n, dtype=torch.bool, device=score.device).tril(-1)  # [i, j]: j < i
    mine, other = score[..., :, None], score[..., None, :]
    beaten_by = eligible[..., None, :] & ((other > mine) | ((other == mine) & lower))
    return eligible & (beaten_by.sum(-1) < k)


def activation_sparsify_reference(x: torch.Tensor, v: int, m: int, squared_relu: bool, n: int = 2):
    """Pure-torch reference of the kernels: V:N:M below, 2:4 (M = 4) in activation_2_4."""
    _check(x, v, m, n)
    tokens, ffn = x.shape
    if m == 4:  # every block keeps all 4 columns: no norms needed, the same mask in half the time
        values, mask, stats = activation_2_4_reference(x, squared_relu)
        return values, mask, _all_columns(-(-tokens // v), ffn, x.device), stats
    a = x.double() if x.dtype == torch.float64 else x.float()
    a = torch.relu(a).square() if squared_relu else a
    blocks = -(-tokens // v)
    padded = torch.zeros(blocks * v, ffn, dtype=a.dtype, device=x.device)
    padded[:tokens] = a
    tiles = padded.reshape(blocks, v, ffn // m, m)  # [block, row, group, col]
    norms = rank_key(tiles.double().square().sum(1))  # [block, group, col]
    chosen = _keep_top(norms, torch.ones_like(norms, dtype=torch.bool), 4)
    magnitude = rank_key(tiles).permute(0, 2, 1, 3)  # [block, group, row, col]
    keep = _keep_top(magnitude, chosen[:, :, None, :].expand_as(magnitude), n)
    mask = keep.permute(0, 2, 1, 3).reshape(blocks * v, ffn)[:tokens]
    columns = torch.nonzero(chosen)[:, 2].reshape(blocks, ffn // m, 4).to(torch.int16)
    dropped = torch.where(mask, 0.0, a.abs().double()).sum()
    stats = torch.stack(
        [
            (a == 0).sum().double(),
            a.abs().double().sum(),
            dropped,
            torch.tensor(float(a.numel()), dtype=torch.float64, device=x.device),
        ]
    )
    return torch.where(mask, a, 0.0).to(x.dtype), mask, columns, stats


# Launch of the V:N:M kernel (M >= 8): one program takes V rows x GROUPS groups of M columns,
# about ELEMENTS elements; 2:4 (M = 4) runs the flat kernel of activation_2_4.
ELEMENTS = 4096
NUM_WARPS = 4
REPORT_PATTERNS = ((64, 8), (64, 16))  # (V, M) compiled by the offline report


def groups_per_program(v: int, m: int) -> int:
    return max(1, ELEMENTS // (v * m))


if HAVE_TRITON:

    @triton.jit
    def activate_triton(x, SQUARED_RELU: tl.constexpr, FP64: tl.constexpr):
        """a = relu(x)^2 (or x) in float32 (float64 for float64 x)."""
        a = x.to(tl.float64) if FP64 else x.to(tl.float32)
        if SQUARED_RELU:
            a = tl.where(a < 0.0, 0.0, a)  # relu that keeps NaN, as torch.relu
            a = a * a
        return a

    @triton.jit
    def choose_columns_triton(a3):
        """The column choice of V:N:M on a [V, GROUPS, M] tile: per group the 4 columns of largest
        L2 norm over the V rows (summed in float64, NaN ranked +inf), ties to the lower column.
        Returns the chosen flags [GROUPS, M] and the chosen columns k0 < k1 < k2 < k3 [GROUPS]."""
        a64 = a3.to(tl.float64)
        norm = rank_key_triton(tl.sum(a64 * a64, axis=0))  # [GROUPS, M]
        c = tl.arange(0, a3.shape[2])
        lower = c[None, :] < c[:, None]  # [c, c']: c' < c
        beaten = (norm[:, None, :] > norm[:, :, None]) | (
            (norm[:, None, :] == norm[:, :, None]) & lower[None]
        )
        chosen = tl.sum(beaten.to(tl.int32), axis=2) < 4  # [GROUPS, M]
        # the chosen columns in ascending order: column k_j has j chosen columns before it
        before = tl.sum((chosen[:, None, :] & lower[None]).to(tl.int32), axis=2)
        k0 = tl.sum(tl.where(chosen & (before == 0), c[None, :], 0), axis=1)  # [GROUPS]
        k1 = tl.sum(tl.where(chosen & (before == 1), c[None, :], 0), axis=1)
        k2 = tl.sum(tl.where(chosen & (before == 2), c[None, :], 0), axis=1)
        k3 = tl.sum(tl.where(chosen & (before == 3), c[None, :], 0), axis=1)
        return chosen, k0, k1, k2, k3

    @triton.jit
    def store_columns_triton(columns_ptr, block, chunk, groups, k0, k1, k2, k3):
        """Write the chosen columns [GROUPS] of groups chunk * GROUPS... of `block` into `columns`
        [blocks, groups, 4]."""
        group = chunk * k0.shape[0] + tl.arange(0, k0.shape[0])
        out = (block * groups + group)[:, None] * 4 + tl.arange(0, 4)[None, :]
        tl.store(
            columns_ptr + out, join4(k0, k1, k2, k3).to(tl.int16), mask=(group < groups)[:, None]
        )

    @triton.jit
    def _activation_vnm_kernel(
        x_ptr,
        values_ptr,
        mask_ptr,
        columns_ptr,
        stats_ptr,
        tokens,
        ffn,
        V: tl.constexpr,
        M: tl.constexpr,
        GROUPS: tl.constexpr,
        SQUARED_RELU: tl.constexpr,
        FP64: tl.constexpr,
        N: tl.constexpr = 2,
    ):
        block, chunk = tl.program_id(0), tl.program_id(1)
        rows = block * V + tl.arange(0, V)
        cols = chunk * (GROUPS * M) + tl.arange(0, GROUPS * M)
        offsets = rows.to(tl.int64)[:, None] * ffn + cols[None, :]  # [V, GROUPS * M]
        valid = (rows < tokens)[:, None] & (cols < ffn)[None, :]
        x = tl.load(x_ptr + offsets, mask=valid, other=0.0)
        a = activate_triton(x, SQUARED_RELU, FP64)
        a3 = tl.reshape(a, [V, GROUPS, M])
        mag = rank_key_triton(a3)
        chosen, k0, k1, k2, k3 = choose_columns_triton(a3)
        c = tl.arange(0, M)
        # inside them the N largest |a| per row, ties to the lower column: count the chosen
        # columns that beat each element
        c3 = c[None, None, :]
        n_beaten = tl.zeros([V, GROUPS, M], dtype=tl.int32)
        for j in tl.static_range(4):
            k = (k0 if j == 0 else k1 if j == 1 else k2 if j == 2 else k3)[None, :, None]
            other = tl.sum(tl.where(c3 == k, mag, 0.0), axis=2)[:, :, None]  # |a| at column k
            n_beaten += ((other > mag) | ((other == mag) & (k < c3))).to(tl.int32)
        keep = chosen[None, :, :] & (n_beaten < N)
        keep = tl.reshape(keep, [V, GROUPS * M]) & valid
        # where, not a * keep: a dropped NaN/inf becomes 0, so the output is exactly the pattern
        tl.store(
            values_ptr + offsets, tl.where(keep, a, 0.0).to(values_ptr.dtype.element_ty), mask=valid
        )
        tl.store(mask_ptr + offsets, keep.to(tl.int8), mask=valid)
        store_columns_triton(columns_ptr, block, chunk, ffn // M, k0, k1, k2, k3)
        mag2 = tl.abs(a)
        stats_ptr += (block * tl.num_programs(1) + chunk) * 3
        tl.store(stats_ptr, tl.sum(tl.sum(((a == 0.0) & valid).to(tl.float32), axis=1), axis=0))
        tl.store(stats_ptr + 1, tl.sum(tl.sum(mag2, axis=1), axis=0))
        tl.store(stats_ptr + 2, tl.sum(tl.sum(tl.where(keep, 0.0, mag2), axis=1), axis=0))


def activation_sparsify_triton(x: torch.Tensor, v: int, m: int, squared_relu: bool, n: int = 2):
    """Triton kernels (GPU, or CPU under TRITON_INTERPRET=1); same results as the reference.

    2:4 (M = 4) runs the flat 2:4 kernel (V only sets the shape of `columns`).
    """
    require_triton()
    _check(x, v, m, n)
    x = x.contiguous()
    tokens, ffn = x.shape
    blocks = triton.cdiv(tokens, v)
    if m == 4:
        values, mask, partial = activation_2_4_triton(x, squared_relu)
        columns = _all_columns(blocks, ffn, x.device)
    else:
        values = torch.empty_like(x)
        mask = torch.empty(x.shape, dtype=torch.int8, device=x.device)
        columns = torch.empty(blocks, ffn // m, 4, dtype=torch.int16, device=x.device)
        groups = groups_per_program(v, m)
        grid = (blocks, triton.cdiv(ffn // m, groups))
        partial = torch.empty(grid[0] * grid[1], 3, dtype=torch.float32, device=x.device)
        if x.numel():
            _activation_vnm_kernel[grid](
                x,
                values,
                mask,
                columns,
                partial,
                tokens,
                ffn,
                V=v,
                M=m,
                GROUPS=groups,
                SQUARED_RELU=squared_relu,
                FP64=x.dtype == torch.float64,
                N=n,
                num_warps=NUM_WARPS,
                enable_fp_fusion=False,
            )
        mask = mask.view(torch.bool)
    return values, mask, columns, stats_from_partials(partial, x)


def stats_from_partials(partial: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """stats [zeros, sum|a|, dropped sum|a|, numel] (float64) from the kernels' per-program
    float32 sums [programs, 3]."""
    numel = torch.tensor([float(x.numel())], dtype=torch.float64, device=x.device)
    return torch.cat([partial.double().sum(0), numel])


def compile_specs(dtype: torch.dtype) -> list:
    """The V:N:M launches above at REPORT_PATTERNS, described for the offline compile report."""
    arguments = (
        "x_ptr:*T/16 values_ptr:*T/16 mask_ptr:*i8/16 columns_ptr:*i16/16 stats_ptr:*fp32/16 "
        "tokens:i32 ffn:i32/16"
    )
    specs = []
    for v, m in REPORT_PATTERNS:
        groups = groups_per_program(v, m)
        name = f"activation_{v}_2_{m}_squared_relu"
        constexprs = {"V": v, "M": m, "GROUPS": groups, "SQUARED_RELU": True, "FP64": False, "N": 2}
        elements = v * m * groups
        kernel = _activation_vnm_kernel
        specs.append(compile_spec(name, kernel, dtype, arguments, constexprs, elements, NUM_WARPS))
    return specs
