"""The model's sparsity statistics, `megasparse.stats(model)`: every sparse module's numbers by name.

Everything stays a device tensor: nothing here syncs with the host; the caller reads the numbers
when it logs (one `torch.stack(...).tolist()` for all of them). `stats(model)` itself only finds
the modules: each one's numbers are computed when they are read.
"""

from collections.abc import Mapping
from typing import Optional

import torch


def _step_flip_rate(state) -> Optional[torch.Tensor]:
    """The flip rate of this step's mask: computed now (the last flip rate), held or the first
    mask (0), or None before any mask."""
    if state.flip_rate is not None and state.flip_step == state.steps:
        return state.flip_rate
    if state.flip_prev_bits is not None:
        return torch.zeros((), device=state.flip_prev_bits.device)  # held: no flips
    return None


class ModelStats(Mapping):
    """{module name: its `sparsity_stats()`} for every module of the model that prunes weights
    (SparsityConfig.weights set), on this rank. Each entry is computed when first read; values are
    device tensors (reading them syncs)."""

    def __init__(self, weight_modules: dict, sparse_modules: list):
        self._weight_modules = weight_modules
        self._sparse_modules = sparse_modules
        self._entries = {}

    def __getitem__(self, name: str) -> dict:
        if name not in self._entries:
            self._entries[name] = self._weight_modules[name].sparsity_stats()
        return self._entries[name]

    def __iter__(self):
        return iter(self._weight_modules)

    def __len__(self) -> int:
        return len(self._weight_modules)

    def mean(self, key: str) -> Optional[torch.Tensor]:
        """The mean of `key` ("kept_weight_l1", "flip_rate") over the modules that have it, or None."""
        values = [entry[key] for entry in self.values() if entry.get(key) is not None]
        if not values:
            return None
        return torch.stack([v.float().reshape(()).to(values[0].device) for v in values]).mean()

    def step_flip_rate(self) -> Optional[torch.Tensor]:
        """Mean flip rate of this step's masks over the weights pruned now with track_flip_rate
        (0 for a held mask and for a first mask), or None when none is pruned now."""
        rates = []
        for module in self._weight_modules.values():
            if module.sparsity.prunes_weights and module.sparsity.track_flip_rate:
                rates += [_step_flip_rate(state) for _, state in module.sparse_weights()]
        rates = [rate for rate in rates if rate is not None]
        return torch.stack(rates).mean() if rates else None

    def activation_sums(self) -> Optional[torch.Tensor]:
        """float64 [exact zeros, sum|a|, dropped sum|a|, elements] of the sparsified FFN activations
        since their last reset, summed over the layers (add them over ranks before dividing), or
        None when nothing was measured."""
        sums = [
            counter.sums
            for counter in (getattr(m, "activation_counter", None) for m in self._sparse_modules)
            if counter is not None and counter.sums is not None
        ]
        return torch.stack(sums).sum(0) if sums else None


def stats(model) -> ModelStats:
    """Sparsity statistics of `model` (a module, a wrapper such as DDP, or a list of Megatron's model
    chunks): `ModelStats`, named as `named_modules()` names them (prefixed by the chunk index when
    there are several chunks). No host sync until a value is read."""
    from megasparse.interface import is_sparse_module

    models = model if isinstance(model, (list, tuple)) else [model]
    weight_modules, sparse = {}, []
    for chunk_index, chunk in enumerate(models):
        for name, module in chunk.named_modules():
            if not is_sparse_module(module):
                continue
            sparse.append(module)
            owns = any(w is not None for w, _ in getattr(module, "sparse_weights", list)())
            if owns and module.sparsity.weights is not None:
                weight_modules[f"{chunk_index}.{name}" if len(models) > 1 else name] = module
    return ModelStats(weight_modules, sparse)
