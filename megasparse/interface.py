"""What every sparse module offers to schedules, specs, stats and printouts: the `SparseModule` protocol.

Implemented through megasparse.core.sparse_module.SparseModuleMixin by the sparse Megatron and TE
linears, the TE grouped experts and Fp8SparseLinear (the local expert MLPs hold sparse linears);
their statistics: megasparse.stats (megasparse.statistics).
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
            for _, weight_state in getattr(module, "sparse_weights", list)():
                weight_state.invalidate()
