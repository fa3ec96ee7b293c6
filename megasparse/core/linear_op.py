"""The sparse linear op: one autograd path over a pluggable GEMM backend.

The GEMMs run on a backend (megasparse.core.backends) with this optimizer step's weight state
(megasparse.core.weight_state); layers call `sparse_linear_step`, paths that run their own GEMM on
W*M (TE, grouped experts) call `masked_weight`.

A compact V:N:M activation (M >= 8, megasparse.core.compact_activation) changes the GEMMs that
reduce over the ffn dim, on W*M held as the dense role holds it:
- fc2 (its input carries the compact form): forward y = gather_k_matmul(A_c, columns, (W*M)^T);
  saves A_c and columns instead of the dense input; input gradient dA_c = compact_matmul(dY, W*M,
  columns), returned dense and marked, carrying dA_c; weight gradient dY^T A (A scattered).
- fc1 (its output gradient dH carries the compact form): input gradient dX =
  gather_k_matmul(dH_c, columns, W*M); weight gradient dH^T X.
Both weight gradients are exact, or both-ways (the compact form's `wgrad` pattern:
compact_activation.BothWaysWgrad), and follow the step's gradient rule and main_grad fusion.

A column-parallel layer's input communication runs inside the op when its plan carries it
(`LinearPlan.input_comm`, megasparse.core.input_comm): the op takes the local input, all-gathers it
(sequence parallelism) for the GEMMs and saves only the local shard for the weight gradient, as
Megatron's and TE's linears do; the backward (`input_comm.column_backward`) launches the
all-gather of that shard -> dgrad GEMM -> waits for the gather -> launches the input gradient's
reduction (all-reduce, or reduce-scatter under SP) -> weight-gradient GEMM and main_grad fusion on
the gathered input -> waits, so that the gather overlaps the dgrad GEMM and the reduction the
weight-gradient GEMM.
"""

import itertools
import weakref
from dataclasses import dataclass, replace
from typing import Optional

import torch

from megasparse.core.backends import DenseBackend
from megasparse.core import compact_activation, mvue
from megasparse.core.input_comm import column_backward, regathers
from megasparse.core.gradients import gradient_rule
from megasparse.core.masks import pack_mask
from megasparse.core.sparse_operand import (
    ACTIVATION,
    GRAD_OUTPUT,
    WEIGHT,
    compact_operand,
    is_2_4,
)
from megasparse.core.weight_state import WeightStep


@dataclass(frozen=True)
class LinearPlan:
    """How one sparse linear call runs: the GEMM backend and where W*M may be a sparse operand.

    Which operand of each GEMM is sparse is decided per call: the weight when the step prunes it,
    else a 2:4-marked activation (forward) or dH (input gradient); see megasparse.core.sparse_operand.
    The weight's gradient follows the step's rule (`WeightStep.rule`, megasparse.core.gradients).
    """

    backend: object = DenseBackend()
    transposable: bool = False
    gradient_accumulation_fusion: bool = False
    sparse_weight_roles: tuple = (
        "forward",
        "input_grad",
    )  # where the speed gate lets W*M be sparse
    # a column-parallel layer's input communication run inside the op, overlapped with the weight
    # gradient (megasparse.core.input_comm.ColumnInputComm); None: the input arrives communicated
    input_comm: Optional[object] = None


def gradient_went_to_main_grad(weight, dtype):
    """After accumulating into weight.main_grad: what Megatron's own linear returns for the weight
    (a dummy gradient that keeps DDP's hooks on the main thread, flagged as added), or None."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    if getattr(weight, "zero_out_wgrad", False):
        return torch.zeros(weight.main_grad.shape, dtype=dtype, device=weight.device)
    return torch.empty(weight.main_grad.shape, dtype=dtype, device=weight.device)


def _compact_of(tensor, tensor2d):
    """The compact form `tensor` carries for its [T, ffn] rows, or None."""
    compact = compact_operand(tensor)
    if compact is None or compact.values_c.shape[0] != tensor2d.shape[0]:
        return None
    return compact


def _forward_gemm(x, x2d, step: WeightStep, bias, plan, compact=None):
    backend = plan.backend
    if (
        x2d.shape[0] == 0
    ):  # an expert that received no tokens: no GEMM (sparse kernels refuse empty operands)
        y = x2d.new_zeros(0, step.weight.shape[0])
        return y if bias is None else y + bias
    if compact is not None:  # the activation's chosen columns only, on (W*M)^T held for the step
        y = compact_activation.gather_k_matmul(
            compact.values_c, compact.columns, _transposed_weight(step), compact.pattern
        )
        return y if bias is None else y + bias
    if step.pruned and "forward" in plan.sparse_weight_roles:
        return backend.linear(x2d, step.compressed(), bias, WEIGHT)
    # a pruned weight here: a role the speed gate runs dense, so W*M is held for the step
    if is_2_4(x) and backend.fits(x2d):  # dense weight, 2:4 activation as the sparse operand
        return backend.linear(x2d, step.dense(hold=True), bias, ACTIVATION)
    return backend.linear(x2d, step.dense(hold=True), bias, None)


def _transposed_weight(step: WeightStep) -> torch.Tensor:
    """(W*M)^T [ffn, hidden] contiguous, held for the step (a new step follows any weight update):
    the compact GEMMs gather its rows with vector loads (fc2's forward as it is, fc2's input
    gradient through .t()), where W*M as stored would be gathered 2 bytes at a time."""
    return step.cached("compact_transposed_weight", lambda: step.dense().t().contiguous())


def _input_grad_gemm(dy, dy2d, step: WeightStep, plan, compact=None):
    backend = plan.backend
    if dy2d.shape[0] == 0:
        return dy2d.new_zeros(0, step.weight.shape[1])
    if compact is not None:  # dH held compact (fc1 of a SparseMLP): gather its chosen columns
        # W*M is a dense GEMM operand in every micro-batch here: held for the step
        return compact_activation.gather_k_matmul(
            compact.values_c, compact.columns, step.dense(hold=True), compact.pattern
        )
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


@dataclass
class _SavedForBackward:
    """What the backward of one sparse linear call needs besides its saved tensors."""

    step: WeightStep  # this optimizer step's weight state, shared by the step's micro-batches
    plan: LinearPlan
    has_bias: bool
    main_grad: Optional[torch.Tensor]  # the weight's main_grad under gradient-accumulation fusion
    # fc2: its input's CompactActivation without tensors (those are saved tensors)
    compact_input: Optional[object] = None
    input_shape: tuple = ()  # the GEMM's input (the gathered one under sequence parallelism)


class _SparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, step: WeightStep, plan: LinearPlan):
        x_local = x
        if plan.input_comm is not None:
            x = plan.input_comm.gather(x)  # the total input (SP)
        x2d = x.reshape(-1, x.shape[-1])
        compact = _compact_of(x, x2d)
        if compact is not None and plan.input_comm is not None:
            raise ValueError(
                "megasparse: a compact activation is the input of a row-parallel fc2, but this "
                "call carries a column-parallel input communication (LinearPlan.input_comm); "
                "build fc2's plan with input_comm=None"
            )
        y2d = _forward_gemm(x, x2d, step, bias, plan, compact)
        # the input (compact when it is: A_c and columns, not the dense A) and this step's state are
        # saved; the weight's operands live in the step, shared by micro-batches
        fused = plan.gradient_accumulation_fusion
        main_grad = getattr(weight, "main_grad", None) if fused else None
        ctx.saved = _SavedForBackward(step, plan, bias is not None, main_grad, input_shape=x.shape)
        if compact is None:
            # under SP the local shard: the backward all-gathers it again (TP times less memory)
            ctx.save_for_backward(x_local if regathers(plan.input_comm) else x, weight)
        else:
            ctx.save_for_backward(compact.values_c, compact.columns, weight)
            # the holder without its tensors: they come back from saved_tensors (hooks see them)
            ctx.saved.compact_input = replace(compact, values_c=None, preact_c=None, columns=None)
        return y2d.reshape(*x.shape[:-1], y2d.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        saved: _SavedForBackward = ctx.saved
        if saved.compact_input is not None:
            return _compact_input_backward(ctx, dy)
        x_saved, weight = ctx.saved_tensors
        dy2d = dy.reshape(-1, dy.shape[-1])
        compact = _compact_of(dy, dy2d)  # dH of a compact activation (fc1)

        def input_grad():  # while the saved input shard is all-gathered (SP)
            if not ctx.needs_input_grad[0]:
                return None
            grad_x = _input_grad_gemm(dy, dy2d, saved.step, saved.plan, compact)
            return grad_x.reshape(saved.input_shape)

        def weight_and_bias_grads(x):  # while the input gradient's reduction is in flight
            grad_w = grad_b = None
            if ctx.needs_input_grad[1]:
                wgrad = _both_ways(compact, "grad_output")
                grad_w = _weight_grad(dy2d, x.reshape(-1, x.shape[-1]), weight, saved, wgrad)
            if saved.has_bias and ctx.needs_input_grad[2]:
                grad_b = dy2d.sum(dim=0)
            return grad_w, grad_b

        x_for_wgrad = x_saved if ctx.needs_input_grad[1] else None
        grad_x, (grad_w, grad_b) = column_backward(
            saved.plan.input_comm, x_for_wgrad, input_grad, weight_and_bias_grads
        )
        return grad_x, grad_w, grad_b, None, None


def _compact_input_backward(ctx, dy):
    """fc2's backward on its compact input: dA only at the kept columns, dW from A scattered."""
    values_c, columns, weight = ctx.saved_tensors
    saved: _SavedForBackward = ctx.saved
    compact = replace(saved.compact_input, values_c=values_c, columns=columns)
    dy2d = dy.reshape(-1, dy.shape[-1])
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        step = saved.step
        if dy2d.shape[0] == 0:
            grad_c = values_c.new_zeros(values_c.shape)
        else:
            grad_c = compact_activation.compact_matmul(
                dy2d, _transposed_weight(step).t(), columns, compact.pattern
            )
        grad_x = compact.holding(grad_c.to(dy.dtype)).marked(saved.input_shape)
    if ctx.needs_input_grad[1]:
        x2d = compact.dense()
        grad_w = _weight_grad(dy2d, x2d, weight, saved, _both_ways(compact, "input"))
    if saved.has_bias and ctx.needs_input_grad[2]:
        grad_b = dy2d.sum(dim=0)
    return grad_x, grad_w, grad_b, None, None


def _both_ways(compact, sparse_side: str):
    """The both-ways weight-gradient GEMM the compact form asks for, or None (the step's own)."""
    if compact is None or compact.wgrad is None:
        return None
    return compact_activation.BothWaysWgrad(compact.wgrad, sparse_side)


def _weight_grad(dy2d, x2d, weight, saved: _SavedForBackward, wgrad=None):
    """dW by the step's weight-gradient GEMM (or `wgrad`, which replaces it), then the step's
    gradient rule; under gradient-accumulation fusion added to main_grad (and Megatron's dummy
    gradient returned)."""
    step, backend, main_grad = saved.step, saved.plan.backend, saved.main_grad
    wgrad = step.wgrad if wgrad is None else wgrad
    if main_grad is None:
        return step.rule.dense_gradient(wgrad(dy2d, x2d, step, backend), weight, step)
    take_main_grad(weight, main_grad)
    if wgrad.plain and (step.rule.straight_through or not step.pruned):
        wgrad.accumulate(main_grad, dy2d, x2d)  # dY^T X is the gradient: one fused GEMM
    else:
        grad = step.rule.dense_gradient(wgrad.fp32(dy2d, x2d, step, backend), weight, step)
        main_grad.add_(grad.to(main_grad.dtype))
    return gradient_went_to_main_grad(weight, x2d.dtype)


def take_main_grad(weight, main_grad) -> None:
    """Before this backward's gradient goes into main_grad: give it back to the weight, and clear
    it where the weight asks for its gradient to be written, not added (`overwrite_main_grad`,
    set by Megatron-FSDP, whose buffer is not zeroed per step: TE then runs its wgrad GEMM with
    accumulate=False)."""
    weight.main_grad = main_grad
    if getattr(weight, "overwrite_main_grad", False):
        main_grad.zero_()


def sparse_linear_step(x, weight, bias, step: WeightStep, plan: LinearPlan) -> torch.Tensor:
    """y = x (M*W)^T + b with this optimizer step's weight state (megasparse.core.weight_state)."""
    return _SparseLinear.apply(x, weight, bias, step, plan)


_ONE_CALL_INDEX = itertools.count()  # numbers the one-call op's MVUE seeds


def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    mask: torch.Tensor,
    plan: LinearPlan,
    sparsity=None,
) -> torch.Tensor:
    """y = x (M*W)^T + b for one call. x [..., in], weight [out, in], mask bool.

    sparsity: a SparsityConfig giving the gradient mode and its parameters (gradient, srste_decay,
    masked_decay_factor, wgrad_sparsity); None: "ste". Its mask fields are not read: `mask` is
    the mask. mask=None runs the dense layer through the same path. One call has no step state:
    S-STE's beta is computed from this call's weight, and MVUE draws anew at every call (seeded
    from wgrad_seed and the call's index). Layers use
    `sparse_linear_step` with their per-step state instead, so that the mask and operands are
    built once per step.
    """
    bits = None if mask is None else pack_mask(mask)
    rule = gradient_rule(sparsity)
    beta = rule.scale(weight) if bits is not None and rule.fixed_scale else None
    seed = None
    if sparsity is not None and sparsity.wgrad_sparsity is not None:  # fresh draws every call
        seed = mvue.step_seed(sparsity.wgrad_seed, -1, next(_ONE_CALL_INDEX))
    step = WeightStep(
        weight,
        bits,
        plan.backend,
        plan.transposable,
        hold_backward=True,
        sparsity=sparsity,
        sste_beta=beta,
        wgrad_seed=seed,
    )
    return sparse_linear_step(x, weight, bias, step, plan)


@dataclass
class _MaskedSaved:
    """What the backward of `masked_weight` needs besides the dense weights."""

    steps: list  # each weight's WeightStep: its mask and gradient rule
    fused: Optional[weakref.ref]  # the view TE accumulates dY^T X into main_grad for, if any


class _MaskedWeights(torch.autograd.Function):
    """This step's W*M of one or more weights (stacked: grouped experts), for paths that run their
    own GEMM on it; the backward gives each dense weight the gradient of its step's rule."""

    @staticmethod
    def forward(ctx, masked, steps, *weights):
        ctx.save_for_backward(*weights)
        view = masked.view_as(
            masked
        )  # a new view each call: the cached tensor itself stays out of graphs
        fused = None
        if len(weights) == 1 and getattr(weights[0], "main_grad", None) is not None:
            # Wgrad fusion (Transformer Engine): TE accumulates dY^T X into the main_grad of the tensor
            # it computes with. Under every gradient mode that is the ste gradient of the dense weight.
            view.main_grad = weights[0].main_grad
            if hasattr(weights[0], "grad_added_to_main_grad"):
                view.grad_added_to_main_grad = False
            fused = weakref.ref(view)
        ctx.saved = _MaskedSaved(steps, fused)
        return view

    @staticmethod
    def backward(ctx, grad):
        weights, saved = ctx.saved_tensors, ctx.saved
        view = saved.fused() if saved.fused is not None else None
        if view is not None and getattr(view, "grad_added_to_main_grad", False):
            (weight,), (step,) = weights, saved.steps
            weight.grad_added_to_main_grad = True
            step.rule.main_grad_term(weight, step)
            return None, None, grad  # TE's dummy gradient: Megatron's DDP hook skips it
        parts = [grad] if len(weights) == 1 and grad.dim() == weights[0].dim() else grad.unbind(0)
        grads = [
            step.rule.dense_gradient(g, w, step) for g, w, step in zip(parts, weights, saved.steps)
        ]
        return (None, None, *grads)


def masked_weight(steps, stacked=None):
    """W*M of this step for one WeightStep (or a list of them, stacked along a new dim 0; pass the
    stacked tensor cached for the step as `stacked`). The dense weights get the gradient of their
    step's rule (`WeightStep.rule`)."""
    if isinstance(steps, WeightStep):
        steps, masked = [steps], steps.dense()
    else:
        masked = stacked if stacked is not None else torch.stack([s.dense() for s in steps])
    return _MaskedWeights.apply(masked, steps, *[s.weight for s in steps])
