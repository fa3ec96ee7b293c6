"""Mask flip rate: the share of a weight's 2:4 mask entries that changed since its previous mask.

Hu et al., "Accelerating Transformer Pre-training with 2:4 Sparsity", ICML 2024, Sec. 4.1
(SparsityConfig.track_flip_rate). The new mask's bits are XOR-ed with the previous mask's and
counted on the device through a popcount table: no host sync.
"""

from typing import Optional

import torch

_POPCOUNT = {}  # bits set in each uint8 value, per device


def _popcount_table(device) -> torch.Tensor:
    table = _POPCOUNT.get(device)
    if table is None:
        values = torch.arange(256, device=device)
        table = sum((values >> k) & 1 for k in range(8)).to(torch.int32)
        _POPCOUNT[device] = table
    return table


class MaskFlips:
    """The flip rate of one weight's masks, updated at every mask computation."""

    def __init__(self):
        self.prev_bits = None  # the previous mask (megasparse.core.masks.pack_mask)
        self.rate: Optional[torch.Tensor] = None  # share changed at the last mask (0-dim)
        self.step = None  # the step count of that mask
        self._shape = None

    def record(self, bits: torch.Tensor, shape, step: int) -> None:
        """A new mask (packed bits of a mask of `shape`) computed at step count `step`."""
        prev = self.prev_bits
        if (
            prev is not None
            and prev.shape == bits.shape
            and prev.device == bits.device
            and self._shape == tuple(shape)
        ):
            changed = _popcount_table(bits.device)[(prev ^ bits).long()].sum(dtype=torch.int64)
            numel = 1
            for size in shape:
                numel *= size
            self.rate = changed.to(torch.float32) / numel
            self.step = step
        self.prev_bits, self._shape = bits, tuple(shape)
