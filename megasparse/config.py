"""SparsityConfig: what a sparse layer prunes, how, and with which GEMM backend."""

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Optional

WEIGHT_PATTERNS = (None, "2:4")
MASK_KINDS = ("1d", "transposable")
GRADIENT_MODES = ("ste", "masked", "srste")
BACKENDS = ("auto", "dense", "cusparselt", "cutlass")
NONFINITE_POLICIES = ("propagate", "error")
ACTIVATION_FUNCTIONS = (None, "squared_relu")
TARGETS = ("qkv", "proj", "fc1", "fc2", "experts", "shared_experts")  # what sparsify_spec can sparsify
DEFAULT_TARGETS = ("fc1", "fc2", "experts")
ACTIVATION_TILE_ROWS = 64  # rows per kernel program for 2:4 activations (no effect on the result)


def parse_activation_pattern(pattern: Optional[str]):
    """None -> None; "2:4" -> (64, 4); "V:2:M" -> (V, M). 2:4 is V:2:4 for any V."""
    if pattern is None:
        return None
    if pattern == "2:4":
        return ACTIVATION_TILE_ROWS, 4
    parts = pattern.split(":") if isinstance(pattern, str) else []
    if len(parts) == 3 and all(p.isdigit() for p in parts) and parts[1] == "2":
        v, m = int(parts[0]), int(parts[2])
        if v >= 1 and m >= 4 and not (v & (v - 1)) and not (m & (m - 1)):
            return v, m
    raise ValueError(
        f"SparsityConfig.activations must be None, '2:4' or 'V:2:M' with V and M powers of two and "
        f"M >= 4 (e.g. '64:2:8'), got {pattern!r}"
    )


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
    activations: None, "2:4" or "V:2:M" (VENOM, e.g. "64:2:8" keeps 25%): sparsify the FFN
        activation, i.e. the input of fc2 (a SparseRowParallelLinear). Column layers ignore it.
        With `SparseMLP` the Squared-ReLU is fused with the sparsifier and fc1's input gradient
        uses the activation's sparsity.
    activation_function: None uses Megatron's `config.activation_func` (Squared-ReLU is detected
        and fused); "squared_relu" forces Squared-ReLU in `SparseMLP`.
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
    activations: Optional[str] = None
    activation_function: Optional[str] = None

    def __post_init__(self):
        _choice("weights", self.weights, WEIGHT_PATTERNS)
        _choice("mask", self.mask, MASK_KINDS)
        _choice("gradient", self.gradient, GRADIENT_MODES)
        _choice("backend", self.backend, BACKENDS)
        _choice("nonfinite_weights", self.nonfinite_weights, NONFINITE_POLICIES)
        _choice("activation_function", self.activation_function, ACTIVATION_FUNCTIONS)
        parse_activation_pattern(self.activations)
        interval = self.mask_refresh_interval
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(
                f"SparsityConfig.mask_refresh_interval must be an int >= 1 (1 = every step), "
                f"got {interval!r} ({type(interval).__name__})"
            )
        decay = self.srste_decay
        is_number = isinstance(decay, numbers.Real) and not isinstance(decay, bool)
        if not is_number or not math.isfinite(decay) or decay < 0:
            raise ValueError(
                f"SparsityConfig.srste_decay must be a finite number >= 0 such as 2e-4, "
                f"got {decay!r} ({type(decay).__name__}); pass a float, e.g. float(value)"
            )
        if not isinstance(self.enabled, bool):
            raise ValueError(f"SparsityConfig.enabled must be True or False, got {self.enabled!r}")
        object.__setattr__(self, "_validated", True)

    def __setattr__(self, name, value):
        # Later changes (layer.sparsity.mask = ...) are validated too: check on a copy, then set.
        # A misspelt field (cfg.weigths = None) would be ignored silently: refuse it.
        if getattr(self, "_validated", False):
            if name in _FIELD_NAMES:
                dataclasses.replace(self, **{name: value})
            elif not name.startswith("_"):
                raise AttributeError(
                    f"SparsityConfig has no field {name!r}; the fields are {sorted(_FIELD_NAMES)}")
        object.__setattr__(self, name, value)

    @property
    def prunes_weights(self) -> bool:
        """True when the layer currently computes with a 2:4 weight."""
        return self.enabled and self.weights is not None

    @property
    def sparsifies_activations(self) -> bool:
        """True when the FFN activation (fc2's input) is currently sparsified."""
        return self.enabled and self.activations is not None

    @property
    def activation_pattern(self):
        """(V, M) of the activation pattern (2:4 is (64, 4)), or None."""
        return parse_activation_pattern(self.activations)


_FIELD_NAMES = {f.name for f in dataclasses.fields(SparsityConfig)}
