"""The bf16/fp16 2:4 route of sparse Transformer Engine linears: core's sparse linear op in place of
TE's dense GEMM on W*M (megasparse.te.forward calls it when TE's fp8_autocast is off and the layer
is sparse now).

Numerics are TE's: the input, W*M and the bias in TE's activation dtype (the autocast dtype, else
the input's), the output in it, fp32 accumulation in the GEMMs. The forward GEMM and, with
transposable masks, the input-gradient GEMM run on the backend's compressed W*M and (W*M)^T, built
once per optimizer step and shared by its micro-batches (megasparse.core.weight_state); with 1d
masks the input gradient is dY (W*M) on W*M as the step holds it (hold_backward_weight). The speed
gate picks the roles that run sparse (per shard shape, dtype and token bucket; each GroupedLinear
expert by its own token count). TE's wgrad fusion: with `fuse_wgrad_accumulation` dY^T X is added
to weight.main_grad and the weight reports `grad_added_to_main_grad` with TE's dummy gradient
(core.linear_op.gradient_went_to_main_grad).
"""

import copy
import types

from megasparse.core.linear_op import LinearPlan, sparse_linear_step
from megasparse.core.weight_state import WeightStep
from megasparse.te.userbuffers import userbuffers_overlap


def sparse_route_reason(module):
    """Why this sparse TE layer keeps TE's own forward (its dense GEMM on W*M), or None."""
    flags = userbuffers_overlap(module)
    if flags:
        return (
            f"TE's userbuffers overlap ({', '.join(flags)}; Megatron's --tp-comm-overlap) runs the "
            "tensor-parallel communication inside TE's own GEMM, which cannot take a 2:4 operand. "
            "To run the 2:4 GEMMs on sparse tensor cores, drop --tp-comm-overlap "
            "(TransformerConfig.tp_comm_overlap=False)"
        )
    return None


def _backend(module, dtype):
    """The GEMM backend for the layer's weights as TE computes with them: cast to `dtype`."""
    weight = getattr(module, module._sparse_weight_names()[0])
    if weight.dtype != dtype:  # the cast weight as backend_for reads it: device, dtype, shape
        weight = types.SimpleNamespace(device=weight.device, dtype=dtype, shape=weight.shape)
    return module.backend_for(weight)


def route_steps(module, dtype) -> list:
    """This optimizer step's WeightStep of each of the layer's weights for GEMMs in `dtype`."""
    return module.weight_steps(_backend(module, dtype))


class _ActivationDtypeStep(WeightStep):
    """A step's view in TE's activation dtype (TE casts the weight to it, e.g. fp32 parameters under
    torch.autocast): W*M cast once per step, its compressed operands from the cast. Mask, gradient
    rule and the per-step gradient terms are the step's own."""

    @classmethod
    def of(cls, step: WeightStep, dtype) -> "WeightStep":
        if step.weight.dtype == dtype:
            return step
        return step.cached(("activation_dtype", dtype), lambda: cls._view(step, dtype))

    @classmethod
    def _view(cls, step, dtype):
        view = copy.copy(step)  # shares mask, rule, terms (take_decay once per step), seeds
        view.__class__ = cls
        view._dense = view._compressed = view._compressed_t = None
        view._extras = {}
        view._source, view._dtype = step, dtype
        return view

    def _masked(self):
        return self._source._masked().to(self._dtype)

    def dense(self, hold: bool = False):
        if not self.pruned:  # TE's cast of the dense weight, per call as TE does
            return self.weight.detach().to(self._dtype)
        return super().dense(hold)

    def held_tensors(self) -> list:
        held = (self._dense, self._compressed, self._compressed_t)
        return [t for t in held if t is not None]


def _group(module):
    """The group that agrees on the speed gate's decisions: the TP group of a column / row layer
    (its ranks see the same token count); none for layers without TE communication (experts, whose
    ranks see different counts)."""
    if getattr(module, "parallel_mode", None) in ("column", "row"):
        return getattr(module, "tp_group", None)
    return None


def sparse_gemm(module, x, weight, bias, step, index, out_dtype, input_comm=None):
    """y = x (W*M)^T + b of GEMM `index` of a TE forward call, in TE's activation dtype
    `out_dtype`, on core's sparse linear op; `step` from `route_steps`. `input_comm`: the
    column-parallel input communication the op runs on the local x, overlapped with the weight
    gradient as TE's Linear does (megasparse.core.input_comm; None: x arrives communicated)."""
    step = _ActivationDtypeStep.of(step, out_dtype)
    x = x if x.dtype == out_dtype else x.to(out_dtype)  # TE's cast_if_needed for AMP
    x = module._sparse_input(x)  # fc2 of an activation-sparse FFN: the sparse activation
    bias = bias if bias is None or bias.dtype == out_dtype else bias.to(out_dtype)
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if input_comm is not None:  # the GEMMs' tokens: all-gathered under sequence parallelism
        tokens = input_comm.total_tokens(tokens)
    plan = LinearPlan(
        backend=step.backend,
        transposable=module.sparsity.mask == "transposable",
        gradient_accumulation_fusion=bool(getattr(module, "fuse_wgrad_accumulation", False)),
        sparse_weight_roles=module.gated_roles(tokens, step, step.backend, _group(module)),
        input_comm=input_comm,
    )
    return sparse_linear_step(x, weight, bias, step, plan)
