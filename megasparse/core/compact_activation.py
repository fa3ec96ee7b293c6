"""The compact form of a V:N:M FFN activation (M >= 8) and the kernel calls that read or write it.

A [T, F] activation whose V x M blocks keep 4 columns shared by the block's rows is held as
values_c [T, 4F/M] with `columns` int16 [ceil(T/V), F/M, 4] (megasparse.kernels.compact). The FFN's
GEMMs that reduce over F gather the chosen columns (fc2's forward, fc1's input gradient), and fc2's
input gradient computes only them, so each skips 1 - 4/M of its work. Its gradient dA and dH have
the same layout (same columns). Both-ways weight gradients (SparsityConfig.activation_wgrad) apply
the same rule along tokens to the weight-gradient GEMM's activation-side operand S (A for fc2, dH
for fc1): dW2^T = A_sel^T dY, dW1 = dH_sel^T X, where S_sel keeps, per block of V neurons and group
of M tokens, the 4 tokens of largest L2 norm of S over the block (N = 2: then the 2 largest |s| of
each neuron among them) and is 0 elsewhere: a biased top-k approximation of the weight gradient.
"""

from dataclasses import dataclass, replace
from typing import Optional

import torch

from megasparse import kernels
from megasparse.config import ActivationPattern
from megasparse.core.sparse_operand import compact_operand, mark_sparse
from megasparse.core.warn import warn_once


@dataclass(frozen=True)
class CompactActivation:
    """A [T, ffn] V:N:M tensor in the compact layout, carried by its dense-shaped marked tensor.

    selection: identifies the kernel pass that chose `columns`, so a backward knows a gradient laid
    out by its own selection without comparing tensors. wgrad: the both-ways pattern the weight
    gradients next to this activation use (None: exact weight gradients)."""

    values_c: torch.Tensor  # [T, 4 ffn / M]
    preact_c: Optional[torch.Tensor]  # Squared-ReLU's pre-activation at the same positions
    columns: torch.Tensor  # int16 [ceil(T / V), ffn / M, 4]
    pattern: ActivationPattern
    ffn: int
    selection: object
    wgrad: Optional[ActivationPattern] = None

    def dense(self) -> torch.Tensor:
        """The [T, ffn] tensor: values_c scattered, zero elsewhere."""
        return scatter(self.values_c, self.columns, self.pattern, self.ffn)

    def holding(self, values_c: torch.Tensor) -> "CompactActivation":
        """The same selection holding other values (a gradient of this activation)."""
        return replace(self, values_c=values_c, preact_c=None)

    def marked(self, shape) -> torch.Tensor:
        """The dense-shaped tensor (`shape`, last dim ffn) marked with the pattern, carrying self."""
        return mark_sparse(self.dense().reshape(shape), self.pattern, self)


# --- the kernels: Triton on CUDA, the torch reference elsewhere ---------------------------------


def activation_compact(x2d: torch.Tensor, pattern, squared_relu: bool):
    """(values_c, preact_c, columns, stats) of sparsify(relu(x)^2) (or of x): one kernel pass."""
    kernel = kernels.pick(
        kernels.activation_compact_triton, kernels.activation_compact_reference, x2d
    )
    return kernel(x2d, pattern.v, pattern.n, pattern.m, squared_relu)


def compact(dense: torch.Tensor, columns: torch.Tensor, pattern) -> torch.Tensor:
    """values_c of a dense [T, ffn] tensor at the chosen columns."""
    kernel = kernels.pick(kernels.compact_triton, kernels.compact, dense)
    return kernel(dense.contiguous(), columns, pattern.v, pattern.m)


def scatter(values_c: torch.Tensor, columns: torch.Tensor, pattern, ffn: int) -> torch.Tensor:
    """The dense [T, ffn] tensor of values_c."""
    kernel = kernels.pick(kernels.scatter_triton, kernels.scatter, values_c)
    return kernel(values_c, columns, pattern.v, pattern.m, ffn)


def _gemm_on_tiles(triton_kernel, reference, tensor, pattern):
    """The Triton GEMM where its tiles hold the pattern's V rows, else (CUDA) the reference, once
    with a warning: correct, but it computes densely."""
    kernel = kernels.pick(triton_kernel, reference, tensor)
    if kernel is triton_kernel and pattern.v not in kernels.GATHER_MATMUL_V:
        warn_once(
            f"megasparse: activation pattern {pattern.v}:{pattern.n}:{pattern.m} has V={pattern.v}; "
            f"the compact GEMMs tile V in {kernels.GATHER_MATMUL_V}, so these GEMMs run as dense "
            "torch GEMMs (no work skipped). Use V = 64 (e.g. '64:4:16')."
        )
        return reference
    return kernel


def gather_k_matmul(a_c, columns, b, pattern, out_dtype=None) -> torch.Tensor:
    """scatter(a_c) @ b [K, N], reading only the chosen rows of b; out_dtype (e.g. float32 for
    main_grad) keeps the fp32 accumulator instead of rounding to a_c's dtype."""
    kernel = _gemm_on_tiles(
        kernels.gather_k_matmul_triton, kernels.gather_k_matmul_reference, a_c, pattern
    )
    if out_dtype is None or out_dtype == a_c.dtype:
        return kernel(a_c, columns, b, pattern.v, pattern.m)
    if kernel is kernels.gather_k_matmul_triton:
        out = torch.empty(a_c.shape[0], b.shape[1], dtype=out_dtype, device=a_c.device)
        return kernel(a_c, columns, b, pattern.v, pattern.m, out=out)
    return kernel(a_c.to(out_dtype), columns, b.to(out_dtype), pattern.v, pattern.m)


def compact_matmul(g, b, columns, pattern) -> torch.Tensor:
    """compact(g [T, K] @ b [K, ffn]): only the chosen columns of the product."""
    kernel = _gemm_on_tiles(
        kernels.compact_matmul_triton, kernels.compact_matmul_reference, g, pattern
    )
    return kernel(g, b, columns, pattern.v, pattern.m)


def compact_tokens(x: torch.Tensor, pattern):
    """(values_c [F, 4 ceil(T/M)], columns [ceil(F/V), ceil(T/M), 4]): `pattern` applied to x^T."""
    kernel = kernels.pick(kernels.compact_tokens_triton, kernels.compact_tokens_reference, x)
    return kernel(x.contiguous(), pattern.v, pattern.n, pattern.m)


def kept_in_chosen(values: torch.Tensor, columns: torch.Tensor, pattern) -> Optional[torch.Tensor]:
    """bool [T, 4 ffn / M]: which compact positions N = 2 keeps (the 2 largest |a| of the row's 4
    chosen columns: the 2:4 rule on the compact form), None for N = 4 (all kept). `values` is the
    dense [T, ffn] tensor the selection was made on."""
    if pattern.n == 4:
        return None
    chosen = compact(values, columns, pattern)
    kernel = kernels.pick(
        kernels.activation_sparsify_triton, kernels.activation_sparsify_reference, chosen
    )
    return kernel(chosen, pattern.v, 4, False, n=2)[1]


def squared_relu_grad(preact_c: torch.Tensor, grad_c: torch.Tensor) -> torch.Tensor:
    """dH_c = dA_c * 2 relu(H_c), 0 where H_c is 0 (a dropped position holds 0), in grad's dtype;
    computed in float32 (float64 for float64), as the masked path's backward kernel: one pass."""
    kernel = kernels.pick(
        kernels.squared_relu_compact_backward_triton,
        kernels.squared_relu_compact_backward_reference,
        grad_c,
    )
    return kernel(preact_c, grad_c)


def compact_gradient(grad: torch.Tensor, columns, pattern, selection) -> torch.Tensor:
    """values_c of the gradient of an activation chosen by `selection`: the compact form `grad`
    carries when laid out by that selection (fc2's input gradient), else compacted here."""
    carried = compact_operand(grad)
    if carried is not None and carried.selection is selection:
        return carried.values_c
    return compact(grad.reshape(-1, grad.shape[-1]), columns, pattern)


# --- both-ways weight gradients -------------------------------------------------------------------


class BothWaysWgrad:
    """The weight-gradient GEMM with its activation-side operand sparsified along tokens.

    sparse_side "input" (fc2: dW2 = dY^T A) or "grad_output" (fc1: dW1 = dH^T X): that operand S
    [T, K] is selected by `pattern` applied to S^T (compact_tokens) and the GEMM reduces over its
    kept tokens only: S_sel^T O = gather_k_matmul(compact_tokens(S), columns, O). Used in place of
    the step's weight-gradient GEMM (megasparse.core.gradients), so the gradient rule and
    main_grad accumulation stay as they are; it replaces wgrad_sparsity's MVUE GEMM."""

    plain = False  # no single fused accumulate: main_grad += fp32(...)

    def __init__(self, pattern: ActivationPattern, sparse_side: str):
        self.pattern = pattern
        self.sparse_side = sparse_side

    def __call__(self, dy2d, x2d, step=None, backend=None) -> torch.Tensor:
        if self.sparse_side == "input":  # dW^T = A_sel^T dY
            return self._selected_product(x2d, dy2d).t()
        return self._selected_product(dy2d, x2d)

    def fp32(self, dy2d, x2d, step=None, backend=None) -> torch.Tensor:
        """The same in at least float32 (for main_grad): the GEMM keeps its fp32 accumulator."""
        wide = torch.float32 if dy2d.dtype in (torch.float16, torch.bfloat16) else None
        if self.sparse_side == "input":
            return self._selected_product(x2d, dy2d, wide).t()
        return self._selected_product(dy2d, x2d, wide)

    def _selected_product(self, sparse, other, out_dtype=None) -> torch.Tensor:
        values_c, token_columns = compact_tokens(sparse, self.pattern)
        return gather_k_matmul(values_c, token_columns, other, self.pattern, out_dtype)
