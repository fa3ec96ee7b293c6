"""The per-optimizer-step state of a sparse weight: its mask and the GEMM operands derived from it.

Weights change only at the optimizer step, and a step runs k micro-batches. So everything that
depends only on the weight is built at the first use after a step boundary and reused by every
micro-batch's forward, backward and recompute in that step (a `WeightStep`):
- the 2:4 mask, bit-packed (1/16 of a bf16 weight), held for `mask_refresh_interval` steps;
- the forward GEMM operand: W*M compressed for the sparse backends (W*M itself for `dense`);
- the input-gradient operand: the compressed (W*M)^T for transposable masks, W*M for 1d masks;
  held for the step or rebuilt in each backward (`SparsityConfig.hold_backward_weight`).

The rule for a step boundary (also in the README): the state is rebuilt at the first use after
1. a `torch.optim` optimizer step anywhere in the process (Megatron's optimizers step one), or
2. a new iteration given to `set_iteration` (SparsitySchedule, the Megatron-LM hook), or
3. an in-place change of the weight (its version counter: load_state_dict, manual edits), or
   new weight storage (Megatron DDP moving parameters into its buffers), or
4. a change of the layer's SparsityConfig (weights, mask, enabled, nonfinite_weights, backend,
   hold_backward_weight) or a new config object; a change of the mask rule (weights, mask,
   enabled, nonfinite_weights), even one undone before the next use, also drops a held mask.
Boundaries of kind 1 and 2 count steps for held masks (kind 2 sets the count to the iteration).

This module is the only copy of the mask policy (`compute_mask`) and of held-mask checkpoint I/O;
every sparse module (local and TE linears, experts, FP8) goes through it.
"""

from typing import Optional

import torch

from megasparse import step_clock
from megasparse.masks import weight_mask

_BIT_WEIGHTS = {}


def compute_mask(weight: torch.Tensor, sparsity) -> torch.Tensor:
    """The 2:4 mask the config's rule gives for `weight` (bool, shaped like it)."""
    return weight_mask(weight.detach(), sparsity.mask, sparsity.nonfinite_weights)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bits, 8 elements per byte (the flattened tensor, zero-padded)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    key = mask.device
    if key not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[key] = 2 ** torch.arange(8, device=mask.device, dtype=torch.uint8)
    return (flat.view(-1, 8).to(torch.uint8) * _BIT_WEIGHTS[key]).sum(-1, dtype=torch.uint8)


def unpack_mask(bits: torch.Tensor, shape) -> torch.Tensor:
    numel = 1
    for size in shape:
        numel *= size
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return ((bits.unsqueeze(-1) >> shifts) & 1).bool().reshape(-1)[:numel].reshape(shape)


class WeightStep:
    """One optimizer step's view of a weight: mask and GEMM operands, each built once when first needed.

    mask_bits None means the weight is used dense (a dense phase, or activation sparsity only).
    """

    def __init__(self, weight, mask_bits, backend, transposable: bool, hold_backward: bool):
        self.weight = weight
        self.mask_bits = mask_bits
        self.backend = backend
        self.transposable = transposable
        self.hold_backward = hold_backward
        self.decay_pending = True  # per-step gradient terms (srste) not yet applied this step
        self._dense = None  # W*M
        self._compressed = None  # compress(W*M)
        self._compressed_t = None  # compress((W*M)^T)
        self._extras = {}  # other per-step operands by key (megasparse.fp8_linear: the FP8 weight)

    @property
    def pruned(self) -> bool:
        return self.mask_bits is not None

    def mask(self) -> Optional[torch.Tensor]:
        return None if self.mask_bits is None else unpack_mask(self.mask_bits, self.weight.shape)

    def _masked(self):
        return self.weight.detach() * self.mask()

    def dense(self) -> torch.Tensor:
        """The weight the GEMMs compute with, as a dense tensor (W*M, or W in a dense phase)."""
        if not self.pruned:
            return self.weight.detach()
        if self._dense is not None:
            return self._dense
        masked = self._masked()
        # held where W*M itself is a GEMM operand in every micro-batch: the dense backend's forward,
        # or a held 1d backward (a transposable backward uses the compressed (W*M)^T instead)
        if self.backend.name == "dense" or (self.hold_backward and not self.transposable):
            self._dense = masked
        return masked

    def compressed(self):
        """The forward operand: W*M in the backend's sparse format (built once per step)."""
        if self._compressed is None:
            self._compressed = self.backend.compress(self.dense())
        return self._compressed

    def compressed_t(self):
        """The transposable mask's input-gradient operand: (W*M)^T in the backend's sparse format."""
        if self._compressed_t is not None:
            return self._compressed_t
        operand = self.backend.compress(self.dense().t().contiguous())
        if self.hold_backward:
            self._compressed_t = operand
        return operand

    def cached(self, key, build):
        """`build()` once per step under `key` (e.g. the FP8 weight and its compressed operands)."""
        if key not in self._extras:
            self._extras[key] = build()
        return self._extras[key]

    def take_decay(self) -> bool:
        """True once per step: whether the caller should add this step's per-step gradient term."""
        pending, self.decay_pending = self.decay_pending, False
        return pending

    def held_bytes(self) -> dict:
        """Bytes this step holds, by part (compressed operands counted by their tensors)."""
        parts = {"mask": self.mask_bits, "dense": self._dense,
                 "compressed": self._compressed, "compressed_t": self._compressed_t}
        if parts["compressed"] is parts["dense"]:
            parts["compressed"] = None  # the dense backend's operand is W*M itself
        held = {name: _nbytes(value) for name, value in parts.items() if value is not None}
        for key, value in self._extras.items():  # objects listing their tensors: held_tensors()
            held[str(key)] = sum(_nbytes(t) for t in value.held_tensors())
        return held


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor) and type(value) is torch.Tensor:
        return value.numel() * value.element_size()
    # PyTorch's semi-structured tensors: their packed values and metadata
    names = ("packed", "meta", "packed_t", "meta_t", "compressed_swizzled_bitmask")
    return sum(_nbytes(getattr(value, n)) for n in names if getattr(value, n, None) is not None)


def _mask_rule(sparsity):
    """Identifies the config's mask rule; any change of weights / mask / enabled / nonfinite_weights
    (even one undone before the next use) or a new config object gives a new value."""
    return id(sparsity), sparsity.mask_rule_revision


class SparseWeightState:
    """The per-step state of one weight of a sparse module (see the module docstring)."""

    def __init__(self):
        self.held_mask_bits = None  # held masks (mask_refresh_interval > 1)
        self.held_shape = None
        self.refreshed_at = 0  # the step count at which the held mask was computed
        self.steps = 0  # step boundaries seen (or the iteration set from outside)
        self.iteration_driven = False
        self.mask_computations = 0
        self._generation = None
        self._mask_key = None
        self._rule = None
        self._step: Optional[WeightStep] = None

    # --- step boundaries ------------------------------------------------------------------

    def set_iteration(self, iteration: int) -> None:
        """Drive the step count by training iteration (schedules); a new iteration is a boundary."""
        iteration = int(iteration)
        if not self.iteration_driven or iteration != self.steps:
            self._step = None
        self.steps, self.iteration_driven = iteration, True

    def invalidate(self, drop_held_mask: bool = False) -> None:
        self._step = None
        if drop_held_mask:
            self.held_mask_bits = None

    def step(self, weight, sparsity, backend, transposable: Optional[bool] = None) -> WeightStep:
        """This step's WeightStep for `weight` under `sparsity`, built at the first call after a boundary."""
        generation = step_clock.generation()
        if self._generation is not None and generation != self._generation:
            if not self.iteration_driven:
                self.steps += 1
            self._step = None
        self._generation = generation
        transposable = sparsity.mask == "transposable" if transposable is None else transposable
        hold = transposable if sparsity.hold_backward_weight is None else sparsity.hold_backward_weight
        mask_key = (_mask_rule(sparsity), sparsity.prunes_weights, sparsity.mask_refresh_interval,
                    weight.data_ptr(), tuple(weight.shape), weight.dtype, weight.device, weight._version)
        step = self._step
        if step is None or mask_key != self._mask_key:
            if self._rule is not None and _mask_rule(sparsity) != self._rule:
                self.held_mask_bits = None  # re-enabled, or a new mask rule: prune the current weight
            self._rule, self._mask_key = _mask_rule(sparsity), mask_key
            bits = self._mask_bits(weight, sparsity) if sparsity.prunes_weights else None
            self._step = WeightStep(weight, bits, backend, transposable, hold)
        elif (step.backend, step.transposable, step.hold_backward) != (backend, transposable, hold):
            self._step = WeightStep(weight, step.mask_bits, backend, transposable, hold)  # same mask
            self._step.decay_pending = step.decay_pending
        return self._step

    def _mask_bits(self, weight, sparsity):
        interval = sparsity.mask_refresh_interval
        if interval > 1:
            held = self.held_mask_bits
            stale = (
                held is None
                or self.held_shape != tuple(weight.shape)
                or held.device != weight.device
                or self.steps - self.refreshed_at >= interval
                or self.steps < self.refreshed_at
            )
            if not stale:
                return held
        self.mask_computations += 1
        bits = pack_mask(compute_mask(weight, sparsity))
        if interval > 1:
            self.held_mask_bits, self.held_shape, self.refreshed_at = bits, tuple(weight.shape), self.steps
        return bits

    def current_mask(self, weight, sparsity) -> torch.Tensor:
        """The bool mask the module computes with now (all True when it computes dense)."""
        if not sparsity.prunes_weights:
            return torch.ones_like(weight, dtype=torch.bool)
        if self._step is not None:  # keep the step's operands: the mask does not depend on them
            return self.step(weight, sparsity, self._step.backend, self._step.transposable).mask()
        from megasparse.backends import BACKENDS

        return self.step(weight, sparsity, BACKENDS["dense"]).mask()

    # --- held masks in checkpoints --------------------------------------------------------
    # The torch state_dict carries them in the module's `_extra_state` entry (the parent's keys);
    # dist checkpoints carry them as a tensor sharded like the weight, so TP resharding works.

    def held_mask(self) -> Optional[torch.Tensor]:
        if self.held_mask_bits is None:
            return None
        return unpack_mask(self.held_mask_bits, self.held_shape)

    def extra_state(self, sparsity) -> Optional[dict]:
        if self.held_mask_bits is None or sparsity.mask_refresh_interval == 1:
            return None  # exactly the parent's value
        return {"megasparse_held_mask": self.held_mask(), "refreshed_at": self.refreshed_at}

    def restore_held_mask(self, mask, refreshed_at, weight) -> None:
        """Restore a held mask from a checkpoint (None, or another layout: the next use recomputes it)."""
        self._step = None
        if mask is None or weight is None or tuple(mask.shape) != tuple(weight.shape):
            self.held_mask_bits = None
            return
        self.held_mask_bits = pack_mask(mask.to(device=weight.device, dtype=torch.bool))
        self.held_shape = tuple(weight.shape)
        self.refreshed_at = int(refreshed_at)
        self.steps = max(self.steps, self.refreshed_at)  # held until the next refresh point
        self._rule = None  # a restored mask is not dropped by the first use's rule check

    def sharded_entries(self, weight, sparsity) -> dict:
        """The held-mask tensors for a dist checkpoint (always present for held-mask layers)."""
        held = self.held_mask()
        if held is None:
            held = compute_mask(weight, sparsity)
        return {"megasparse_held_mask": held.to(torch.uint8),
                "megasparse_refreshed_at": torch.tensor([self.refreshed_at])}

    def held_bytes(self) -> dict:
        step = {} if self._step is None else self._step.held_bytes()
        if self.held_mask_bits is not None and self._step is not None and step.get("mask") is not None \
                and self._step.mask_bits is self.held_mask_bits:
            return step
        if self.held_mask_bits is not None:
            step["held_mask"] = _nbytes(self.held_mask_bits)
        return step
