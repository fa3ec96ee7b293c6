"""Drop-in sparse ColumnParallelLinear / RowParallelLinear for Megatron-core.

Same constructor (plus the keyword `sparsity`), parameters, `(output, bias)` return and
`sharded_state_dict` as the parents. Only the GEMM changes: Megatron's own forward runs
unchanged and calls `_forward_impl`, which we override. Communication goes through
Megatron's mappings (sequence-parallel all-gather / reduce-scatter, dgrad all-reduce).
"""

import contextlib
import dataclasses
import inspect
from typing import Optional

import torch
from megatron.core.tensor_parallel import layers as mcore_layers
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from megasparse.activation_sparsity import ActivationStats, sparsify
from megasparse.backends import check_backend_static, resolve_backend
from megasparse.config import SparsityConfig
from megasparse.ops import GradOutputMask, LinearPlan, sparse_linear, weight_mask

_FORWARD_IMPL_SIGNATURE = inspect.signature(mcore_layers.linear_with_grad_accumulation_and_async_allreduce)
_FORWARD_IMPL_DEFAULTS = {
    name: p.default for name, p in _FORWARD_IMPL_SIGNATURE.parameters.items() if p.default is not inspect.Parameter.empty
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


class _SparseLinearMixin:
    """Sparsity state and the sparse `_forward_impl` shared by the column and row layers."""

    def _setup_sparsity(self, sparsity: Optional[SparsityConfig], apex_wgrad_fusion: bool) -> None:
        if sparsity is not None and not isinstance(sparsity, SparsityConfig):
            raise TypeError(f"sparsity must be a megasparse.SparsityConfig, got {type(sparsity).__name__}")
        self.sparsity = dataclasses.replace(sparsity) if sparsity is not None else SparsityConfig()
        self._apex_wgrad_fusion = apex_wgrad_fusion
        if getattr(self, "gtp_remat_size", 1) > 1:
            raise NotImplementedError(
                f"megasparse: {type(self).__name__} does not support GTP weight rematerialization "
                f"(gtp_remat_size={self.gtp_remat_size}); disable it for sparse layers"
            )
        self.register_buffer("_held_mask", None, persistent=False)
        self._dist_checkpointing = False
        self._mask_step = 0  # steps seen (training forwards, or the iteration set from outside)
        self._mask_refreshed_at = 0
        self._iteration_driven = False
        self._backends = {}
        if self.weight is not None and self.sparsity.weights is not None:
            self._check_shard_shape(tuple(self.weight.shape), self.config.params_dtype)
        self._setup_role()

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
            raise ValueError(
                f"megasparse: the transposable mask needs 4x4 tiles, but {type(self).__name__} has {rows} output "
                f"rows per tensor-parallel rank (TP={tp}). Make output_size a multiple of 4*TP={4 * tp}, "
                "or use mask='1d'."
            )
        check_backend_static(self.sparsity.backend, shape, dtype, self.sparsity.mask == "transposable")

    # --- the mask -------------------------------------------------------------------------

    def set_sparsity_iteration(self, iteration: int) -> None:
        """Drive held masks by training iteration instead of by counting forwards (used by schedules)."""
        self._mask_step = int(iteration)
        self._iteration_driven = True

    def _compute_mask(self, weight):
        return weight_mask(weight, self.sparsity.mask, self.sparsity.nonfinite_weights)

    def _current_mask(self, weight):
        interval = self.sparsity.mask_refresh_interval
        if interval == 1:
            return self._compute_mask(weight)
        held = self._held_mask
        stale = (
            held is None
            or held.shape != weight.shape
            or held.device != weight.device
            or self._mask_step - self._mask_refreshed_at >= interval
            or self._mask_step < self._mask_refreshed_at
        )
        if stale:
            self._held_mask = self._compute_mask(weight)
            self._mask_refreshed_at = self._mask_step
        return self._held_mask

    def reset_held_mask(self) -> None:
        """Forget a held mask: the next forward prunes the current weight."""
        self._held_mask = None

    # Held masks are training state: they go into checkpoints. The torch state_dict carries them in
    # the parent's `_extra_state` entry (same keys as the parent); dist checkpoints carry them as a
    # tensor sharded like the weight, so TP resharding works.

    def get_extra_state(self):
        if self._held_mask is None or self.sparsity.mask_refresh_interval == 1 or self._dist_checkpointing:
            return None  # exactly the parent's value
        return {"megasparse_held_mask": self._held_mask.clone(), "refreshed_at": self._mask_refreshed_at}

    def set_extra_state(self, state):
        state = state if isinstance(state, dict) else {}  # the parent's None, or a dense checkpoint's
        self._restore_held_mask(state.get("megasparse_held_mask"), state.get("refreshed_at", 0))

    def _restore_held_mask(self, mask, refreshed_at):
        if mask is None or self.weight is None or tuple(mask.shape) != tuple(self.weight.shape):
            self._held_mask = None  # none saved (or another layout): the next forward recomputes it
            return
        self._held_mask = mask.to(device=self.weight.device, dtype=torch.bool)
        self._mask_refreshed_at = int(refreshed_at)
        self._mask_step = max(self._mask_step, self._mask_refreshed_at)  # held until the next refresh point

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        self._dist_checkpointing = True
        try:
            result = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        finally:
            self._dist_checkpointing = False
        if self.sparsity.mask_refresh_interval > 1 and self.weight is not None and self.sparsity.weights is not None:
            from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

            # always present for held-mask layers, so that loading asks for it too
            held = self._held_mask if self._held_mask is not None else self._compute_mask(self.weight)
            extra = {"megasparse_held_mask": held.to(torch.uint8),
                     "megasparse_refreshed_at": torch.tensor([self._mask_refreshed_at])}
            kwargs = {"tp_group": self.tp_group}
            if metadata is not None and "dp_cp_group" in metadata:
                kwargs["dp_cp_group"] = metadata["dp_cp_group"]
            result.update(make_sharded_tensors_for_checkpoint(
                extra, prefix, {"megasparse_held_mask": self._split_dim}, sharded_offsets, **kwargs))
        return result

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        mask = state_dict.pop(prefix + "megasparse_held_mask", None)
        refreshed_at = state_dict.pop(prefix + "megasparse_refreshed_at", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if mask is not None:  # from a dist checkpoint (set_extra_state saw None)
            self._restore_held_mask(mask, int(refreshed_at[0]) if refreshed_at is not None else 0)

    @torch.no_grad()
    def sparsity_mask(self, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The bool mask the layer computes with now, shaped like the weight (all True when dense)."""
        weight = self.weight if weight is None else weight
        if not self.sparsity.prunes_weights:
            return torch.ones_like(weight, dtype=torch.bool)
        if self.sparsity.mask_refresh_interval > 1 and self._held_mask is not None:
            return self._held_mask.clone()
        return self._compute_mask(weight)

    # --- the GEMM -------------------------------------------------------------------------

    def _backend_for(self, weight):
        key = (weight.device, weight.dtype, tuple(weight.shape))
        if key not in self._backends:
            self._backends[key] = resolve_backend(self.sparsity.backend, weight, self.sparsity.mask == "transposable")
        return self._backends[key]

    def _forward_impl(self, input, weight, *args, **kwargs):
        call = _forward_impl_arguments(input, weight, args, kwargs)
        fusion = bool(call["gradient_accumulation_fusion"])
        if not self._sparse_now() and (self._apex_wgrad_fusion or not fusion):
            return super()._forward_impl(input, weight, *args, **kwargs)  # exactly the parent
        if call["grad_output_buffer"] is not None:
            raise NotImplementedError(
                "megasparse: deferred embedding wgrad (grad_output_buffer) is for the output layer, "
                "which megasparse never sparsifies"
            )
        tp_group = call["tp_group"] if call["tp_group"] is not None else self.tp_group
        if call["sequence_parallel"]:
            input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=tp_group)
        elif call["allreduce_dgrad"]:
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)

        input, input_2_4 = self._sparse_input(input)
        if self.sparsity.prunes_weights:
            mask = self._current_mask(weight)
            backend = self._backend_for(weight)
        else:  # dense weights: activation sparsity only, a dense phase, or the torch wgrad-fusion fallback
            mask = None
            backend = self._backend_for(weight) if self._sparse_now() else resolve_backend("dense", weight, False)
        plan = LinearPlan(
            backend=backend,
            gradient=self.sparsity.gradient,
            srste_decay=self.sparsity.srste_decay,
            transposable=self.sparsity.mask == "transposable",
            gradient_accumulation_fusion=fusion,
            input_2_4=input_2_4,
            grad_output_mask=self._grad_output_mask_slot(),
        )
        output = sparse_linear(input, weight, call["bias"], mask, plan)
        if self.training and torch.is_grad_enabled():
            self._advance_mask_step()
        return output

    def _advance_mask_step(self) -> None:
        """One training step seen (unless a schedule drives the iteration)."""
        if not self._iteration_driven:
            self._mask_step += 1

    # role-specific hooks: a column layer may receive a 2:4 output gradient (fc1 of a SparseMLP),
    # a row layer may sparsify its input (fc2)

    def _setup_role(self):
        pass

    def _sparse_now(self) -> bool:
        return self.sparsity.prunes_weights

    def _sparse_input(self, input):
        return input, False

    def _grad_output_mask_slot(self):
        return None


class SparseColumnParallelLinear(_SparseLinearMixin, mcore_layers.ColumnParallelLinear):
    """ColumnParallelLinear with a 2:4 weight. Extra keyword: `sparsity: SparsityConfig`.

    `sparsity.activations` does not apply to a column layer (its input is not an FFN activation).
    """

    _split_dim = 0

    def __init__(self, *args, sparsity: Optional[SparsityConfig] = None, **kwargs):
        with _torch_wgrad_fusion_allowed() as apex_wgrad_fusion:
            super().__init__(*args, **kwargs)
        self._setup_sparsity(sparsity, apex_wgrad_fusion)

    def _setup_role(self):
        self._grad_output_sparsity = None  # the SparsityConfig of the fc2 whose activation we feed
        self._open_grad_output_slot = None

    def expect_sparse_grad_output(self, fc2_sparsity: SparsityConfig) -> None:
        """Called by SparseMLP: our output gradient dH will carry fc2's 2:4 activation mask."""
        self._grad_output_sparsity = fc2_sparsity

    def receive_grad_output_mask(self, mask) -> None:
        """The activation mask of the forward that just ran through us (consumed by its backward)."""
        slot, self._open_grad_output_slot = self._open_grad_output_slot, None
        if slot is not None:
            slot.mask = mask

    def _sparse_grad_output_expected(self) -> bool:
        fc2 = self._grad_output_sparsity
        return fc2 is not None and fc2.sparsifies_activations and fc2.activation_pattern[1] == 4

    def _sparse_now(self) -> bool:
        return self.sparsity.prunes_weights or self._sparse_grad_output_expected()

    def _grad_output_mask_slot(self):
        if not self._sparse_grad_output_expected():
            return None
        self._open_grad_output_slot = GradOutputMask()
        return self._open_grad_output_slot


class SparseRowParallelLinear(_SparseLinearMixin, mcore_layers.RowParallelLinear):
    """RowParallelLinear with a 2:4 weight and optionally a sparse input (the FFN activation, when it is fc2).

    Extra keyword: `sparsity: SparsityConfig`. `activation_stats` accumulates how sparse the
    input activation was and how much of it the sparsifier dropped.
    """

    _split_dim = 1

    def __init__(self, *args, sparsity: Optional[SparsityConfig] = None, **kwargs):
        self._comm_name = kwargs.get("tp_comm_buffer_name")
        with _torch_wgrad_fusion_allowed() as apex_wgrad_fusion:
            super().__init__(*args, **kwargs)
        self._setup_sparsity(sparsity, apex_wgrad_fusion)

    def _setup_role(self):
        self.activation_stats = ActivationStats()
        self._pending_sparse_input = None
        pattern = self.sparsity.activation_pattern
        if pattern is None:
            return
        if self._comm_name not in (None, "fc2"):
            raise ValueError(
                f"megasparse: activation sparsity is for the FFN activation (the input of fc2), but this "
                f"RowParallelLinear is {self._comm_name!r}; give it a SparsityConfig with activations=None"
            )
        columns, m, tp = self.input_size_per_partition, pattern[1], self._tp_size()
        if columns % m:
            raise ValueError(
                f"megasparse: activations={self.sparsity.activations!r} groups {m} FFN columns, but "
                f"ffn size {self.input_size} over tensor-parallel size {tp} gives {columns} per rank. "
                f"Make the FFN size a multiple of {m}*TP={m * tp}."
            )

    def receive_sparse_input(self, values, mask) -> None:
        """Called by SparseMLP's activation: the next input is `values`, already sparsified with `mask`."""
        self._pending_sparse_input = (values, mask)

    def _sparse_now(self) -> bool:
        return self.sparsity.prunes_weights or self.sparsity.sparsifies_activations

    def _sparse_input(self, input):
        pending, self._pending_sparse_input = self._pending_sparse_input, None
        if not self.sparsity.sparsifies_activations:
            return input, False
        pattern = self.sparsity.activation_pattern
        if pending is None or pending[0] is not input:
            # stats were already counted for a pending activation that was rescaled on the way
            stats = self.activation_stats if pending is None else None
            input, _ = sparsify(input, pattern, stats)
        return input, pattern[1] == 4
