"""FFN activation sparsity: Squared-ReLU (optional) and V:N:M / 2:4 sparsification in one pass.

Input x [tokens, ffn] (the fc1 output plus bias). a = relu(x)^2 when `squared_relu`, else a = x.
V:2:M (VENOM): tokens are cut into blocks of V rows and ffn into groups of M columns; each
V x M block keeps the same 4 columns (largest column L2 norm over the block, norms summed in
float64, ties to the lower column) and, inside those 4, the 2 largest |a| of each row (ties to
the lower column). Density 2/M. 2:4 is the case M = 4: all 4 columns are kept, 2 per row.
The last row block may be shorter than V (no padding is materialized).

a is computed in float32 (float64 for float64 inputs); ranking and statistics use it, and the
values are a rounded to x's dtype. Returns
values (a masked, in x's dtype), the bool mask, the kept columns per block
[ceil(tokens/V), ffn/M, 4] (ascending; what a V:N:M GEMM consumes besides the 2:4 values) and
stats [zeros, sum|a|, dropped sum|a|, numel] in float64.
"""

import torch

from .common import HAVE_TRITON, require_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl


def _check(x: torch.Tensor, v: int, m: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"megasparse: activation sparsity needs a 2-D [tokens, ffn] input, got {tuple(x.shape)}")
    if m < 4 or m & (m - 1) or v < 1 or v & (v - 1):
        raise ValueError(f"megasparse: V:2:M needs V and M powers of two with M >= 4, got V={v}, M={m}")
    if x.shape[1] % m:
        raise ValueError(
            f"megasparse: V:2:M activation sparsity with M={m} needs the ffn size per tensor-parallel rank "
            f"to be a multiple of {m}, got {x.shape[1]}"
        )


def _keep_top(score: torch.Tensor, eligible: torch.Tensor, k: int) -> torch.Tensor:
    """Along the last dim keep the k largest eligible scores; ties go to the lower index."""
    n = score.shape[-1]
    lower = torch.ones(n, n, dtype=torch.bool, device=score.device).tril(-1)  # [i, j]: j < i
    mine, other = score[..., :, None], score[..., None, :]
    beaten_by = eligible[..., None, :] & ((other > mine) | ((other == mine) & lower))
    return eligible & (beaten_by.sum(-1) < k)


def activation_sparsify_reference(x: torch.Tensor, v: int, m: int, squared_relu: bool):
    """Pure-torch reference of the kernel below."""
    _check(x, v, m)
    tokens, ffn = x.shape
    a = x.double() if x.dtype == torch.float64 else x.float()
    a = torch.relu(a).square() if squared_relu else a
    blocks = -(-tokens // v)
    padded = torch.zeros(blocks * v, ffn, dtype=a.dtype, device=x.device)
    padded[:tokens] = a
    tiles = padded.reshape(blocks, v, ffn // m, m)  # [block, row, group, col]
    norms = tiles.double().square().sum(1)  # [block, group, col]
    chosen = _keep_top(norms, torch.ones_like(norms, dtype=torch.bool), 4)
    magnitude = tiles.abs().permute(0, 2, 1, 3)  # [block, group, row, col]
    keep = _keep_top(magnitude, chosen[:, :, None, :].expand_as(magnitude), 2)
    mask = keep.permute(0, 2, 1, 3).reshape(blocks * v, ffn)[:tokens]
    columns = torch.nonzero(chosen)[:, 2].reshape(blocks, ffn // m, 4).to(torch.int16)
    dropped = (a.abs().double() * ~mask).sum()
    stats = torch.stack([(a == 0).sum().double(), a.abs().double().sum(), dropped,
                         torch.tensor(float(a.numel()), dtype=torch.float64, device=x.device)])
    return (a * mask).to(x.dtype), mask, columns, stats


if HAVE_TRITON:

    @triton.jit
    def _activation_sparsify_kernel(
        x_ptr, values_ptr, mask_ptr, columns_ptr, stats_ptr, tokens, ffn,
        V: tl.constexpr, M: tl.constexpr, SQUARED_RELU: tl.constexpr, FP64: tl.constexpr,
    ):
        block, group = tl.program_id(0), tl.program_id(1)
        rows = block * V + tl.arange(0, V)
        cols = tl.arange(0, M)
        offsets = rows.to(tl.int64)[:, None] * ffn + group * M + cols[None, :]
        valid = (rows < tokens)[:, None]
        x = tl.load(x_ptr + offsets, mask=valid, other=0.0)
        if FP64:
            a = x.to(tl.float64)
        else:
            a = x.to(tl.float32)
        if SQUARED_RELU:
            a = tl.maximum(a, 0.0)
            a = a * a
        # the block's 4 columns: largest L2 norm (float64 sums), ties to the lower column
        norm = tl.sum((a * a).to(tl.float64), axis=0)  # [M]
        col_lower = cols[None, :] < cols[:, None]  # [c, c']: c' < c
        beaten = (norm[None, :] > norm[:, None]) | ((norm[None, :] == norm[:, None]) & col_lower)
        chosen = tl.sum(beaten.to(tl.int32), axis=1) < 4  # [M]
        # inside them, the 2 largest |a| per row, ties to the lower column
        mag = tl.abs(a)
        mine, other = mag[:, :, None], mag[:, None, :]  # [row, c, c']
        beaten_row = chosen[None, None, :] & ((other > mine) | ((other == mine) & col_lower[None, :, :]))
        keep = chosen[None, :] & (tl.sum(beaten_row.to(tl.int32), axis=2) < 2) & valid
        tl.store(values_ptr + offsets, tl.where(keep, a, 0.0).to(values_ptr.dtype.element_ty), mask=valid)
        tl.store(mask_ptr + offsets, keep.to(tl.int8), mask=valid)
        # kept columns in ascending order: the k-th chosen column is the one with k chosen before it
        before = tl.sum((chosen[None, :] & col_lower).to(tl.int32), axis=1)  # [M]
        out = (block * (ffn // M) + group) * 4
        for k in tl.static_range(4):
            tl.store(columns_ptr + out + k, tl.sum(tl.where(chosen & (before == k), cols, 0), axis=0).to(tl.int16))
        zeros = tl.sum(tl.sum(((a == 0.0) & valid).to(tl.float32), axis=1), axis=0)
        total = tl.sum(tl.sum(mag, axis=1), axis=0)
        dropped = tl.sum(tl.sum(tl.where(keep, 0.0, mag), axis=1), axis=0)
        partial = (block * tl.num_programs(1) + group) * 3
        tl.store(stats_ptr + partial, zeros)
        tl.store(stats_ptr + partial + 1, total)
        tl.store(stats_ptr + partial + 2, dropped)


def activation_sparsify_triton(x: torch.Tensor, v: int, m: int, squared_relu: bool):
    """Triton kernel (GPU, or CPU under TRITON_INTERPRET=1); same results as the reference.

    For 2:4 (M = 4) V only sets the rows per program; 64 is a good tile.
    """
    require_triton()
    _check(x, v, m)
    x = x.contiguous()
    tokens, ffn = x.shape
    blocks = triton.cdiv(tokens, v)
    values = torch.empty_like(x)
    mask = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    columns = torch.empty(blocks, ffn // m, 4, dtype=torch.int16, device=x.device)
    partial = torch.empty(blocks * (ffn // m), 3, dtype=torch.float32, device=x.device)
    if x.numel():
        _activation_sparsify_kernel[(blocks, ffn // m)](
            x, values, mask, columns, partial, tokens, ffn, V=v, M=m, SQUARED_RELU=squared_relu,
            FP64=x.dtype == torch.float64,
        )
    sums = partial.double().sum(0)
    stats = torch.cat([sums, torch.tensor([float(x.numel())], dtype=torch.float64, device=x.device)])
    return values, mask.view(torch.bool), columns, stats
