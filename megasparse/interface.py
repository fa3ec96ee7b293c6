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
    return isinstance(getattr(module, "sparsity", None), SparsityConfig) and isinstance(
        module, SparseModule
    )


def weights_changed(model) -> None:
    """Rebuild every sparse module's state from its current weights at its next forward.

    Call it after writing weights where megasparse cannot see it: through `.data` with the storage
    kept (a hand-written update `p.data -= lr * p.grad`, `p.data.copy_(ema)`) outside an optimizer
    step and a train()/eval() switch. In-place updates under torch.no_grad(), new storage and config
    changes are seen without it (the step-boundary rule in megasparse.core.weight_state). `model`: a
    module or a list of modules (Megatron's model chunks). It is not a step boundary: held masks are kept (a new mask:
    `reset_held_mask()`), and the step's srste / masked_decay term is not added again.
    """
    models = model if isinstance(model, (list, tuple)) else [model]
    for chunk in models:
        for module in chunk.modules():
            state = getattr(module, "weight_state", None)
            states = getattr(module, "weight_states", None) or ([state] if state else [])
            for weight_state in states:
                weight_state.invalidate()


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


@torch.no_grad()
def layer_stats(layer) -> dict:
    """kept_weight_l1: share of sum|W| the current mask keeps (a 0-dim tensor); state_bytes: what
    the per-step state holds; weight_bytes.

    With `SparsityConfig.track_flip_rate` also (Hu et al., ICML 2024, "Accelerating Transformer
    Pre-training with 2:4 Sparsity", Sec. 4.1): flip_rate, the share of the weight's mask entries
    that changed at the last mask computation (a 0-dim float32 tensor on the weight's device;
    None before the second mask), and flip_step, the step count of that mask. Nothing here syncs
    with the host: the caller reads the tensors when it logs.
    """
    weight = layer.weight
    state = layer.weight_state
    total = weight.abs().sum()
    # no division by a host-side test of total: where sum|W| = 0 the kept share is 1
    kept = torch.where(
        total > 0,
        (weight.abs() * layer.sparsity_mask()).sum()
        / total.clamp_min(torch.finfo(total.dtype).tiny),
        total.new_ones(()),
    )
    stats = {
        "kept_weight_l1": kept,
        "state_bytes": state.held_bytes(),
        "weight_bytes": weight.numel() * weight.element_size(),
    }
    if layer.sparsity.track_flip_rate:
        stats["flip_rate"], stats["flip_step"] = state.flip_rate, state.flip_step
    return stats
