"""SparsitySchedule: dense warm-up, sparse phase, dense final phase, switched by iteration.

The phase is a pure function of the iteration, so a run resumed from a checkpoint lands in the
same phase as the uninterrupted run; the dense master weights are trained in every phase, so
nothing is lost at a switch. Held masks (mask_refresh_interval > 1) are part of the checkpoint
(see SparseColumn/RowParallelLinear) and refresh at the iterations the schedule passes in.
"""

import numbers
from dataclasses import dataclass
from typing import Optional

DENSE_WARMUP, SPARSE, DENSE_FINAL = "dense-warmup", "sparse", "dense-final"


def sparse_modules(model):
    """Every megasparse module (megasparse.interface.SparseModule) in `model` (any wrapper: DDP,
    Float16Module, a list of chunks)."""
    from megasparse.interface import is_sparse_module

    models = model if isinstance(model, (list, tuple)) else [model]
    return [m for chunk in models for m in chunk.modules() if is_sparse_module(m)]


@dataclass
class SparsitySchedule:
    """dense for iterations [0, dense_warmup_iters), sparse until train_iters - dense_final_iters, then dense."""

    dense_warmup_iters: int = 0
    dense_final_iters: int = 0
    train_iters: Optional[int] = None

    def __post_init__(self):
        for field in ("dense_warmup_iters", "dense_final_iters", "train_iters"):
            value = getattr(self, field)
            if value is None and field == "train_iters":
                continue
            # iteration counts only: a fraction of train_iters is the flags' job (schedule_from_args)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
                raise ValueError(
                    f"SparsitySchedule.{field} must be a whole number of iterations >= 0, got "
                    f"{value!r} ({type(value).__name__}); for a fraction of train_iters use "
                    "round(fraction * train_iters)"
                )
        if self.train_iters == 0:
            raise ValueError("SparsitySchedule.train_iters must be >= 1 (or None: no end)")
        if self.dense_final_iters and self.train_iters is None:
            raise ValueError(
                "SparsitySchedule: a dense final phase needs train_iters (where training ends)"
            )
        dense = self.dense_warmup_iters + self.dense_final_iters
        if self.train_iters is not None and dense and dense >= self.train_iters:
            raise ValueError(
                f"SparsitySchedule: dense warm-up ({self.dense_warmup_iters}) + dense final "
                f"({self.dense_final_iters}) = {dense} iterations, not fewer than train_iters "
                f"({self.train_iters}): no sparse iteration is left. Shorten the dense phases, or "
                "turn sparsity off for a dense run"
            )

    def phase(self, iteration: int) -> str:
        if iteration < self.dense_warmup_iters:
            return DENSE_WARMUP
        if self.train_iters is not None and iteration >= self.train_iters - self.dense_final_iters:
            return DENSE_FINAL
        return SPARSE

    def apply(self, model, iteration: int) -> str:
        """Put every sparse module of `model` in the phase of `iteration` (call once per iteration)."""
        phase = self.phase(iteration)
        sparse = phase == SPARSE
        for module in sparse_modules(model):
            if module.sparsity.enabled != sparse:
                module.sparsity.enabled = sparse
                if sparse:
                    module.reset_held_mask()  # a new sparse phase prunes the current dense weight
            module.set_sparsity_iteration(iteration)
        return phase
