"""What every sparse module offers to schedules, specs, stats and printouts: the `SparseModule` protocol.

Implemented by the sparse Megatron linears, the sparse TE linears and the sparse expert modules.
"""

from typing import Optional, Protocol, runtime_checkable

import torch

from megasparse.config import SparsityConfig


@runtime_checkable
class SparseModule(Protocol):
    sparsity: SparsityConfig

    def sparsity_mask(self, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The bool mask the module computes with now (all True when dense)."""

    def sparsity_stats(self) -> dict:
        """Numbers about the module's sparsity on this rank (no host sync until read)."""

    def set_sparsity_iteration(self, iteration: int) -> None:
        """The training iteration (drives held masks and step boundaries)."""

    def reset_held_mask(self) -> None:
        """Forget held masks: the next forward prunes the current weights."""


def is_sparse_module(module) -> bool:
    return isinstance(getattr(module, "sparsity", None), SparsityConfig) and isinstance(module, SparseModule)


def describe(sparsity: SparsityConfig) -> str:
    """A short description for extra_repr: what is pruned now, and how."""
    parts = []
    if sparsity.weights is not None:
        parts.append(f"weights={sparsity.weights} {sparsity.mask} grad={sparsity.gradient}")
        if sparsity.mask_refresh_interval > 1:
            parts.append(f"hold={sparsity.mask_refresh_interval}")
    if sparsity.activations is not None:
        parts.append(f"activations={sparsity.activations}")
    parts.append(f"backend={sparsity.backend}")
    if not sparsity.enabled:
        parts.append("disabled")
    return "(" + ", ".join(parts) + ")"


@torch.no_grad()
def layer_stats(layer) -> dict:
    """kept_weight_l1: share of sum|W| the current mask keeps; state_bytes: what the per-step state holds."""
    weight = layer.weight
    mask = layer.sparsity_mask()
    total = weight.abs().sum()
    kept = (weight.abs() * mask).sum() / total if total > 0 else total.new_ones(())
    return {"kept_weight_l1": kept, "state_bytes": layer.weight_state.held_bytes(),
            "weight_bytes": weight.numel() * weight.element_size()}
