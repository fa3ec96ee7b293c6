"""FFN activation sparsity: the sparsifying autograd ops, their statistics, and the MLP hook.

Two entry points:
- `SparseRowParallelLinear` (fc2) sparsifies whatever activation it receives (`sparsify`);
- `SparseMLP` replaces Megatron's activation call by `FFNActivationSparsifier`, which fuses
  Squared-ReLU with the sparsifier. Its output is marked with the pattern, so fc2 uses it as it
  is, and so is its gradient dH = dA * mask * 2 relu(H), so fc1's input gradient dX = dH W1 can
  take dH as the sparse operand (megasparse.core.sparse_operand).

NaN/Inf: the sparsifier ranks NaN as +inf with ties to the lower column, the rule of the weight
masks (megasparse.kernels.common), in the torch reference and the Triton kernels alike. The output
is exactly the pattern (a dropped NaN/Inf becomes 0), and every group whose activation holds a
NaN/Inf keeps one, so it reaches the loss as in the dense layer.
"""

from typing import Optional

import torch

from megasparse import kernels
from megasparse.core.sparse_operand import mark_sparse


def _kernel(x2d, pattern, squared_relu):
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


def sparsify(a: torch.Tensor, pattern, stats: Optional[ActivationStats]):
    """(values, mask) of an already-activated tensor [..., ffn]; stats (if given) accumulate."""
    return _Sparsify.apply(a, pattern, stats)


def squared_relu_sparsify(x: torch.Tensor, pattern, stats: ActivationStats):
    """(values, mask) of sparsify(relu(x)^2), fused in one kernel pass."""
    return _SquaredReLUSparsify.apply(x, pattern, stats)


def activate_sparse(activation, x, sparsity, stats: ActivationStats, is_squared_relu=False):
    """activation(x) sparsified to `sparsity.activation_pattern`: Squared-ReLU (is_squared_relu, or
    SparsityConfig(activation_function="squared_relu")) fused with the sparsifier in one pass, any
    other activation computed first."""
    pattern = sparsity.activation_pattern
    if sparsity.activation_function == "squared_relu" or is_squared_relu:
        return squared_relu_sparsify(x, pattern, stats)[0]
    return sparsify(activation(x), pattern, stats)[0]


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
