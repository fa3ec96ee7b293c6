"""Which operand of a GEMM is 2:4, made explicit: names for the GEMM roles and a 2:4 tensor marker.

A GEMM has at most one sparse operand. The ops module names it when it calls a backend, preferring
the pruned weight (compressed once per optimizer step) over a runtime operand (compressed per call):
    WEIGHT       the pruned weight W*M (forward), or its transpose (input gradient, transposable masks)
    ACTIVATION   a 2:4 FFN activation, the input of fc2
    GRAD_OUTPUT  dH, the gradient of a 2:4 activation, in fc1's input-gradient GEMM dX = dH W1
    None         a dense GEMM

Activations and their gradients are runtime tensors, so they carry the fact themselves: the
sparsifier marks what it produced as `SparseActivation` with its (V, M) pattern (a thin tensor
subclass, in the spirit of xformers' Sparse24Tensor); M == 4 is 2:4, a sparse GEMM operand. The
mark cannot outlive the values it vouches for:
- any torch operation on a marked tensor returns a plain tensor (no subclass propagation), so a
  sum, a rescale or a reshape is no longer marked;
- an in-place change bumps the tensor's version counter, which `sparse_pattern` checks.
So a tensor that is not 2:4 can never reach a sparse GEMM as a sparse operand.
"""

import torch

WEIGHT, ACTIVATION, GRAD_OUTPUT = "weight", "activation", "grad_output"


class SparseActivation(torch.Tensor):
    """Values sparsified along the last dim with a (V, M) pattern, exactly as megasparse produced them."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # results of ops are plain tensors


def mark_sparse(values: torch.Tensor, pattern) -> torch.Tensor:
    """Mark `values`, made by megasparse's sparsifier with `pattern` (V, M), as sparse."""
    marked = values.as_subclass(SparseActivation)
    marked._megasparse_mark = (tuple(pattern), marked._version)
    return marked


def sparse_pattern(tensor):
    """The (V, M) pattern of a marked tensor not changed since it was marked, else None."""
    if not isinstance(tensor, SparseActivation):
        return None
    pattern, version = getattr(tensor, "_megasparse_mark", (None, -1))
    return pattern if tensor._version == version else None


def is_2_4(tensor) -> bool:
    """True only for a marked 2:4 tensor (M == 4) that has not been changed since it was marked."""
    pattern = sparse_pattern(tensor)
    return pattern is not None and pattern[1] == 4
