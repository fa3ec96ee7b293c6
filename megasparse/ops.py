"""The sparse linear op: mask computation and one autograd path over a pluggable GEMM backend.

This is the only module that chooses between kernels (Triton on CUDA, torch references on
CPU) and between GEMM backends. Layers call `weight_mask` and `sparse_linear`.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from megasparse import kernels
from megasparse.backends import DenseBackend

_MASK_KERNELS = {
    "1d": (kernels.mask_1d_triton, kernels.mask_1d_reference),
    "transposable": (kernels.mask_transposable_triton, kernels.mask_transposable_reference),
}


def weight_mask(weight: torch.Tensor, kind: str = "1d", nonfinite: str = "propagate") -> torch.Tensor:
    """The 2:4 mask of `weight` ([out, in]) as a bool tensor of the same shape."""
    if nonfinite == "error":
        bad = int((~torch.isfinite(weight.detach())).sum())
        if bad:
            raise FloatingPointError(
                f"megasparse: the weight {tuple(weight.shape)} holds {bad} NaN/Inf values, so its 2:4 mask "
                "is meaningless. The dense master weight is corrupt: resume from the last good checkpoint "
                "or lower the learning rate (nonfinite_weights='propagate' lets the NaN reach the loss instead)."
            )
    triton_kernel, reference = _MASK_KERNELS[kind]
    if weight.is_cuda and kernels.HAVE_TRITON:
        return triton_kernel(weight)
    return reference(weight)


class GradOutputMask:
    """Filled after the forward with the 2:4 mask that the output gradient will have (see SparseMLP)."""

    mask = None


@dataclass(frozen=True)
class LinearPlan:
    """How one sparse linear call runs: the GEMM backend, which operands are 2:4, the weight-gradient rule."""

    backend: object = DenseBackend()
    gradient: str = "ste"
    srste_decay: float = 0.0
    transposable: bool = False
    gradient_accumulation_fusion: bool = False
    input_2_4: bool = False
    grad_output_mask: Optional[GradOutputMask] = None


def _weight_grad_fp32(dy2d: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
    """dY^T X accumulated in fp32 (what Megatron's fused wgrad writes into main_grad)."""
    if dy2d.dtype == torch.float64:
        return dy2d.t() @ x2d
    if dy2d.is_cuda and dy2d.dtype in (torch.float16, torch.bfloat16):
        try:
            return torch.mm(dy2d.t(), x2d, out_dtype=torch.float32)  # torch >= 2.8
        except TypeError:
            pass
    return torch.mm(dy2d.t().float(), x2d.float())


def _apply_gradient_mode(grad, weight, mask, plan: LinearPlan):
    if mask is None:  # dense call (a dense phase): every mode is the plain gradient
        return grad
    if plan.gradient == "masked":
        return grad * mask
    if plan.gradient == "srste":
        return grad + plan.srste_decay * (~mask) * weight.detach().to(grad.dtype)
    return grad


def _dummy_weight_grad(weight, dtype):
    """What Megatron returns when the gradient went into main_grad (keeps its DDP hooks on the main thread)."""
    if getattr(weight, "zero_out_wgrad", False):
        return torch.zeros(weight.main_grad.shape, dtype=dtype, device=weight.device)
    return torch.empty(weight.main_grad.shape, dtype=dtype, device=weight.device)


class _SparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mask, plan: LinearPlan):
        w_sparse = weight if mask is None else weight * mask
        x2d = x.reshape(-1, x.shape[-1])
        y2d = plan.backend.linear(x2d, w_sparse, bias, plan, mask is not None)
        # W and M are saved (not W*M): they exist anyway, so the backward costs no extra memory.
        ctx.save_for_backward(x, weight, mask)
        ctx.plan = plan
        ctx.has_bias = bias is not None
        ctx.main_grad = getattr(weight, "main_grad", None) if plan.gradient_accumulation_fusion else None
        return y2d.reshape(*x.shape[:-1], y2d.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, weight, mask = ctx.saved_tensors
        plan: LinearPlan = ctx.plan
        dy2d = dy.reshape(-1, dy.shape[-1])
        x2d = x.reshape(-1, x.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w_sparse = weight if mask is None else weight * mask
            dy_2_4 = plan.grad_output_mask is not None and plan.grad_output_mask.mask is not None
            grad_x = plan.backend.input_grad(dy2d, w_sparse, plan, mask is not None, dy_2_4).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            if ctx.main_grad is not None:
                weight.main_grad = ctx.main_grad
                grad = _weight_grad_fp32(dy2d, x2d)
                ctx.main_grad.add_(_apply_gradient_mode(grad, weight, mask, plan).to(ctx.main_grad.dtype))
                if hasattr(weight, "grad_added_to_main_grad"):
                    grad_w = _dummy_weight_grad(weight, x.dtype)
                    weight.grad_added_to_main_grad = True
            else:
                grad_w = _apply_gradient_mode(dy2d.t() @ x2d, weight, mask, plan)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = dy2d.sum(dim=0)
        return grad_x, grad_w, grad_b, None, None


def sparse_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mask: torch.Tensor, plan: LinearPlan
) -> torch.Tensor:
    """y = x (M*W)^T + b with the backward of `plan`. x [..., in], weight [out, in], mask bool like weight.

    mask=None runs the dense layer through the same path (used for the torch wgrad-fusion fallback).
    """
    return _SparseLinear.apply(x, weight, bias, mask, plan)


class _MaskedWeight(torch.autograd.Function):
    """W * M with the weight gradient of a gradient mode (for paths that use a plain dense GEMM on W * M)."""

    @staticmethod
    def forward(ctx, weight, mask, gradient, srste_decay):
        ctx.save_for_backward(weight, mask)
        ctx.plan = LinearPlan(gradient=gradient, srste_decay=srste_decay)
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        weight, mask = ctx.saved_tensors
        return _apply_gradient_mode(grad, weight, mask, ctx.plan), None, None, None


def masked_weight(weight, mask, gradient="ste", srste_decay=0.0):
    """W * M whose backward gives the dense weight the gradient of `gradient` (ste / masked / srste)."""
    return _MaskedWeight.apply(weight, mask, gradient, srste_decay)


class _GroupedLinear(torch.autograd.Function):
    """y[rows of group e] = x[rows of e] W[e]^T for all groups in one grouped GEMM (torch._grouped_mm)."""

    @staticmethod
    def forward(ctx, x, weights, offsets):
        ctx.save_for_backward(x, weights, offsets)
        return torch._grouped_mm(x, weights.transpose(1, 2), offs=offsets)

    @staticmethod
    def backward(ctx, dy):
        x, weights, offsets = ctx.saved_tensors
        dy = dy.contiguous()
        grad_x = torch._grouped_mm(dy, weights, offs=offsets) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:  # dW[e] = dy[e]^T x[e]: tokens are the reduction dim, padded to 16 bytes
            tokens = x.shape[0]
            padded = -(-tokens // (16 // x.element_size())) * (16 // x.element_size())
            dy_t = dy.new_zeros(dy.shape[1], padded)
            dy_t[:, :tokens] = dy.t()
            x_padded = x.new_zeros(padded, x.shape[1])
            x_padded[:tokens] = x
            grad_w = torch._grouped_mm(dy_t, x_padded, offs=offsets)
        return grad_x, grad_w, None


def grouped_linear(x: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [tokens, in] sorted by group, weights [groups, out, in], offsets int32 cumulative row ends."""
    return _GroupedLinear.apply(x.contiguous(), weights, offsets)
