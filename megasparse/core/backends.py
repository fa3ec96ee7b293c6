"""GEMM backends for 2:4 sparse operands. Each is a small class; `resolve_backend` picks one.

A backend computes two products and is told which operand is sparse (megasparse.core.sparse_operand):
  linear(x, w, bias, sparse)    = x w^T + b   sparse: WEIGHT (w is `compress`ed W*M), ACTIVATION
                                                (x is a 2:4 activation), or None
  input_grad(dy, w, sparse)     = dy w        sparse: WEIGHT (w is the `compress`ed transposed
                                                weight (W*M)^T), GRAD_OUTPUT (dy is 2:4), or None
`compress` turns a 2:4 matrix into the backend's sparse operand once per optimizer step (see
megasparse.core.weight_state); runtime operands (activations, dH) are compressed per call, and only
when `fits` says the sparse kernels accept their shape. `dense` is the exact reference; the CUDA
backends go through PyTorch's semi-structured sparse tensors (cuSPARSELt, CUTLASS), whose shape
constraints we read from PyTorch itself.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from megasparse.core import cusparselt_search
from megasparse.core.sparse_operand import ACTIVATION, GRAD_OUTPUT, WEIGHT
from megasparse.core.warn import warn_once


class DenseBackend:
    """Masked dense GEMM: exact semantics on any device, no speed-up. Its sparse operand is W*M itself."""

    name = "dense"

    def compress(self, matrix):
        return matrix

    def fits(self, operand) -> bool:
        return True

    def linear(self, x2d, w, bias, sparse):
        return F.linear(x2d, w, bias)

    def input_grad(self, dy2d, w, sparse):
        if sparse == WEIGHT:  # w is the transposed weight [in, out]
            return F.linear(dy2d, w)
        return dy2d @ w


def binding_layout(dense: torch.Tensor) -> torch.Tensor:
    """`dense` as a layout PyTorch's sparse kernels read right: itself when it or its transpose is
    contiguous, else a contiguous copy.

    torch's cuSPARSELt binding (cuSPARSELtOps.cpp) describes its dense operand from
    `is_contiguous()` alone: row-major, else the transpose of a row-major matrix. Any other layout,
    such as the expanded dY of `.sum().backward()` or a column slice of x, would be read with the
    wrong leading dimension. Both layouts it describes are kept as they are: no copy.
    """
    if dense.is_contiguous() or dense.t().is_contiguous():
        return dense
    return dense.contiguous()


class _SemiStructuredBackend:
    """Sparse tensor cores through one of PyTorch's SparseSemiStructuredTensor classes. Every dense
    operand goes through `binding_layout` first."""

    name = ""
    min_capability = (8, 0)
    dtypes = (torch.float16, torch.bfloat16)

    @staticmethod
    def tensor_class():
        raise NotImplementedError

    def compress(self, matrix):
        return self.tensor_class().from_dense(matrix.contiguous())

    def linear(self, x2d, w, bias, sparse):
        if sparse == ACTIVATION:  # x is 2:4 along its reduction dim
            y = torch.mm(self.compress(x2d), binding_layout(w.t()))
            return y if bias is None else y + bias
        if sparse == WEIGHT:  # w is a compressed operand
            return F.linear(binding_layout(x2d), w, bias)
        return F.linear(x2d, w, bias)

    def input_grad(self, dy2d, w, sparse):
        if sparse == GRAD_OUTPUT:  # dH of a 2:4 activation is 2:4 along the reduction dim
            return torch.mm(self.compress(dy2d), binding_layout(w))
        if sparse == WEIGHT:  # w is the compressed (W*M)^T [in, out]
            return F.linear(binding_layout(dy2d), w)
        return dy2d @ w

    def fits(self, operand) -> bool:
        """Whether a runtime operand (activation or its gradient) meets the sparse-operand shape rules."""
        if operand.dtype not in self.dtypes or operand.shape[0] == 0:  # an expert with no tokens
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
        return self.build_reason(device)

    def build_reason(self, device) -> Optional[str]:
        """Why this backend's kernels are missing on this (CUDA, sm80+) device, or None."""
        return None


class CusparseltBackend(_SemiStructuredBackend):
    """cuSPARSELt through torch's SparseSemiStructuredTensorCUSPARSELT. With
    MEGASPARSE_CUSPARSELT_SEARCH=1 a compressed weight's GEMM runs the algorithm chosen for its
    (role, token bucket, dtype, shard shape) (megasparse.core.cusparselt_search), passed per call
    on the weight's packed tensor: the per-step compressed weight is never rebuilt for it."""

    name = "cusparselt"

    @staticmethod
    def tensor_class():
        return torch.sparse.SparseSemiStructuredTensorCUSPARSELT

    def prepare_algorithms(self, roles, bucket, masked, group=None) -> None:
        """The speed gate's hook, once per decision: search the algorithm of each sparse role."""
        cusparselt_search.prepare_weight_roles(roles, bucket, masked, group)

    def linear(self, x2d, w, bias, sparse):
        if sparse == WEIGHT:
            found = cusparselt_search.searcher().lookup(
                "forward", x2d.shape[0], w.dtype, w.shape, x2d.device
            )
            if found != cusparselt_search.DEFAULT and w.packed is not None:
                return self.weight_mm(w, binding_layout(x2d), bias, found)
        return super().linear(x2d, w, bias, sparse)

    def input_grad(self, dy2d, w, sparse):
        if sparse == WEIGHT:
            found = cusparselt_search.searcher().lookup(
                "input_grad", dy2d.shape[0], w.dtype, w.shape, dy2d.device
            )
            if found != cusparselt_search.DEFAULT and w.packed is not None:
                return self.weight_mm(w, binding_layout(dy2d), None, found)
        return super().input_grad(dy2d, w, sparse)

    def weight_mm(self, w, dense, bias, algorithm):
        """dense [tokens, k] @ w^T (+ bias) for a compressed w [n, k], with `algorithm`: the call
        torch's `F.linear` on the compressed weight makes (torch/sparse/semi_structured.py,
        cusparselt_mm: rows padded to the dtype's multiple, the dense operand transposed, the
        result transposed by cuSPARSELt), with the algorithm arguments added."""
        constraint = w._DTYPE_SHAPE_CONSTRAINTS[dense.dtype]
        tokens, k = dense.shape
        pad_rows, pad_cols = (-tokens) % constraint.dense_min_rows, (-k) % constraint.dense_min_cols
        if pad_rows or pad_cols:
            dense = F.pad(dense, (0, pad_cols, 0, pad_rows))
        y = cusparselt_search.sparse_mm(
            w.packed, dense.t(), algorithm, bias=bias, transpose_result=True
        )
        return y if not pad_rows else y.narrow(0, 0, tokens).contiguous()

    def build_reason(self, device):
        if not torch.backends.cusparselt.is_available():
            return "this PyTorch build has no cuSPARSELt (torch.backends.cusparselt.is_available() is False)"
        return None


class CutlassBackend(_SemiStructuredBackend):
    """PyTorch's CUTLASS 2:4 kernels. Not fp32: CUTLASS's fp32 sparsity is 1:2, which would drop
    kept values of a 2:4 weight. Not sm90+: PyTorch builds these kernels for sm8x only."""

    name = "cutlass"

    @staticmethod
    def tensor_class():
        return torch.sparse.SparseSemiStructuredTensorCUTLASS

    def build_reason(self, device):
        major, minor = torch.cuda.get_device_capability(device)
        if major != 8:
            return (
                f"cutlass's 2:4 kernels in PyTorch are built for sm8x only, found sm{major}{minor}"
            )
        return None


BACKENDS = {b.name: b for b in (DenseBackend(), CusparseltBackend(), CutlassBackend())}
AUTO_ORDER = ("cusparselt", "cutlass")


def check_backend_static(name: str, shape, dtype, transposable: bool) -> None:
    """Construction-time check of an explicitly chosen GPU backend: a clear error naming the fix."""
    if name in ("auto", "dense"):
        return
    reason = BACKENDS[name].static_reason(tuple(shape), dtype, transposable)
    if reason:
        raise ValueError(
            f"megasparse: backend={name!r} cannot run this layer: {reason}. "
            "Change the layer size or dtype, or use backend='auto' (falls back to dense)."
        )


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
        raise RuntimeError(
            f"megasparse: backend={name!r} cannot run here: {reasons[0]}. "
            "Use backend='auto' to fall back to the dense masked GEMM."
        )
    warn_once(
        "megasparse: backend='auto' uses the dense masked GEMM (exact, no speed-up) because "
        + "; ".join(reasons)
    )
    return BACKENDS["dense"]
