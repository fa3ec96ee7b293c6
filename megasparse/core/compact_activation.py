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


def _activation_compact_composed(x, v, n, m, squared_relu):
    """activation_compact from the masked sparsifier's reference and `compact`."""
    values, mask, columns, stats = kernels.activation_sparsify_reference(x, v, m, squared_relu, n=n)
    preact = torch.where(mask, x, 0)
    return (
        kernels.compact(values, columns, v, m),
        kernels.compact(preact, columns, v, m),
        columns,
        stats,
    )


def _compact_tokens_composed(x, v, n, m):
    """compact_tokens from the masked sparsifier on x^T; tokens past T are zero columns, which a real
    token never loses to (ties go to the lower index)."""
    tokens = x.shape[0]
    padded = torch.nn.functional.pad(x.t(), (0, (-tokens) % m))
    values, _, columns, _ = kernels.activation_sparsify_reference(padded, v, m, False, n=n)
    return kernels.compact(values, columns, v, m), columns


def _kernel(triton_name, reference_name, fallback, tensor):
    """kernels.pick of the named kernels; a name megasparse.kernels lacks runs the reference, and a
    missing reference the torch composition `fallback`."""
    reference = getattr(kernels, reference_name, None) or fallback
    return kernels.pick(getattr(kernels, triton_name, None) or reference, reference, tensor)


def activation_compact(x2d: torch.Tensor, pattern, squared_relu: bool):
    """(values_c, preact_c, columns, stats) of sparsify(relu(x)^2) (or of x): one kernel pass."""
    kernel = _kernel(
        "activation_compact_triton",
        "activation_compact_reference",
        _activation_compact_composed,
        x2d,
    )
    return kernel(x2d, pattern.v, pattern.n, pattern.m, squared_relu)


def compact(dense: torch.Tensor, columns: torch.Tensor, pattern) -> torch.Tensor:
    """values_c of a dense [T, ffn] tensor at the chosen columns."""
    kernel = _kernel("compact_triton", "compact", kernels.compact, dense)
    return kernel(dense.contiguous(), columns, pattern.v, pattern.m)


def scatter(values_c: torch.Tensor, columns: torch.Tensor, pattern, ffn: int) -> torch.Tensor:
    """The dense [T, ffn] tensor of values_c."""
    kernel = _kernel("scatter_triton", "scatter", kernels.scatter, values_c)
    return kernel(values_c, columns, pattern.v, pattern.m, ffn)


def gather_k_matmul(a_c, columns, b, pattern) -> torch.Tensor:
    """scatter(a_c) @ b [K, N], reading only the chosen rows of b."""
    kernel = _kernel(
        "gather_k_matmul_triton",
        "gather_k_matmul_reference",
        kernels.gather_k_matmul_reference,
        a_c,
    )
    return kernel(a_c, columns, b, pattern.v, pattern.m)


def compact_matmul(g, b, columns, pattern) -> torch.Tensor:
    """compact(g [T, K] @ b [K, ffn]): only the chosen columns of the product."""
    kernel = _kernel(
        "compact_matmul_triton", "compact_matmul_reference", kernels.compact_matmul_reference, g
    )
    return kernel(g, b, columns, pattern.v, pattern.m)


def compact_tokens(x: torch.Tensor, pattern):
    """(values_c [F, 4 ceil(T/M)], columns [ceil(F/V), ceil(T/M), 4]): `pattern` applied to x^T."""
    kernel = _kernel(
        "compact_tokens_triton", "compact_tokens_reference", _compact_tokens_composed, x
    )
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
    computed in float32 (float64 for float64), as the masked path's backward kernel."""
    dtype = torch.float64 if torch.float64 in (preact_c.dtype, grad_c.dtype) else torch.float32
    preact = preact_c.to(dtype)
    dh = 2 * torch.relu(preact) * grad_c.to(dtype)
    return torch.where(preact != 0, dh, 0).to(grad_c.dtype)


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
        if dy2d.dtype in (torch.float16, torch.bfloat16):
            dy2d, x2d = dy2d.float(), x2d.float()
        return self(dy2d, x2d)

    def _selected_product(self, sparse, other) -> torch.Tensor:
        values_c, token_columns = compact_tokens(sparse, self.pattern)
        return gather_k_matmul(values_c, token_columns, other, self.pattern)
