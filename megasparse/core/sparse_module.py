"""SparseModuleMixin: what every sparse module does alike (config intake, masks, stats, iteration, reset, repr).

Used by the local linears (megasparse.megatron.layers), the TE linears (megasparse.te.linear), the
TE experts (megasparse.te.experts) and the FP8 layer (megasparse.fp8.layer). A module names its
pruned weights and their per-step states in `sparse_weights()`; a module whose children hold them
(experts) names the children in `_sparse_children()`. Everything else here works from those two.
"""

import dataclasses
from typing import Optional

import torch

from megasparse.config import SparsityConfig
from megasparse.core import cusparselt_search, speed_gate
from megasparse.core.warn import warn_once
from megasparse.core.backends import resolve_backend
from megasparse.core.weight_state import compute_mask


def take_sparsity(sparsity: Optional[SparsityConfig]) -> SparsityConfig:
    """A module's own copy of `sparsity` (the default config when None): schedules switch it per module.
    The environment switches are read here too, so a bad value fails at model construction, not
    at the first GPU GEMM."""
    if sparsity is not None and not isinstance(sparsity, SparsityConfig):
        raise TypeError(
            f"sparsity must be a megasparse.SparsityConfig, got {type(sparsity).__name__}"
        )
    speed_gate.enabled()
    cusparselt_search.enabled()
    return dataclasses.replace(sparsity) if sparsity is not None else SparsityConfig()


def describe(sparsity: SparsityConfig) -> str:
    """A short description for extra_repr: what is pruned now, and how."""
    parts = []
    if sparsity.weights is not None:
        parts.append(f"weights={sparsity.weights} {sparsity.mask} grad={sparsity.gradient}")
        if sparsity.mask_refresh_interval > 1:
            parts.append(f"hold={sparsity.mask_refresh_interval}")
    if sparsity.activations is not None:
        parts.append(f"activations={sparsity.activations}")
    if sparsity.fp8 is not None:
        parts.append(f"fp8={sparsity.fp8} {sparsity.fp8_order}")
    parts.append(f"backend={sparsity.backend}")
    if not sparsity.enabled:
        parts.append("disabled")
    return "(" + ", ".join(parts) + ")"


class SparseModuleMixin:
    """The SparseModule interface (megasparse.interface) from `sparse_weights()` and `_sparse_children()`.

    Put it before the torch module class in the bases: it overrides train() and extra_repr().
    """

    sparsity: SparsityConfig

    def _take_sparsity(self, sparsity: Optional[SparsityConfig]) -> SparsityConfig:
        self.sparsity = take_sparsity(sparsity)
        return self.sparsity

    def sparse_weights(self) -> list:
        """(weight, its per-step state) for each weight this module prunes itself ([] while constructed)."""
        return []

    def _states(self) -> list:
        return [state for _, state in self.sparse_weights()]

    def _sparse_children(self) -> list:
        """Sparse modules that hold this module's weights (experts' grouped linears)."""
        return []

    # --- the GEMM backend and the speed gate, shared by the local and TE linears -----------

    def backend_for(self, weight):
        """The GEMM backend for this weight under the layer's config (resolved once per backend
        name, device, dtype, shard shape and mask kind; 'auto' falls back to dense, once warned)."""
        key = (
            self.sparsity.backend,
            weight.device,
            weight.dtype,
            tuple(weight.shape),
            self.sparsity.mask,
        )
        backends = self.__dict__.setdefault("_backends", {})
        if key not in backends:
            backends[key] = resolve_backend(
                self.sparsity.backend, weight, self.sparsity.mask == "transposable"
            )
        return backends[key]

    def gated_roles(self, tokens: int, step, backend, group=None) -> tuple:
        """The GEMM roles where W*M runs sparse: all of them, except that backend='auto' on a GPU asks
        the speed gate (megasparse.core.speed_gate), which decides once per shard shape, dtype and token
        bucket for all layers alike (dense below its smallest bucket: 0 tokens is never timed)."""
        if not (step.pruned and speed_gate.applies(self.sparsity.backend, backend, step.weight)):
            if step.pruned and backend.name == "cusparselt" and cusparselt_search.enabled():
                warn_once(
                    f"megasparse: {cusparselt_search.SWITCH_ENV}=1 searches cuSPARSELt's "
                    "algorithm where the speed gate decides (backend='auto' with "
                    f"{speed_gate.SWITCH_ENV}=1); this layer (backend="
                    f"{self.sparsity.backend!r}) runs algorithm 0"
                )
            return speed_gate.ROLES
        return speed_gate.sparse_roles(type(self).__name__, step, backend, tokens, group)

    # --- the SparseModule interface (megasparse.interface) --------------------------------

    @torch.no_grad()
    def sparsity_mask(self, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The bool mask the module computes with now, shaped like the weight (all True when dense).

        Without `weight`: the mask of the module's first weight. Another tensor gets the mask this
        module's config would give it.
        """
        own = self.sparse_weights()
        if weight is None:
            if not own:
                raise ValueError(
                    f"megasparse: {type(self).__name__} has one mask per expert weight: pass the "
                    "weight, e.g. sparsity_mask(experts.linear_fc1.weight0)"
                )
            weight = own[0][0]
        for w, state in own:
            if w is weight:
                return state.current_mask(weight, self.sparsity)
        children = self._sparse_children()
        for child in children:
            if any(w is weight for w, _ in child.sparse_weights()):
                return child.sparsity_mask(weight)
        if children:
            raise ValueError("megasparse: that tensor is not one of this module's expert weights")
        if not self.sparsity.prunes_weights:
            return torch.ones_like(weight, dtype=torch.bool)
        if own:  # the rule of this module's state (its mask source under FP8 quantize-then-prune)
            return own[0][1].mask_of(weight, self.sparsity)
        return compute_mask(weight, self.sparsity)

    def sparsity_stats(self) -> dict:
        """Kept share of |W| under the current masks, bytes the per-step state holds, weight bytes,
        and (track_flip_rate) the flip rate, on this rank (module_stats)."""
        return module_stats(self)

    def set_sparsity_iteration(self, iteration: int) -> None:
        """Drive held masks by training iteration instead of by optimizer steps (used by schedules)."""
        for state in self._states():
            state.set_iteration(iteration)
        for child in self._sparse_children():
            child.set_sparsity_iteration(iteration)

    def reset_held_mask(self) -> None:
        """Forget held masks: the next forward prunes the current weights."""
        for state in self._states():
            state.invalidate(drop_held_mask=True)
        for child in self._sparse_children():
            child.reset_held_mask()

    def train(self, mode: bool = True):
        # a mode switch rebuilds the state at the next forward: EMA validation swaps the weights
        # through .data around eval() / train(), which no version counter sees
        if mode != self.training:
            for state in self._states():
                state.mode_switched(mode)
        return super().train(mode)

    def extra_repr(self) -> str:
        own = super().extra_repr()
        return (
            f"{own}, sparsity={describe(self.sparsity)}"
            if own
            else f"sparsity={describe(self.sparsity)}"
        )


def _sum(tensors):
    return tensors[0] if len(tensors) == 1 else torch.stack(tensors).sum()


@torch.no_grad()
def module_stats(module) -> dict:
    """kept_weight_l1: share of sum|W| the masks last computed with keep (a 0-dim tensor);
    state_bytes: what the per-step states hold; weight_bytes. Read-only: no step is built.

    With `SparsityConfig.track_flip_rate` also (Hu et al., ICML 2024, "Accelerating Transformer
    Pre-training with 2:4 Sparsity", Sec. 4.1): flip_rate, the share of the weights' mask entries
    that changed at the last mask computation (a 0-dim float32 tensor on the weight's device;
    None before the second mask), and flip_step, the step count of that mask.
    """
    pairs = [(w, state) for w, state in module.sparse_weights() if w is not None]
    held = [state.held_bytes() for _, state in pairs]
    if not pairs:
        return {"state_bytes": {}}
    abs_weights = [w.abs() for w, _ in pairs]
    total = _sum([a.sum() for a in abs_weights])
    # the masks the states last computed with: reading stats never builds a step
    masks = [state.last_mask(w, module.sparsity) for w, state in pairs]
    kept = _sum([(a * mask).sum() for a, mask in zip(abs_weights, masks)])
    # no division by a host-side test of total: where sum|W| = 0 the kept share is 1
    share = torch.where(
        total > 0, kept / total.clamp_min(torch.finfo(total.dtype).tiny), total.new_ones(())
    )
    stats = {
        "kept_weight_l1": share,
        "state_bytes": held[0]
        if len(held) == 1
        else {k: sum(h.get(k, 0) for h in held) for k in set().union(*held)},
        "weight_bytes": sum(w.numel() * w.element_size() for w, _ in pairs),
    }
    if module.sparsity.track_flip_rate:
        stats["flip_rate"], stats["flip_step"] = _flip_rate(pairs)
    return stats


def _flip_rate(pairs):
    """One state's (flip_rate, flip_step); for several, the share over all their mask entries."""
    states = [state for _, state in pairs]
    if len(states) == 1:
        return states[0].flip_rate, states[0].flip_step
    if any(state.flip_rate is None for state in states):
        return None, None
    sizes = [w.numel() for w, _ in pairs]
    changed = _sum([state.flip_rate * n for state, n in zip(states, sizes)])
    return changed / sum(sizes), max(state.flip_step for state in states)
