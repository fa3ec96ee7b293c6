"""The compact layout of a V:N:M activation (M >= 8) and the gather GEMMs on it: torch references.

A [T, F] tensor whose V x M blocks keep 4 columns shared by the block's V rows (`columns`, int16
[ceil(T/V), F/M, 4], ascending; see activation_sparsify) is held as values_c [T, 4F/M]:
values_c[t, 4g + j] = a[t, g*M + columns[t // V, g, j]]. The GEMMs that reduce over F read only
the chosen columns (they skip 1 - 4/M of the work), and the GEMM whose output is the activation's
gradient computes only the chosen columns.

These references are the CPU path and the tests' reference for the Triton kernels; they
materialize the dense operand, so on a GPU they save nothing.
"""

import torch


def global_columns(columns: torch.Tensor, v: int, m: int, tokens: int) -> torch.Tensor:
    """int64 [tokens, 4F/M]: the dense column of every compact column of every row."""
    blocks, groups, _ = columns.shape
    base = torch.arange(groups, device=columns.device, dtype=torch.int64)[:, None] * m
    per_block = (columns.long() + base).reshape(blocks, 4 * groups)
    return per_block.repeat_interleave(v, dim=0)[:tokens]


def compact(dense: torch.Tensor, columns: torch.Tensor, v: int, m: int) -> torch.Tensor:
    """values_c [T, 4F/M] of a dense [T, F] tensor: its chosen columns, row by row."""
    return torch.gather(dense, 1, global_columns(columns, v, m, dense.shape[0]))


def scatter(
    values_c: torch.Tensor, columns: torch.Tensor, v: int, m: int, ffn: int
) -> torch.Tensor:
    """The dense [T, F] tensor of values_c: zero outside the chosen columns."""
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
