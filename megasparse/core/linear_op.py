"""The sparse linear op: one autograd path over a pluggable GEMM backend.

The GEMMs run on a backend (megasparse.core.backends) with this optimizer step's weight state
(megasparse.core.weight_state); layers call `sparse_linear_step`, paths that run their own GEMM on
W*M (TE, grouped experts) call `masked_weight`.
"""

import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from megasparse.core.backends import DenseBackend
from megasparse.core.masks import weight_mask  # noqa: F401  (re-exported: the public mask function)
from megasparse.core.sparse_operand import ACTIVATION, GRAD_OUTPUT, WEIGHT, is_2_4
from megasparse.core.masks import pack_mask
from megasparse.core.weight_state import WeightStep


@dataclass(frozen=True)
class LinearPlan:
    """How one sparse linear call runs: the GEMM backend and the weight-gradient rule.

    Which operand of each GEMM is sparse is decided per call: the weight when the step prunes it,
    else a 2:4-marked activation (forward) or dH (input gradient); see megasparse.core.sparse_operand.
    """

    backend: object = DenseBackend()
    gradient: str = "ste"
    srste_decay: float = 0.0
    transposable: bool = False
    gradient_accumulation_fusion: bool = False
    sparse_weight_roles: tuple = (
        "forward",
        "input_grad",
    )  # where the speed gate lets W*M be sparse


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


def _accumulate_weight_grad(main_grad, dy2d, x2d) -> None:
    """main_grad += dY^T X in fp32, without a full-size fp32 temporary where torch can (CUDA, torch >= 2.8)."""
    if (
        dy2d.is_cuda
        and dy2d.dtype in (torch.float16, torch.bfloat16)
        and main_grad.dtype == torch.float32
    ):
        try:
            torch.addmm(main_grad, dy2d.t(), x2d, out_dtype=torch.float32, out=main_grad)
            return
        except (TypeError, RuntimeError):
            pass
    main_grad.add_(_weight_grad_fp32(dy2d, x2d).to(main_grad.dtype))


STRAIGHT_THROUGH = ("ste", "sste")  # the dense W gets the gradient of its forward weight unchanged


def _decay_factor(mode, step: WeightStep, srste_decay: float) -> float:
    """The per-step decay of `mode`: srste_decay for "srste"; for "masked_decay" the step's
    config's masked_decay_factor (the caller's `srste_decay` when the step has no config)."""
    if mode == "masked_decay" and getattr(step, "sparsity", None) is not None:
        return step.sparsity.masked_decay_factor
    return srste_decay


def gradient_term(mode, grad, weight, step: WeightStep, srste_decay: float):
    """The dense master weight's gradient under `mode`, from the micro-batch gradient of W*M.

    "masked" multiplies by the mask (exact per step: it is linear). "srste" adds its decay
    lambda * (1 - M) * W once per optimizer step (the first backward of the step); so does
    "masked_decay" (Hu et al., ICML 2024; megasparse.core.gradient_rules.masked_decay) with the
    config's masked_decay_factor. "sste" (S-STE, Hu et al., NeurIPS 2024) is straight-through:
    the gradient of the forward weight beta * S(W) goes to W unchanged, like "ste".
    """
    if step is None or not step.pruned or mode in STRAIGHT_THROUGH:
        return grad
    if mode == "masked":
        return grad * step.mask()
    if mode == "srste" and step.take_decay():
        return grad + srste_decay * (~step.mask()) * weight.detach().to(grad.dtype)
    if mode == "masked_decay" and step.take_decay():
        from megasparse.core.gradient_rules import masked_decay

        return masked_decay(weight, step.mask(), grad, _decay_factor(mode, step, srste_decay))
    return grad


def _uses_mvue(step: WeightStep) -> bool:
    """wgrad_sparsity="mvue" while the step prunes the weight (megasparse.core.mvue.mvue_weight_grad)."""
    sparsity = getattr(step, "sparsity", None)
    return (
        step is not None
        and step.pruned
        and sparsity is not None
        and sparsity.wgrad_sparsity == "mvue"
    )


def gradient_went_to_main_grad(weight, dtype):
    """After accumulating into weight.main_grad: what Megatron's own linear returns for the weight
    (a dummy gradient that keeps DDP's hooks on the main thread, flagged as added), or None."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    if getattr(weight, "zero_out_wgrad", False):
        return torch.zeros(weight.main_grad.shape, dtype=dtype, device=weight.device)
    return torch.empty(weight.main_grad.shape, dtype=dtype, device=weight.device)


def _forward_gemm(x, x2d, step: WeightStep, bias, plan):
    backend = plan.backend
    if (
        x2d.shape[0] == 0
    ):  # an expert that received no tokens: no GEMM (sparse kernels refuse empty operands)
        y = x2d.new_zeros(0, step.weight.shape[0])
        return y if bias is None else y + bias
    if step.pruned and "forward" in plan.sparse_weight_roles:
        return backend.linear(x2d, step.compressed(), bias, WEIGHT)
    # a pruned weight here: a role the speed gate runs dense, so W*M is held for the step
    if is_2_4(x) and backend.fits(x2d):  # dense weight, 2:4 activation as the sparse operand
        return backend.linear(x2d, step.dense(hold=True), bias, ACTIVATION)
    return backend.linear(x2d, step.dense(hold=True), bias, None)


def _input_grad_gemm(dy, dy2d, step: WeightStep, plan):
    backend = plan.backend
    if dy2d.shape[0] == 0:
        return dy2d.new_zeros(0, step.weight.shape[1])
    if step.pruned and step.transposable and "input_grad" in plan.sparse_weight_roles:
        # (W*M)^T is 2:4 too and compressed once per step: cheaper than compressing dH per call
        return backend.input_grad(dy2d, step.compressed_t(), WEIGHT)
    # W*M held for the step where the layer holds its backward operand (hold_backward_weight)
    hold = step.hold_backward
    if is_2_4(dy) and backend.fits(dy2d):  # dH of a 2:4 activation (fc1 of a SparseMLP)
        return backend.input_grad(dy2d, step.dense(hold), GRAD_OUTPUT)
    return backend.input_grad(
        dy2d, step.dense(hold), None
    )  # (W*M)^T is not 2:4 along its reduction dim


class _SparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, step: WeightStep, plan: LinearPlan):
        x2d = x.reshape(-1, x.shape[-1])
        y2d = _forward_gemm(x, x2d, step, bias, plan)
        # x and this step's state are saved; the weight's operands live in the step, shared by micro-batches
        ctx.save_for_backward(x, weight)
        ctx.step, ctx.plan = step, plan
        ctx.has_bias = bias is not None
        ctx.main_grad = (
            getattr(weight, "main_grad", None) if plan.gradient_accumulation_fusion else None
        )
        return y2d.reshape(*x.shape[:-1], y2d.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        step, plan = ctx.step, ctx.plan
        dy2d = dy.reshape(-1, dy.shape[-1])
        x2d = x.reshape(-1, x.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad_gemm(dy, dy2d, step, plan).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            # wgrad_sparsity="mvue": dW from the MVUE-pruned dY (a fresh draw per backward)
            mvue = _uses_mvue(step)
            if mvue:
                from megasparse.core.mvue import mvue_weight_grad
            if ctx.main_grad is not None:
                weight.main_grad = ctx.main_grad
                if not mvue and (plan.gradient in STRAIGHT_THROUGH or not step.pruned):
                    _accumulate_weight_grad(ctx.main_grad, dy2d, x2d)
                else:
                    wgrad = (
                        mvue_weight_grad(dy2d, x2d, step.wgrad_generator(), plan.backend)
                        if mvue
                        else _weight_grad_fp32(dy2d, x2d)
                    )
                    grad = gradient_term(plan.gradient, wgrad, weight, step, plan.srste_decay)
                    ctx.main_grad.add_(grad.to(ctx.main_grad.dtype))
                grad_w = gradient_went_to_main_grad(weight, x.dtype)
            else:
                wgrad = (
                    dy2d.t() @ x2d
                    if not mvue
                    else mvue_weight_grad(dy2d, x2d, step.wgrad_generator(), plan.backend).to(
                        dy2d.dtype
                    )
                )
                grad_w = gradient_term(plan.gradient, wgrad, weight, step, plan.srste_decay)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = dy2d.sum(dim=0)
        return grad_x, grad_w, grad_b, None, None


def sparse_linear_step(x, weight, bias, step: WeightStep, plan: LinearPlan) -> torch.Tensor:
    """y = x (M*W)^T + b with this optimizer step's weight state (megasparse.core.weight_state)."""
    return _SparseLinear.apply(x, weight, bias, step, plan)


def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    mask: torch.Tensor,
    plan: LinearPlan,
) -> torch.Tensor:
    """y = x (M*W)^T + b with the backward of `plan`, for one call. x [..., in], weight [out, in], mask bool.

    mask=None runs the dense layer through the same path. Layers use `sparse_linear_step` with
    their per-step state instead, so that the mask and operands are built once per step.
    """
    bits = None if mask is None else pack_mask(mask)
    step = WeightStep(weight, bits, plan.backend, plan.transposable, hold_backward=True)
    return sparse_linear_step(x, weight, bias, step, plan)


class _MaskedWeights(torch.autograd.Function):
    """This step's W*M of one or more weights (stacked: grouped experts), for paths that run their
    own GEMM on it; the backward gives each dense weight the gradient of the gradient mode."""

    @staticmethod
    def forward(ctx, masked, steps, gradient, srste_decay, *weights):
        ctx.steps, ctx.gradient, ctx.srste_decay = steps, gradient, srste_decay
        ctx.save_for_backward(*weights)
        view = masked.view_as(
            masked
        )  # a new view each call: the cached tensor itself stays out of graphs
        ctx.fused = None
        if len(weights) == 1 and getattr(weights[0], "main_grad", None) is not None:
            # Wgrad fusion (Transformer Engine): TE accumulates dY^T X into the main_grad of the tensor
            # it computes with. Under every gradient mode that is the ste gradient of the dense weight.
            view.main_grad = weights[0].main_grad
            if hasattr(weights[0], "grad_added_to_main_grad"):
                view.grad_added_to_main_grad = False
            ctx.fused = weakref.ref(view)
        return view

    @staticmethod
    def backward(ctx, grad):
        weights = ctx.saved_tensors
        view = ctx.fused() if ctx.fused is not None else None
        if view is not None and getattr(view, "grad_added_to_main_grad", False):
            (weight,), (step,) = weights, ctx.steps
            weight.grad_added_to_main_grad = True
            main_grad_term(ctx.gradient, weight, step, ctx.srste_decay)
            return (
                None,
                None,
                None,
                None,
                grad,
            )  # TE's dummy gradient: Megatron's DDP hook skips it
        parts = [grad] if len(weights) == 1 and grad.dim() == weights[0].dim() else grad.unbind(0)
        grads = [
            gradient_term(ctx.gradient, g, w, step, ctx.srste_decay)
            for g, w, step in zip(parts, weights, ctx.steps)
        ]
        return (None, None, None, None, *grads)


def main_grad_term(mode, weight, step: WeightStep, srste_decay: float) -> None:
    """Apply the gradient mode to a main_grad that already holds the accumulated ste gradient.

    "masked" zeroes the pruned entries after each micro-batch (idempotent, so exact per step);
    "srste" and "masked_decay" add their decay once per step; "sste" is straight-through.
    """
    if step is None or not step.pruned or mode in STRAIGHT_THROUGH:
        return
    if mode == "masked":
        weight.main_grad.mul_(step.mask())
    elif mode in ("srste", "masked_decay") and step.take_decay():
        decay = _decay_factor(mode, step, srste_decay)
        weight.main_grad.add_((decay * (~step.mask()) * weight.detach()).to(weight.main_grad.dtype))


def masked_weight(steps, gradient="ste", srste_decay=0.0, stacked=None):
    """W*M of this step for one WeightStep (or a list of them, stacked along a new dim 0; pass the
    stacked tensor cached for the step as `stacked`). The dense weights get `gradient`'s gradient."""
    if isinstance(steps, WeightStep):
        steps, masked = [steps], steps.dense()
    else:
        masked = stacked if stacked is not None else torch.stack([s.dense() for s in steps])
    return _MaskedWeights.apply(masked, steps, gradient, srste_decay, *[s.weight for s in steps])


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient (_grouped_mm's backward needs one)."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_linear(x: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [tokens, in] sorted by group, weights [groups, out, in], offsets int32 cumulative row ends.

    One grouped GEMM (torch._grouped_mm) with PyTorch's own autograd for the input and weight gradients.
    """
    return _ContiguousGrad.apply(
        torch._grouped_mm(x.contiguous(), weights.transpose(1, 2), offs=offsets)
    )
