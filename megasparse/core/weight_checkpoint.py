"""Checkpoint I/O of a weight's per-step state: held masks, the step count and S-STE's beta.

The torch state_dict carries them in the module's `_extra_state` entry (`extra_state` /
`restore_extra_state`: keys megasparse_held_mask, refreshed_at, megasparse_step_count,
megasparse_sste_beta). Megatron dist checkpoints carry the held mask as a tensor sharded like
the weight, so TP resharding works, plus megasparse_refreshed_at (`sharded_entries` /
`parse_refreshed_at`); the layer adds S-STE's beta there. A restored held mask is checked against
the layer's mask rule at its first use and recomputed, with a warning, when it is not 2:4 there.
"""

from typing import Optional

import torch

from megasparse.core.warn import warn_once
from megasparse.core.masks import follows_pattern, pack_mask, unpack_mask


class WeightCheckpointMixin:
    """The checkpoint methods of SparseWeightState (megasparse.core.weight_state)."""

    def held_mask(self) -> Optional[torch.Tensor]:
        """The held mask as a bool tensor (None: no mask held)."""
        if self.held_mask_bits is None:
            return None
        return unpack_mask(self.held_mask_bits, self.held_shape)

    def extra_state(self, sparsity) -> Optional[dict]:
        """The module's `_extra_state` value: what a torch state_dict saves of this state."""
        state = {}
        if sparsity.mask_refresh_interval > 1:  # held masks: where in the interval the run is
            state["megasparse_step_count"] = self.step_count()
            if self.held_mask_bits is not None:
                state["megasparse_held_mask"] = self.held_mask()
                state["refreshed_at"] = self.refreshed_at
        if self.sste_beta is not None:  # S-STE's beta, fixed at the first sparse forward
            state["megasparse_sste_beta"] = self.sste_beta.detach().cpu().clone()
        return state or None  # None: exactly the parent's value

    def restore_extra_state(self, state, weight) -> None:
        """Restore what `extra_state` saved (held mask, step count, S-STE's beta); None or {}:
        nothing saved."""
        state = state if isinstance(state, dict) else {}
        self.restore_held_mask(
            state.get("megasparse_held_mask"),
            state.get("refreshed_at", 0),
            weight,
            state.get("megasparse_step_count"),
        )
        beta = state.get("megasparse_sste_beta")
        self.sste_beta = None if beta is None else torch.as_tensor(beta).clone()

    def restore_held_mask(self, mask, refreshed_at, weight, step_count=None) -> None:
        """Restore a held mask and the step count from a checkpoint. mask None, or of another
        shape: the next use recomputes it. step_count None: a checkpoint written before step
        counts were saved (the count resumes at the mask's refresh step, with a warning)."""
        self.invalidate()
        if step_count is not None:  # the run goes on where it was saved
            self.resume_step_count(step_count)
        if mask is None or weight is None or tuple(mask.shape) != tuple(weight.shape):
            self.held_mask_bits = None
            return
        self.held_mask_bits = pack_mask(mask.to(device=weight.device, dtype=torch.bool))
        self.held_shape = tuple(weight.shape)
        self.refreshed_at = int(refreshed_at)
        if step_count is None:
            warn_once(
                "megasparse: this checkpoint's held masks have no step count (written by an "
                "older megasparse); the step count resumes at each mask's refresh step, so the "
                "next mask refresh may come at another step than in the run that saved it. "
                "Checkpoints saved from now on carry the step count."
            )
            self.steps = max(self.steps, self.refreshed_at)  # held until the next refresh point
        self._rule = None  # a restored mask is not dropped by the first use's rule check
        self._held_unchecked = True  # but checked against the rule at its first use

    def sharded_entries(self, weight, sparsity) -> dict:
        """The held-mask tensors for a dist checkpoint (always present for held-mask layers).

        megasparse_refreshed_at is [refreshed_at, step count, 1]; checkpoints written before
        the step count was saved hold [refreshed_at] and load as [refreshed_at, 0, 0] (its
        sharded tensor allows a shape mismatch and zero-fills): `parse_refreshed_at`."""
        held = self.held_mask()
        if held is None:
            held = self.mask_of(weight, sparsity)
        return {
            "megasparse_held_mask": held.to(torch.uint8),
            "megasparse_refreshed_at": torch.tensor([self.refreshed_at, self.step_count(), 1]),
        }

    def _restored_mask_follows_rule(self, bits, weight, sparsity) -> bool:
        """A held mask from a checkpoint must be 2:4 under the layer's rule (checked once, one
        host sync); else it is recomputed from the weight, with a warning."""
        self._held_unchecked = False
        mask = unpack_mask(bits, weight.shape)
        if follows_pattern(mask, sparsity.mask):
            return True
        if sparsity.mask == "transposable" and follows_pattern(mask, "1d"):
            problem = "its transpose is not 2:4 (a 1d mask, e.g. saved by a mask='1d' layer)"
        else:
            problem = "some group of 4 along the input dim does not keep exactly 2"
        warn_once(
            f"megasparse: a held mask restored from a checkpoint for a weight "
            f"{tuple(weight.shape)} is not 2:4 under the layer's rule mask={sparsity.mask!r}: "
            f"{problem}. It is recomputed from the restored weight now."
        )
        return False


def parse_refreshed_at(entry):
    """(refreshed_at, step count or None) from a dist checkpoint's megasparse_refreshed_at."""
    values = [int(v) for v in entry.reshape(-1).tolist()]
    has_count = len(values) >= 3 and values[2] == 1
    return values[0], values[1] if has_count else None
