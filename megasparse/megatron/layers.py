"""Drop-in sparse ColumnParallelLinear / RowParallelLinear for Megatron-core.

Same constructor (plus the keyword `sparsity`), parameters, `(output, bias)` return and
`sharded_state_dict` as the parents. Only the GEMM changes: Megatron's own forward runs
unchanged and calls `_forward_impl`, which we override. A column layer's input communication
(sequence-parallel all-gather and its reduce-scatter, or the dgrad all-reduce) runs inside the
sparse op, overlapped with the weight-gradient GEMM as in Megatron's own linear; the output
communication of row layers stays Megatron's.
"""

import contextlib
import dataclasses
import functools
import inspect
from typing import Optional

import torch
from megatron.core.tensor_parallel import layers as mcore_layers
from megatron.core.utils import get_tensor_model_parallel_group_if_none

from megasparse.core.backends import BACKENDS, check_backend_static
from megasparse.config import SparsityConfig
from megasparse.core.sparse_module import SparseModuleMixin
from megasparse.fp8 import linear as fp8_linear
from megasparse.fp8.scaling import quantized_weight
from megasparse.megatron.activation_input import (
    FeedsSparseActivation,
    LinearActivationRole,
    SparseActivationInput,
)
from megasparse.megatron.tp_group import weight_tp_group
from megasparse.core import speed_gate
from megasparse.core.gradients import gradient_rule
from megasparse.core.input_comm import ColumnInputComm
from megasparse.core.linear_op import LinearPlan, sparse_linear_step
from megasparse.core.sparse_operand import is_2_4
from megasparse.core.weight_checkpoint import parse_refreshed_at
from megasparse.core.weight_state import SparseWeightState, refuse_graph_capture

ALL_ROLES = speed_gate.ROLES

_FORWARD_IMPL_SIGNATURE = inspect.signature(
    mcore_layers.linear_with_grad_accumulation_and_async_allreduce
)
_FORWARD_IMPL_DEFAULTS = {
    name: p.default
    for name, p in _FORWARD_IMPL_SIGNATURE.parameters.items()
    if p.default is not inspect.Parameter.empty
}


def _forward_impl_arguments(input, weight, args, kwargs) -> dict:
    """The arguments of Megatron's linear function by name (Megatron passes keywords: the fast path)."""
    if not args:
        return {**_FORWARD_IMPL_DEFAULTS, **kwargs, "input": input, "weight": weight}
    call = _FORWARD_IMPL_SIGNATURE.bind(input, weight, *args, **kwargs)
    call.apply_defaults()
    return call.arguments


@contextlib.contextmanager
def _torch_wgrad_fusion_allowed():
    """Let the parent accept gradient_accumulation_fusion without apex: we accumulate in torch."""
    available = mcore_layers._grad_accum_fusion_available
    mcore_layers._grad_accum_fusion_available = True
    try:
        yield available
    finally:
        mcore_layers._grad_accum_fusion_available = available


class _SparseLinearMixin(LinearActivationRole, SparseModuleMixin):
    """What the column and row layers share: shape checks, the per-step weight state and the sparse GEMM."""

    def _setup_sparsity(self, sparsity: Optional[SparsityConfig], apex_wgrad_fusion: bool) -> None:
        self._take_sparsity(sparsity)
        self._apex_wgrad_fusion = apex_wgrad_fusion
        if getattr(self, "gtp_remat_size", 1) > 1:
            raise NotImplementedError(
                f"megasparse: {type(self).__name__} does not support GTP weight rematerialization "
                f"(gtp_remat_size={self.gtp_remat_size}); disable it for sparse layers"
            )
        self.weight_state = SparseWeightState(
            mask_source=quantized_weight,  # fp8_order="quantize-then-prune" masks the e4m3 W
            process_group=functools.partial(weight_tp_group, group=self.tp_group),  # S-STE's beta
        )
        self._dist_checkpointing = False
        if self.weight is not None and self.sparsity.weights is not None:
            self._check_shard_shape(tuple(self.weight.shape), self.config.params_dtype)
        if self.weight is not None and self.sparsity.fp8 is not None:
            fp8_linear.check_shard_shape(type(self).__name__, tuple(self.weight.shape))

    def _tp_size(self) -> int:
        return self.tp_group.size() if self.tp_group is not None else 1

    def _check_shard_shape(self, shape, dtype) -> None:
        rows, cols = shape
        tp = self._tp_size()
        if cols % 4:
            if self._split_dim == 1:
                raise ValueError(
                    f"megasparse: {type(self).__name__} input_size={self.input_size} split over tensor-parallel "
                    f"size {tp} gives {cols} columns per rank, not a multiple of 4, so a 2:4 group would cross "
                    f"ranks. Make input_size a multiple of 4*TP={4 * tp} (the sparse GEMMs want 64*TP={64 * tp})."
                )
            raise ValueError(
                f"megasparse: {type(self).__name__} input_size={self.input_size} is not a multiple of 4, so it "
                "cannot be cut into 2:4 groups. Use a multiple of 4 (the sparse GEMMs want 64)."
            )
        if self.sparsity.mask == "transposable" and rows % 4:
            # only a column-parallel layer splits its output rows over the TP ranks
            multiple = f"4*TP={4 * tp}" if self._split_dim == 0 else "4"
            raise ValueError(
                f"megasparse: the transposable mask needs 4x4 tiles, but {type(self).__name__} has {rows} output "
                f"rows per tensor-parallel rank (TP={tp}). Make output_size a multiple of {multiple}, "
                "or use mask='1d'."
            )
        check_backend_static(
            self.sparsity.backend, shape, dtype, self.sparsity.mask == "transposable"
        )

    def sparse_weights(self) -> list:
        state = getattr(self, "weight_state", None)  # (none yet while constructed)
        return [] if state is None else [(self.weight, state)]

    # --- held masks in checkpoints (megasparse.core.weight_state) ------------------------------

    def get_extra_state(self):
        if self._dist_checkpointing:
            return None  # exactly the parent's value; the dist checkpoint has its own entries
        return self.weight_state.extra_state(self.sparsity)

    def set_extra_state(self, state):
        # held mask and S-STE's beta (the parent's None, or a dense checkpoint's: nothing)
        self.weight_state.restore_extra_state(state, self.weight)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        self._dist_checkpointing = True
        try:
            result = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        finally:
            self._dist_checkpointing = False
        extra = {}
        if self.weight is not None and self.sparsity.weights is not None:
            if (
                self.sparsity.mask_refresh_interval > 1
            ):  # always present, so loading asks for it too
                extra.update(self.weight_state.sharded_entries(self.weight, self.sparsity))
            if gradient_rule(self.sparsity).fixed_scale:  # S-STE's beta, replicated (NaN: not yet)
                beta = self.weight_state.sste_beta
                extra["megasparse_sste_beta"] = (  # float64: exact for every weight dtype
                    torch.full((1,), float("nan"), dtype=torch.float64)
                    if beta is None
                    else beta.detach().reshape(1).cpu().double()
                )
        if extra:
            from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

            kwargs = {"tp_group": self.tp_group}
            if metadata is not None and "dp_cp_group" in metadata:
                kwargs["dp_cp_group"] = metadata["dp_cp_group"]
            result.update(
                make_sharded_tensors_for_checkpoint(
                    extra,
                    prefix,
                    {"megasparse_held_mask": self._split_dim},
                    sharded_offsets,
                    **kwargs,
                )
            )
            if prefix + "megasparse_refreshed_at" in result:  # older checkpoints hold 1 element
                result[prefix + "megasparse_refreshed_at"].allow_shape_mismatch = True
        return result

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        mask = state_dict.pop(prefix + "megasparse_held_mask", None)
        refreshed_at = state_dict.pop(prefix + "megasparse_refreshed_at", None)
        beta = state_dict.pop(prefix + "megasparse_sste_beta", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.weight_state.invalidate()  # new weights: rebuild the step state
        if beta is not None and torch.isfinite(beta).all():  # from a dist checkpoint
            dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
            self.weight_state.sste_beta = beta.reshape(()).to(dtype)  # as sste_scale gives it
        if mask is not None:  # from a dist checkpoint (set_extra_state saw None)
            refreshed_at, step_count = (
                parse_refreshed_at(refreshed_at) if refreshed_at is not None else (0, None)
            )
            self.weight_state.restore_held_mask(mask, refreshed_at, self.weight, step_count)

    # --- the GEMM -------------------------------------------------------------------------

    def _forward_impl(self, input, weight, *args, **kwargs):
        refuse_graph_capture(weight, *self._capture_configs())  # before the dense shortcut
        call = _forward_impl_arguments(input, weight, args, kwargs)
        fusion = bool(call["gradient_accumulation_fusion"])
        sparse_now = self.sparsity.prunes_weights or self._sparse_input_now()
        fp8 = self.sparsity.fp8 is not None  # FP8 GEMMs in every phase (megasparse.fp8.linear)
        if (
            not (sparse_now or fp8)
            and (self._apex_wgrad_fusion or not fusion)
            and not is_2_4(input)
        ):
            return super()._forward_impl(input, weight, *args, **kwargs)  # exactly the parent
        if call["grad_output_buffer"] is not None:
            raise NotImplementedError(
                "megasparse: deferred embedding wgrad (grad_output_buffer) is for the output layer, "
                "which megasparse never sparsifies"
            )
        # the column-parallel input communication, inside the op: the SP all-gather (its backward
        # a reduce-scatter, Megatron's tensor_parallel_output_grad=True) or allreduce_dgrad's
        # all-reduce of the input gradient, overlapped with the weight-gradient GEMM as in
        # Megatron's own linear (megasparse.core.input_comm)
        comm = None
        if call["sequence_parallel"] or call["allreduce_dgrad"]:
            tp_group = call["tp_group"] if call["tp_group"] is not None else self.tp_group
            comm = ColumnInputComm(
                get_tensor_model_parallel_group_if_none(tp_group),
                sequence_parallel=bool(call["sequence_parallel"]),
            )
        input = self._sparse_input(input)
        if fp8:
            step = self.weight_state.step(weight, self.sparsity, BACKENDS["dense"])
            plan = fp8_linear.local_plan(self.sparsity, weight, input, fusion)
            plan = plan if comm is None else dataclasses.replace(plan, input_comm=comm)
            return fp8_linear.fp8_sparse_linear_step(input, weight, call["bias"], step, plan)
        # a sparse backend only where something is sparse now; else the exact dense path
        backend = self.backend_for(weight) if sparse_now or is_2_4(input) else BACKENDS["dense"]
        step = self.weight_state.step(weight, self.sparsity, backend)
        plan = LinearPlan(
            backend=backend,
            transposable=self.sparsity.mask == "transposable",
            gradient_accumulation_fusion=fusion,
            sparse_weight_roles=self._gated_roles(input, step, backend, comm),
            input_comm=comm,
        )
        return sparse_linear_step(input, weight, call["bias"], step, plan)

    def _gated_roles(self, input, step, backend, comm=None) -> tuple:
        tokens = input.numel() // input.shape[-1]  # the GEMMs' tokens: all-gathered under SP
        tokens = tokens if comm is None else comm.total_tokens(tokens)
        return self.gated_roles(tokens, step, backend, self.tp_group)


class SparseColumnParallelLinear(
    FeedsSparseActivation, _SparseLinearMixin, mcore_layers.ColumnParallelLinear
):
    """ColumnParallelLinear with a 2:4 weight. Extra keyword: `sparsity: SparsityConfig`.

    `sparsity.activations` does not apply to a column layer (its input is not an FFN activation).
    As fc1 of a SparseMLP, its output gradient dH arrives marked 2:4 (megasparse.core.sparse_operand)
    when the activation is 2:4, and the input-gradient GEMM dX = dH W1 then uses it as the sparse operand
    (megasparse.megatron.activation_input).
    """

    _split_dim = 0

    def __init__(self, *args, sparsity: Optional[SparsityConfig] = None, **kwargs):
        with _torch_wgrad_fusion_allowed() as apex_wgrad_fusion:
            super().__init__(*args, **kwargs)
        self._setup_sparsity(sparsity, apex_wgrad_fusion)


class SparseRowParallelLinear(
    SparseActivationInput, _SparseLinearMixin, mcore_layers.RowParallelLinear
):
    """RowParallelLinear with a 2:4 weight and optionally a sparse input: the FFN activation, as fc2.

    Extra keyword: `sparsity: SparsityConfig`. With `sparsity.activations` the layer must be an
    MLP's fc2 (Megatron's MLP builds it with tp_comm_buffer_name="fc2"): it sparsifies its input,
    unless SparseMLP has declared (`input_sparsified_upstream`) that its activation already does
    (megasparse.megatron.activation_input). `activation_stats()` reports how sparse the input
    activation was and what the sparsifier dropped.
    """

    _split_dim = 1

    def __init__(self, *args, sparsity: Optional[SparsityConfig] = None, **kwargs):
        comm_name = kwargs.get("tp_comm_buffer_name")
        with _torch_wgrad_fusion_allowed() as apex_wgrad_fusion:
            super().__init__(*args, **kwargs)
        self._setup_sparsity(sparsity, apex_wgrad_fusion)
        self._setup_activation_input(
            ffn_size=self.input_size,
            columns_per_rank=self.input_size_per_partition,
            tp=self._tp_size(),
            comm_name=comm_name,
        )
