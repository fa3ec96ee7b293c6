"""SparsityConfig: what a sparse layer prunes, how, and with which GEMM backend."""

import dataclasses
from dataclasses import dataclass
from typing import Optional

WEIGHT_PATTERNS = (None, "2:4")
MASK_KINDS = ("1d", "transposable")
GRADIENT_MODES = ("ste", "masked", "srste")
BACKENDS = ("auto", "dense", "cusparselt", "cutlass")
NONFINITE_POLICIES = ("propagate", "error")


def _choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"SparsityConfig.{field} must be one of {list(allowed)}, got {value!r}")


@dataclass
class SparsityConfig:
    """Sparsity of one layer (each layer keeps its own copy, so `enabled` can be flipped per layer).

    weights: "2:4" prunes the weight with a 2:4 magnitude mask; None keeps it dense.
    mask: "1d" (2 of every 4 along the input dim) or "transposable" (2:4 along both dims, exact
        optimum per 4x4 tile, so the backward input-gradient GEMM is sparse too).
    gradient: how the dense master weight is updated. "ste": the dense gradient; "masked": the
        gradient times the mask; "srste": dense gradient + srste_decay * (1 - mask) * W
        (Zhou et al. 2021). The srste term is added on every backward: with k
        gradient-accumulation micro-batches per step it is applied k times.
    backend: "auto" (fastest available, else "dense" with one warning), "dense" (masked dense
        GEMM, exact, any device), "cusparselt" or "cutlass" (sparse tensor cores, CUDA sm80+).
    mask_refresh_interval: 1 recomputes the mask from the dense weight on every forward;
        N > 1 holds it for N steps (a step is one training forward, or the iteration set by
        `set_sparsity_iteration`).
    enabled: runtime switch; False makes the layer compute exactly like its dense parent.
    nonfinite_weights: "propagate" keeps NaN/Inf weights in the mask so they reach the loss as
        in a dense layer (no host sync); "error" raises FloatingPointError when the mask is
        computed from a weight with NaN/Inf (one host sync per mask computation).
    """

    weights: Optional[str] = "2:4"
    mask: str = "1d"
    gradient: str = "ste"
    srste_decay: float = 2e-4
    backend: str = "auto"
    mask_refresh_interval: int = 1
    enabled: bool = True
    nonfinite_weights: str = "propagate"

    def __post_init__(self):
        _choice("weights", self.weights, WEIGHT_PATTERNS)
        _choice("mask", self.mask, MASK_KINDS)
        _choice("gradient", self.gradient, GRADIENT_MODES)
        _choice("backend", self.backend, BACKENDS)
        _choice("nonfinite_weights", self.nonfinite_weights, NONFINITE_POLICIES)
        if not isinstance(self.mask_refresh_interval, int) or self.mask_refresh_interval < 1:
            raise ValueError(
                f"SparsityConfig.mask_refresh_interval must be an int >= 1 (1 = every step), "
                f"got {self.mask_refresh_interval!r}"
            )
        if not self.srste_decay >= 0.0:
            raise ValueError(f"SparsityConfig.srste_decay must be >= 0, got {self.srste_decay!r}")
        if not isinstance(self.enabled, bool):
            raise ValueError(f"SparsityConfig.enabled must be True or False, got {self.enabled!r}")
        object.__setattr__(self, "_validated", True)

    def __setattr__(self, name, value):
        # Later changes (layer.sparsity.mask = ...) are validated too: check on a copy, then set.
        if getattr(self, "_validated", False) and name in _FIELD_NAMES:
            dataclasses.replace(self, **{name: value})
        object.__setattr__(self, name, value)

    @property
    def prunes_weights(self) -> bool:
        """True when the layer currently computes with a 2:4 weight."""
        return self.enabled and self.weights is not None


_FIELD_NAMES = {f.name for f in dataclasses.fields(SparsityConfig)}
