"""FFN activation sparsity: the sparsifying autograd ops, their statistics, and the MLP hook.

Two entry points:
- `SparseRowParallelLinear` (fc2) sparsifies whatever activation it receives (`sparsify`);
- `SparseMLP` replaces Megatron's activation call by `FFNActivationSparsifier`, which fuses
  Squared-ReLU with the sparsifier. Its output is marked with the pattern, so fc2 uses it as it
  is, and so is its gradient dH = dA * mask * 2 relu(H), so fc1's input gradient dX = dH W1 can
  take dH as the sparse operand (megasparse.core.sparse_operand).

2:4 (M = 4) saves x and the dense mask for the backward. M >= 8 compacts: one kernel pass gives the
compact form (megasparse.core.compact_activation), carried by the dense-shaped marked output, and
the backward saves only compact tensors:
- Squared-ReLU: preact_c and columns; dH_c = dA_c * 2 relu(preact_c), returned dense and marked,
  carrying dH_c for fc1's input gradient.
- any other activation (`sparsify(activation(x))`): columns (and for N = 2 a compact bool of
  the kept positions); the gradient is dA scattered (0 where dropped). The activation's own
  autograd keeps what its chain rule needs (torch saves x dense for GeLU & co.), and the
  resulting dH is a plain tensor, so fc1 runs its dense input gradient on it: the masked path's
  math for that GEMM.

NaN/Inf: the sparsifier ranks NaN as +inf with ties to the lower column, the rule of the weight
masks (megasparse.kernels.common), in the torch reference and the Triton kernels alike. The output
is exactly the pattern (a dropped NaN/Inf becomes 0), and every group whose activation holds a
NaN/Inf keeps one, so it reaches the loss as in the dense layer.
"""

from typing import Optional

import torch

from megasparse import kernels
from megasparse.config import ActivationPattern
from megasparse.core import compact_activation
from megasparse.core.compact_activation import CompactActivation
from megasparse.core.sparse_operand import mark_sparse


def _kernel(x2d, pattern, squared_relu):
    """The sparsifier's one kernel pass: (values, mask, columns, stats) for 2:4, and the compact
    form (values_c, preact_c, columns, stats) for a compacting pattern (M >= 8)."""
    if pattern.compacts:
        return compact_activation.activation_compact(x2d, pattern, squared_relu)
    kernel = kernels.pick(
        kernels.activation_sparsify_triton, kernels.activation_sparsify_reference, x2d
    )
    return kernel(x2d, pattern.v, pattern.m, squared_relu, n=pattern.n)


def _backward_kernel(x, mask, grad):
    """dx = where(mask, 2 relu(x) grad, 0): one fused pass on CUDA."""
    kernel = kernels.pick(
        kernels.squared_relu_sparsify_backward_triton,
        kernels.squared_relu_sparsify_backward_reference,
        x,
    )
    return kernel(x, mask, grad.contiguous())  # the Triton kernel reads grad flat


class ActivationStats:
    """Sums since the last `reset()`, kept on the device (reading them syncs; updating does not)."""

    def __init__(self):
        self.sums = None  # float64 [zeros, sum|a|, dropped sum|a|, numel]

    def add(self, stats: torch.Tensor) -> None:
        self.sums = stats.detach().clone() if self.sums is None else self.sums + stats.detach()

    def reset(self) -> None:
        self.sums = None

    def as_dict(self) -> dict:
        """zero_fraction: exact zeros in the activation; dropped_l1_fraction: share of sum|a| pruned."""
        if self.sums is None:
            return {
                "zero_fraction": float("nan"),
                "dropped_l1_fraction": float("nan"),
                "elements": 0,
            }
        zeros, total, dropped, numel = self.sums.tolist()
        return {
            "zero_fraction": zeros / max(numel, 1.0),
            "dropped_l1_fraction": dropped / total if total else 0.0,
            "elements": int(numel),
        }


class _Sparsify(torch.autograd.Function):
    """values = a * mask; the gradient is masked the same way."""

    @staticmethod
    def forward(ctx, a, pattern, stats):
        values, mask, _, step_stats = _kernel(
            a.reshape(-1, a.shape[-1]), pattern, squared_relu=False
        )
        if stats is not None:
            stats.add(step_stats)
        ctx.save_for_backward(mask)
        ctx.mark_non_differentiable(mask)
        return mark_sparse(values.reshape(a.shape), pattern), mask.reshape(a.shape)

    @staticmethod
    def backward(ctx, grad_values, _grad_mask):
        (mask,) = ctx.saved_tensors
        return torch.where(mask.reshape(grad_values.shape), grad_values, 0), None, None


class _SquaredReLUSparsify(torch.autograd.Function):
    """values = sparsify(relu(x)^2); dx = dvalues * mask * 2 relu(x), so dx has the mask's sparsity."""

    @staticmethod
    def forward(ctx, x, pattern, stats):
        values, mask, _, step_stats = _kernel(
            x.reshape(-1, x.shape[-1]), pattern, squared_relu=True
        )
        stats.add(step_stats)
        ctx.save_for_backward(x, mask)
        ctx.mark_non_differentiable(mask)
        ctx.pattern = pattern
        return mark_sparse(values.reshape(x.shape), pattern), mask.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad_values, _grad_mask):
        x, mask = ctx.saved_tensors
        mask = mask.reshape(x.shape)
        grad_x = _backward_kernel(x, mask, grad_values)
        return mark_sparse(grad_x, ctx.pattern), None, None  # dH has the activation's pattern


class _CompactSparsify(torch.autograd.Function):
    """values = a kept by a compacting pattern, marked and carrying its compact form; the gradient
    is dA at the kept positions, scattered. Saves `columns`, and for N = 2 which of the chosen
    positions each row keeps (bool, compact): a kept value may be 0, so the values cannot say."""

    @staticmethod
    def forward(ctx, a, pattern, stats, wgrad):
        a2d = a.reshape(-1, a.shape[-1])
        values_c, _, columns, step_stats = _kernel(a2d, pattern, squared_relu=False)
        if stats is not None:
            stats.add(step_stats)
        selection = object()
        ctx.save_for_backward(columns, compact_activation.kept_in_chosen(a2d, columns, pattern))
        ctx.pattern, ctx.selection = pattern, selection
        compact = CompactActivation(values_c, None, columns, pattern, a.shape[-1], selection, wgrad)
        return compact.marked(a.shape)

    @staticmethod
    def backward(ctx, grad_values):
        columns, kept_c = ctx.saved_tensors
        ffn = grad_values.shape[-1]
        grad_c = compact_activation.compact_gradient(
            grad_values, columns, ctx.pattern, ctx.selection
        )
        if kept_c is not None:
            grad_c = torch.where(kept_c, grad_c, 0)
        grad_a = compact_activation.scatter(grad_c, columns, ctx.pattern, ffn)
        return grad_a.reshape(grad_values.shape), None, None, None


class _SquaredReLUCompact(torch.autograd.Function):
    """values = sparsify(relu(x)^2) for a compacting pattern; saves preact_c and columns only.
    dH_c = dA_c * 2 relu(preact_c); dH is returned dense, marked and carrying dH_c."""

    @staticmethod
    def forward(ctx, x, pattern, stats, wgrad):
        values_c, preact_c, columns, step_stats = _kernel(
            x.reshape(-1, x.shape[-1]), pattern, squared_relu=True
        )
        stats.add(step_stats)
        selection = object()
        ctx.save_for_backward(preact_c, columns)
        ctx.pattern, ctx.shape, ctx.wgrad, ctx.selection = pattern, x.shape, wgrad, selection
        compact = CompactActivation(
            values_c, preact_c, columns, pattern, x.shape[-1], selection, wgrad
        )
        return compact.marked(x.shape)

    @staticmethod
    def backward(ctx, grad_values):
        preact_c, columns = ctx.saved_tensors
        pattern = ctx.pattern
        grad_c = compact_activation.compact_gradient(grad_values, columns, pattern, ctx.selection)
        dh_c = compact_activation.squared_relu_grad(preact_c, grad_c)
        dh = CompactActivation(
            dh_c, None, columns, pattern, ctx.shape[-1], ctx.selection, ctx.wgrad
        )
        return dh.marked(ctx.shape), None, None, None


def sparsify(a: torch.Tensor, pattern, stats: Optional[ActivationStats], wgrad=None):
    """(values, mask) of an already-activated tensor [..., ffn]; stats (if given) accumulate.
    A compacting pattern (M >= 8) returns mask None: the values carry their compact form.
    wgrad: the both-ways pattern of the neighbouring weight gradients (SparsityConfig.activation_wgrad)."""
    pattern = ActivationPattern(*pattern)
    if pattern.compacts:
        return _CompactSparsify.apply(a, pattern, stats, wgrad), None
    return _Sparsify.apply(a, pattern, stats)


def squared_relu_sparsify(x: torch.Tensor, pattern, stats: ActivationStats, wgrad=None):
    """(values, mask) of sparsify(relu(x)^2), fused in one kernel pass (mask None: compact, as in
    `sparsify`)."""
    pattern = ActivationPattern(*pattern)
    if pattern.compacts:
        return _SquaredReLUCompact.apply(x, pattern, stats, wgrad), None
    return _SquaredReLUSparsify.apply(x, pattern, stats)


def activate_sparse(activation, x, sparsity, stats: ActivationStats, is_squared_relu=False):
    """activation(x) sparsified to `sparsity.activation_pattern`: Squared-ReLU (is_squared_relu, or
    SparsityConfig(activation_function="squared_relu")) fused with the sparsifier in one pass, any
    other activation computed first."""
    pattern, wgrad = sparsity.activation_pattern, sparsity.activation_wgrad_pattern
    if sparsity.activation_function == "squared_relu" or is_squared_relu:
        return squared_relu_sparsify(x, pattern, stats, wgrad)[0]
    return sparsify(activation(x), pattern, stats, wgrad)[0]


class FFNActivationSparsifier:
    """The activation function `SparseMLP` installs: activation + sparsify with fc2's current config.

    is_squared_relu: `activation` is Squared-ReLU (the caller knows its framework's function), so
    it runs fused with the sparsifier; so does any activation under
    SparsityConfig(activation_function="squared_relu")."""

    def __init__(self, activation, fc2, is_squared_relu: bool = False):
        self.activation = activation
        self.fc2 = fc2
        self.is_squared_relu = is_squared_relu

    def __call__(self, x):
        sparsity = self.fc2.sparsity
        if not sparsity.sparsifies_activations:
            return self.activation(x)
        counter = self.fc2.activation_counter
        return activate_sparse(self.activation, x, sparsity, counter, self.is_squared_relu)
