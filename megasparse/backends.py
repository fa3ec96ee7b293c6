"""GEMM backends for a 2:4-masked weight. Each is a small class; `resolve_backend` picks one.

Every backend computes the same two products on an already-masked weight Ws = W * M:
  linear(x, Ws, b, plan, w_24)            = x Ws^T + b   (forward)
  input_grad(dy, Ws, plan, w_24, dy_24)   = dy Ws        (backward)
Which operand is 2:4: the weight (`w_24`, and its transpose when `plan.transposable`), the
input (`plan.input_2_4`, a 2:4 FFN activation), or dy (`dy_24`, the gradient of a 2:4
activation). At most one operand of a GEMM can be sparse: the weight is
preferred in the forward, dy in the input gradient. `dense` is the exact reference; the CUDA
backends go through PyTorch's semi-structured sparse tensors (cuSPARSELt, CUTLASS), whose shape
constraints we read from PyTorch itself.
"""

import warnings
from typing import Optional

import torch
import torch.nn.functional as F


class DenseBackend:
    """Masked dense GEMM: exact semantics on any device, no speed-up."""

    name = "dense"

    def linear(self, x2d, w_sparse, bias, plan, w_2_4):
        return F.linear(x2d, w_sparse, bias)

    def input_grad(self, dy2d, w_sparse, plan, w_2_4, dy_2_4):
        return dy2d @ w_sparse


class _SemiStructuredBackend:
    """Sparse tensor cores through one of PyTorch's SparseSemiStructuredTensor classes."""

    name = ""
    min_capability = (8, 0)
    dtypes = (torch.float16, torch.bfloat16)

    @staticmethod
    def tensor_class():
        raise NotImplementedError

    def linear(self, x2d, w_sparse, bias, plan, w_2_4):
        if w_2_4:
            return F.linear(x2d, self.tensor_class().from_dense(w_sparse), bias)
        if plan.input_2_4 and self._fits(x2d):  # 2:4 activation as the sparse operand
            y = torch.mm(self.tensor_class().from_dense(x2d), w_sparse.t())
            return y if bias is None else y + bias
        return F.linear(x2d, w_sparse, bias)

    def input_grad(self, dy2d, w_sparse, plan, w_2_4, dy_2_4):
        if dy_2_4 and self._fits(dy2d):  # dH of a 2:4 activation is 2:4 along the reduction dim
            return torch.mm(self.tensor_class().from_dense(dy2d.contiguous()), w_sparse)
        if w_2_4 and plan.transposable:  # Ws^T is 2:4 too
            return F.linear(dy2d, self.tensor_class().from_dense(w_sparse.t().contiguous()))
        return dy2d @ w_sparse  # Ws^T is not 2:4 along its reduction dim: dense GEMM

    def _fits(self, operand) -> bool:
        """Whether a runtime operand (activation or its gradient) meets the sparse-operand shape rules."""
        if operand.dtype not in self.dtypes:
            return False
        rows_multiple, cols_multiple = self.shape_multiple(operand.dtype)
        return operand.shape[0] % rows_multiple == 0 and operand.shape[1] % cols_multiple == 0

    def shape_multiple(self, dtype):
        """(rows, cols) a sparse operand must be a multiple of, from PyTorch's own table."""
        constraint = self.tensor_class()._DTYPE_SHAPE_CONSTRAINTS[dtype]
        return constraint.sparse_min_rows, constraint.sparse_min_cols

    def static_reason(self, shape, dtype, transposable) -> Optional[str]:
        """Why this backend cannot run a weight of this shape and dtype, or None."""
        if dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"{self.name} supports {names} weights, not {str(dtype).replace('torch.', '')}"
        rows_multiple, cols_multiple = self.shape_multiple(dtype)
        operands = [("weight [out, in]", shape)]
        if transposable:
            operands.append(("transposed weight [in, out]", (shape[1], shape[0])))
        for what, (rows, cols) in operands:
            if rows % rows_multiple or cols % cols_multiple:
                return (
                    f"{self.name} needs the {what} per tensor-parallel rank to be a multiple of "
                    f"({rows_multiple}, {cols_multiple}) for {str(dtype).replace('torch.', '')}, got {(rows, cols)}"
                )
        return None

    def device_reason(self, device) -> Optional[str]:
        if device.type != "cuda":
            return f"{self.name} needs a CUDA tensor, the weight is on {device.type}"
        capability = torch.cuda.get_device_capability(device)
        if capability < self.min_capability:
            return f"{self.name} needs compute capability sm80+, found sm{capability[0]}{capability[1]}"
        return None


class CusparseltBackend(_SemiStructuredBackend):
    name = "cusparselt"

    @staticmethod
    def tensor_class():
        return torch.sparse.SparseSemiStructuredTensorCUSPARSELT

    def device_reason(self, device):
        reason = super().device_reason(device)
        if reason is None and not torch.backends.cusparselt.is_available():
            reason = "this PyTorch build has no cuSPARSELt (torch.backends.cusparselt.is_available() is False)"
        return reason


class CutlassBackend(_SemiStructuredBackend):
    name = "cutlass"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    @staticmethod
    def tensor_class():
        return torch.sparse.SparseSemiStructuredTensorCUTLASS


BACKENDS = {b.name: b for b in (DenseBackend(), CusparseltBackend(), CutlassBackend())}
AUTO_ORDER = ("cusparselt", "cutlass")

_warned = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def check_backend_static(name: str, shape, dtype, transposable: bool) -> None:
    """Construction-time check of an explicitly chosen GPU backend: a clear error naming the fix."""
    if name in ("auto", "dense"):
        return
    reason = BACKENDS[name].static_reason(tuple(shape), dtype, transposable)
    if reason:
        raise ValueError(f"megasparse: backend={name!r} cannot run this layer: {reason}. "
                         "Change the layer size or dtype, or use backend='auto' (falls back to dense).")


def resolve_backend(name: str, weight: torch.Tensor, transposable: bool):
    """The backend object for this weight: explicit names must work; 'auto' falls back to dense."""
    if name == "dense":
        return BACKENDS["dense"]
    candidates = AUTO_ORDER if name == "auto" else (name,)
    reasons = []
    for candidate in candidates:
        backend = BACKENDS[candidate]
        reason = backend.device_reason(weight.device) or backend.static_reason(
            tuple(weight.shape), weight.dtype, transposable
        )
        if reason is None:
            return backend
        reasons.append(reason)
    if name != "auto":
        raise RuntimeError(f"megasparse: backend={name!r} cannot run here: {reasons[0]}. "
                           "Use backend='auto' to fall back to the dense masked GEMM.")
    _warn_once("megasparse: backend='auto' uses the dense masked GEMM (exact, no speed-up) because "
               + "; ".join(reasons))
    return BACKENDS["dense"]
