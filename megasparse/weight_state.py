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

Training-quality pieces (issue 14; each marked "quality" below, all off unless the config asks):
- S-STE (gradient="sste", Hu, Zhu, Chen, NeurIPS 2024): the step's forward weight is
  beta * S(W) (megasparse.gradient_rules.sste_weight) instead of W*M; same hard mask M (the
  support of S(W) lies inside it). beta is computed once per weight, at its first sparse
  forward (so after a dense warm-up, from the warmed-up weight), summed over the weight's
  tensor-parallel group (`SparseWeightState.tp_group`, else Megatron's TP group of the
  weight: TP-invariant), and saved in the extra state (`extra_state` / `restore_extra_state`).
- MVUE weight gradients (wgrad_sparsity="mvue"): `WeightStep.wgrad_generator()` is a
  torch.Generator on the weight's device, seeded once per step from (wgrad_seed, global rank,
  weight index, step count): reproducible, no host sync.
- Flip rate (track_flip_rate, Hu et al., ICML 2024): at every mask computation the new bits
  are XOR-ed with the previous mask's and counted on the device (a popcount table): the share
  of mask entries that changed since the last mask (`flip_rate`, a 0-dim tensor).
"""

import itertools
from typing import Optional

import torch
import torch.distributed as dist

from megasparse import step_clock
from megasparse.fp8_recipe import quantized_weight
from megasparse.masks import check_finite, weight_mask

_BIT_WEIGHTS = {}
_POPCOUNT = {}  # quality: bits set in each uint8 value, per device (flip rate)
_STATE_INDEX = itertools.count()  # quality: weight index for the MVUE seeds (construction order)


def compute_mask(weight: torch.Tensor, sparsity) -> torch.Tensor:
    """The 2:4 mask the config's rule gives for `weight` (bool, shaped like it).
    FP8 quantize-then-prune: the mask of the e4m3 values of W (megasparse.fp8_linear)."""
    weight = weight.detach()
    if getattr(sparsity, "fp8_order", None) == "quantize-then-prune":
        if sparsity.nonfinite_weights == "error":  # saturation would hide an Inf
            check_finite(weight)
        weight = quantized_weight(weight)
    return weight_mask(weight, sparsity.mask, sparsity.nonfinite_weights)


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

    def __init__(
        self,
        weight,
        mask_bits,
        backend,
        transposable: bool,
        hold_backward: bool,
        sparsity=None,
        sste_beta=None,
        wgrad_seed: Optional[int] = None,
    ):
        # quality: the config the step was built under (its gradient parameters are read at use),
        # S-STE's beta (the forward weight is beta * S(W) when set), the MVUE seed of this step
        self.sparsity = sparsity
        self.sste_beta = sste_beta
        self.wgrad_seed = wgrad_seed
        self._wgrad_generator = None
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
        if self.sste_beta is not None:  # quality: S-STE's forward weight beta * S(W)
            from megasparse.gradient_rules import sste_weight

            return sste_weight(self.weight, self.sste_beta)
        return self.weight.detach() * self.mask()

    def wgrad_generator(self) -> torch.Generator:
        """quality: this step's generator of MVUE draws (created and seeded once per step)."""
        if self._wgrad_generator is None:
            generator = torch.Generator(device=self.weight.device)
            generator.manual_seed(0 if self.wgrad_seed is None else self.wgrad_seed)
            self._wgrad_generator = generator
        return self._wgrad_generator

    def dense(self) -> torch.Tensor:
        """The weight the GEMMs compute with, as a dense tensor (W*M, or W in a dense phase;
        beta * S(W) under S-STE)."""
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
        parts = {
            "mask": self.mask_bits,
            "dense": self._dense,
            "compressed": self._compressed,
            "compressed_t": self._compressed_t,
        }
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
        # quality (see the module docstring)
        self.index = next(_STATE_INDEX)
        self.tp_group = None  # S-STE's beta is summed over it (None: Megatron's TP group)
        self.sste_beta: Optional[torch.Tensor] = None
        self.flip_prev_bits = None
        self.flip_rate: Optional[torch.Tensor] = None  # share changed at the last mask
        self.flip_step = None  # the step count of that mask
        self._flip_shape = None

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
        hold = (
            transposable if sparsity.hold_backward_weight is None else sparsity.hold_backward_weight
        )
        mask_key = (
            _mask_rule(sparsity),
            sparsity.prunes_weights,
            sparsity.mask_refresh_interval,
            weight.data_ptr(),
            tuple(weight.shape),
            weight.dtype,
            weight.device,
            weight._version,
        )
        step = self._step
        if step is None or mask_key != self._mask_key:
            if self._rule is not None and _mask_rule(sparsity) != self._rule:
                self.held_mask_bits = (
                    None  # re-enabled, or a new mask rule: prune the current weight
                )
            self._rule, self._mask_key = _mask_rule(sparsity), mask_key
            bits = self._mask_bits(weight, sparsity) if sparsity.prunes_weights else None
            self._step = self._new_step(weight, bits, backend, transposable, hold, sparsity)
        elif (step.backend, step.transposable, step.hold_backward) != (
            backend,
            transposable,
            hold,
        ) or (step.sste_beta is not None) != self._uses_sste(sparsity):
            self._step = self._new_step(
                weight, step.mask_bits, backend, transposable, hold, sparsity
            )  # same mask
            self._step.decay_pending = step.decay_pending
        return self._step

    # --- quality: S-STE's beta, MVUE seeds, flip rate ------------------------------------------

    @staticmethod
    def _uses_sste(sparsity) -> bool:
        return sparsity.gradient == "sste" and sparsity.prunes_weights

    def _new_step(self, weight, bits, backend, transposable, hold, sparsity) -> WeightStep:
        beta = None
        if bits is not None and self._uses_sste(sparsity):
            if self.sste_beta is None:  # the first sparse forward: fixed from now on
                from megasparse.gradient_rules import sste_scale

                self.sste_beta = sste_scale(weight, _tp_group_of(weight, self.tp_group))
            beta = self.sste_beta.to(weight.device)
        seed = None
        if sparsity.wgrad_sparsity is not None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            seed = hash((sparsity.wgrad_seed, rank, self.index, self.steps)) & (2**63 - 1)
        return WeightStep(
            weight,
            bits,
            backend,
            transposable,
            hold,
            sparsity=sparsity,
            sste_beta=beta,
            wgrad_seed=seed,
        )

    def _record_flips(self, bits, shape) -> None:
        """Share of mask entries that differ from the previous mask's (on the device, no sync)."""
        prev = self.flip_prev_bits
        if (
            prev is not None
            and prev.shape == bits.shape
            and prev.device == bits.device
            and self._flip_shape == tuple(shape)
        ):
            table = _POPCOUNT.get(bits.device)
            if table is None:
                values = torch.arange(256, device=bits.device)
                table = sum((values >> k) & 1 for k in range(8)).to(torch.int32)
                _POPCOUNT[bits.device] = table
            changed = table[(prev ^ bits).long()].sum(dtype=torch.int64)
            numel = 1
            for size in shape:
                numel *= size
            self.flip_rate = changed.to(torch.float32) / numel
            self.flip_step = self.steps
        self.flip_prev_bits, self._flip_shape = bits, tuple(shape)

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
        if sparsity.track_flip_rate:  # quality: flip rate
            self._record_flips(bits, weight.shape)
        if interval > 1:
            self.held_mask_bits, self.held_shape, self.refreshed_at = (
                bits,
                tuple(weight.shape),
                self.steps,
            )
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
        state = {}
        if self.held_mask_bits is not None and sparsity.mask_refresh_interval > 1:
            state = {"megasparse_held_mask": self.held_mask(), "refreshed_at": self.refreshed_at}
        if self.sste_beta is not None:  # quality: S-STE's fixed beta
            state["megasparse_sste_beta"] = self.sste_beta.detach().cpu().clone()
        return state or None  # None: exactly the parent's value

    def restore_extra_state(self, state, weight) -> None:
        """Restore what `extra_state` saved (held mask, S-STE's beta); None or {}: nothing saved."""
        state = state if isinstance(state, dict) else {}
        self.restore_held_mask(
            state.get("megasparse_held_mask"), state.get("refreshed_at", 0), weight
        )
        beta = state.get("megasparse_sste_beta")
        self.sste_beta = None if beta is None else torch.as_tensor(beta).clone()

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
        return {
            "megasparse_held_mask": held.to(torch.uint8),
            "megasparse_refreshed_at": torch.tensor([self.refreshed_at]),
        }

    def held_bytes(self) -> dict:
        step = {} if self._step is None else self._step.held_bytes()
        if (
            self.held_mask_bits is not None
            and self._step is not None
            and step.get("mask") is not None
            and self._step.mask_bits is self.held_mask_bits
        ):
            return step
        if self.held_mask_bits is not None:
            step["held_mask"] = _nbytes(self.held_mask_bits)
        return step


def _tp_group_of(weight, group):
    """quality: the group S-STE's beta is summed over: `group`, else Megatron's tensor-parallel
    group of a weight marked tensor-parallel (the expert TP group for expert weights), else None."""
    if group is not None:
        return group if group.size() > 1 else None
    if not getattr(weight, "tensor_model_parallel", False):
        return None
    try:
        from megatron.core import parallel_state
    except ImportError:
        return None
    if not parallel_state.model_parallel_is_initialized():
        return None
    if getattr(weight, "allreduce", True) is False and hasattr(
        parallel_state, "get_expert_tensor_parallel_group"
    ):
        group = parallel_state.get_expert_tensor_parallel_group(check_initialized=False)
    else:
        group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
    return group if group is not None and group.size() > 1 else None
