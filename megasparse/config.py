"""SparsityConfig: what a sparse layer prunes, how, and with which GEMM backend."""

import dataclasses
import enum
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Optional

WEIGHT_PATTERNS = (None, "2:4")
MASK_KINDS = ("1d", "transposable")
# the keys of megasparse.core.gradients.GRADIENT_RULES (a test checks; config imports no core)
GRADIENT_MODES = ("ste", "masked", "srste", "masked_decay", "sste")
WGRAD_SPARSITY = (None, "mvue")
BACKENDS = ("auto", "dense", "cusparselt", "cutlass")
NONFINITE_POLICIES = ("propagate", "error")
ACTIVATION_FUNCTIONS = (None, "squared_relu")
FP8_FORMATS = (None, "hybrid", "e4m3")  # the local FP8 path (TE layers use TE's fp8_autocast)


class Fp8Order(str, enum.Enum):
    """Which comes first of 2:4 pruning and FP8 quantization of a weight. A str: configs, flags
    and checkpoints hold the value strings, which compare equal to the members."""

    PRUNE_THEN_QUANTIZE = "prune-then-quantize"  # mask of W, e4m3 of W*M (amax after pruning)
    QUANTIZE_THEN_PRUNE = "quantize-then-prune"  # e4m3 of W (its amax), mask of the e4m3 values

    def __str__(self):
        return self.value

    __format__ = str.__format__


FP8_ORDERS = tuple(order.value for order in Fp8Order)
TARGETS = (
    "qkv",
    "proj",
    "fc1",
    "fc2",
    "experts",
    "shared_experts",
)  # what sparsify_spec can sparsify
DEFAULT_TARGETS = ("fc1", "fc2", "experts")
ACTIVATION_TILE_ROWS = 64  # rows per kernel program for 2:4 activations (no effect on the result)


class ActivationPattern(NamedTuple):
    """A V:N:M activation pattern: per block of `v` rows and `m` columns, the 4 columns of largest
    L2 norm over the block are chosen (shared by the v rows); n = 2 keeps the 2 largest |a| of each
    row inside them (VENOM), n = 4 keeps all 4. "2:4" is (64, 2, 4)."""

    v: int
    n: int
    m: int

    @property
    def is_2_4(self) -> bool:
        """2:4 per row: a sparse-tensor-core operand (every block keeps all 4 columns of a group)."""
        return self.m == 4

    @property
    def compacts(self) -> bool:
        """Whether the GEMMs gather the 4 chosen columns of every M (M >= 8): they skip 1 - 4/M."""
        return self.m >= 8

    @property
    def density(self) -> float:
        return self.n / self.m


def parse_activation_pattern(pattern: Optional[str], field: str = "activations"):
    """None -> None; "2:4" -> (64, 2, 4); "V:N:M" -> ActivationPattern(V, N, M) with N in {2, 4}.

    V and M powers of two; N = 2 needs M >= 4 (2:4 is V:2:4 for any V), N = 4 needs M >= 8."""
    if pattern is None:
        return None
    if pattern == "2:4":
        return ActivationPattern(ACTIVATION_TILE_ROWS, 2, 4)
    parts = pattern.split(":") if isinstance(pattern, str) else []
    if len(parts) == 3 and all(p.isdigit() for p in parts) and parts[1] in ("2", "4"):
        v, n, m = int(parts[0]), int(parts[1]), int(parts[2])
        if v >= 1 and m >= 2 * n and not (v & (v - 1)) and not (m & (m - 1)):
            return ActivationPattern(v, n, m)
    raise ValueError(
        f"SparsityConfig.{field} must be None, '2:4' or 'V:N:M' with V and M powers of two, N = 2 "
        f"(M >= 4) or N = 4 (M >= 8), e.g. '64:2:8' or '64:4:16'; got {pattern!r}"
    )


def _choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"SparsityConfig.{field} must be one of {list(allowed)}, got {value!r}")


def check_decay(field: str, value, example: str) -> None:
    """A decay coefficient is a finite real number >= 0 (not a bool, not NaN or inf)."""
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not is_number:
        raise ValueError(
            f"SparsityConfig.{field} must be a finite number >= 0 such as {example}, got "
            f"{value!r} ({type(value).__name__}); pass a float, e.g. float(value)"
        )
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"SparsityConfig.{field} must be a finite number >= 0 such as {example}, got {value!r}"
        )


@dataclass
class SparsityConfig:
    """Sparsity of one layer (each layer keeps its own copy, so `enabled` can be flipped per layer).

    weights: "2:4" prunes the weight with a 2:4 magnitude mask; None keeps it dense.
    mask: "1d" (2 of every 4 along the input dim) or "transposable" (2:4 along both dims, exact
        optimum per 4x4 tile, so the backward input-gradient GEMM is sparse too).
    gradient: how the dense master weight is updated. "ste": the dense gradient; "masked": the
        gradient times the mask; "srste": dense gradient + srste_decay * (1 - mask) * W
        (Zhou et al. 2021). Per optimizer step: "masked" is exact for any number of micro-batches,
        and the srste term is added once per step (in the step's first backward).
    backend: "auto" (fastest available, else "dense" with one warning), "dense" (masked dense
        GEMM, exact, any device), "cusparselt" or "cutlass" (sparse tensor cores, CUDA sm80+).
    mask_refresh_interval: 1 recomputes the mask from the dense weight at every optimizer step;
        N > 1 holds it for N steps. A step is an optimizer step (found without user calls), or
        the iteration set by `set_sparsity_iteration` / SparsitySchedule (megasparse.core.weight_state).
    enabled: runtime switch; False makes the layer compute exactly like its dense parent.
    activations: None, "2:4" or "V:N:M" (VENOM "64:2:8" keeps 25%; "64:4:16" keeps 4 whole
        columns of every 16 per 64-token block, 25%): sparsify the FFN activation, i.e. the input of
        fc2 (a SparseRowParallelLinear, or a sparse TERowParallelLinear on the TE spec, bf16/fp16
        only). Column layers ignore it. With `SparseMLP` the Squared-ReLU is fused with the
        sparsifier and fc1's input gradient uses the activation's sparsity; with M >= 8 the
        activation is held compacted and the GEMMs gather its chosen columns.
    activation_wgrad: None (exact weight gradients) or "V:N:M" applied along tokens ("both ways"):
        the operand of fc2's and fc1's weight-gradient GEMM (A and dH) is sparsified again along
        tokens, per block of V neurons keeping 4 of every M tokens, so those GEMMs skip work too.
        An approximation of the weight gradient (biased top-k), see docs/quality.md.
    activation_function: None uses Megatron's `config.activation_func` (Squared-ReLU is detected
        and fused); "squared_relu" forces Squared-ReLU in `SparseMLP`.
    nonfinite_weights: "propagate" keeps NaN/Inf weights in the mask so they reach the loss as
        in a dense layer (no host sync); "error" raises FloatingPointError when the mask is
        computed from a weight with NaN/Inf (one host sync per mask computation).
    hold_backward_weight: the input-gradient GEMM's weight operand, held for the whole optimizer
        step (None, the default, or True) or rebuilt from W and the bit-packed mask in each
        backward (False: memory over time). Held, it is the compressed (W*M)^T for transposable
        masks (+0.56x of the dense weight's bytes) and W*M for 1d masks (+1.0x: one weight-sized
        tensor per sparse weight); rebuilt, every backward pays an unpack + multiply of ~10 bytes
        of memory traffic per weight element (1d; ~2.4 GB, ~0.9 ms on an H100, per h8192 x
        ffn28672 weight and micro-batch), or a compression of (W*M)^T (transposable).
        Numerically identical either way.

    Training-quality options (all off by default; megasparse.core.gradients, megasparse.core.mvue):
    gradient="masked_decay": Hu et al., ICML 2024 ("Accelerating Transformer Pre-training with
        2:4 Sparsity"): the step's gradient + masked_decay_factor * (1 - M) * W, added once per
        optimizer step (in the step's first backward, whatever the number of micro-batches).
    masked_decay_factor: lambda_W of masked_decay (default 6e-5, the paper's GPT-2 124M value).
    gradient="sste": S-STE, Hu, Zhu, Chen, NeurIPS 2024: the forward weight is beta * S(W), S the
        2:4 soft threshold (continuous in W), beta a fixed per-tensor scalar computed once at the
        layer's first sparse forward (summed over the TP group, so TP-invariant) and kept in the
        layer's extra state; straight-through gradient (the dense W gets dL/d(beta S(W))).
        Needs mask="1d" and mask_refresh_interval=1 (S(W) is recomputed from W every step).
    wgrad_sparsity="mvue": the weight-gradient GEMM dW = dY^T X uses MVUE-pruned dY (2:4 along
        tokens, unbiased: Chmiel et al., ICLR 2023) as its sparse operand, while the layer prunes
        its weight. Random draws: one torch.Generator per weight and optimizer step, seeded from
        (wgrad_seed, global rank, weight index, step) on the device (no host sync).
    wgrad_seed: the base seed of those draws.
    fp8: the local spec's FP8 path (megasparse.fp8.linear), for Megatron's local layers, which
        have no FP8 of their own: None (off), "hybrid" (e4m3 forward, e5m2 gradients) or "e4m3",
        TE's formats with current per-tensor scaling (Float8CurrentScaling's math). The layer's
        GEMMs run in FP8 in every phase: FP8 2:4 (cuSPARSELt on sm90, emulated elsewhere) while it
        prunes, dense FP8 otherwise (weights=None, a dense phase, enabled=False). Output in the
        input's dtype (the autocast dtype under autocast). Sparse TE linears refuse it: they follow
        TE's fp8_autocast (--fp8-format) instead.
    fp8_order: "prune-then-quantize" (mask of W, e4m3 of W*M with the amax after pruning) or
        "quantize-then-prune" (e4m3 of W with its amax, mask of the quantized values: FP8's
        coarse grid makes ties, broken towards the lower index). Needs fp8.
    track_flip_rate: keep the previous mask (bit-packed) and count, on the device, the share of
        mask entries that changed at every mask computation (Hu et al. ICML 2024's flip rate):
        `layer.sparsity_stats()["flip_rate"]`.
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
    activation_wgrad: Optional[str] = None
    hold_backward_weight: Optional[bool] = None
    # training-quality options, see the docstring
    masked_decay_factor: float = 6e-5
    wgrad_sparsity: Optional[str] = None
    wgrad_seed: int = 0
    track_flip_rate: bool = False
    fp8: Optional[str] = None
    fp8_order: str = Fp8Order.PRUNE_THEN_QUANTIZE.value

    def __post_init__(self):
        _choice("weights", self.weights, WEIGHT_PATTERNS)
        _choice("mask", self.mask, MASK_KINDS)
        _choice("gradient", self.gradient, GRADIENT_MODES)
        _choice("backend", self.backend, BACKENDS)
        _choice("nonfinite_weights", self.nonfinite_weights, NONFINITE_POLICIES)
        _choice("activation_function", self.activation_function, ACTIVATION_FUNCTIONS)
        parse_activation_pattern(self.activations)
        self._validate_activation_wgrad()
        interval = self.mask_refresh_interval
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(
                f"SparsityConfig.mask_refresh_interval must be an int >= 1 (1 = every step), "
                f"got {interval!r} ({type(interval).__name__})"
            )
        check_decay("srste_decay", self.srste_decay, "2e-4")
        if not (self.hold_backward_weight is None or isinstance(self.hold_backward_weight, bool)):
            raise ValueError(
                "SparsityConfig.hold_backward_weight must be None (hold, the default), True "
                "(hold) or False (rebuild in each backward), "
                f"got {self.hold_backward_weight!r}"
            )
        if not isinstance(self.enabled, bool):
            raise ValueError(f"SparsityConfig.enabled must be True or False, got {self.enabled!r}")
        self._validate_quality_options()
        self._validate_fp8()
        object.__setattr__(self, "mask_rule_revision", 0)
        object.__setattr__(self, "_validated", True)

    def _validate_quality_options(self):
        """Checks of the training-quality options."""
        _choice("wgrad_sparsity", self.wgrad_sparsity, WGRAD_SPARSITY)
        check_decay("masked_decay_factor", self.masked_decay_factor, "6e-5")
        if not isinstance(self.wgrad_seed, int) or isinstance(self.wgrad_seed, bool):
            raise ValueError(f"SparsityConfig.wgrad_seed must be an int, got {self.wgrad_seed!r}")
        if not isinstance(self.track_flip_rate, bool):
            raise ValueError(
                f"SparsityConfig.track_flip_rate must be True or False, "
                f"got {self.track_flip_rate!r}"
            )
        if self.gradient == "sste" and self.mask != "1d":
            raise ValueError(
                "SparsityConfig(gradient='sste') soft-thresholds groups of 4 "
                "along the input dim, which is the '1d' mask; got "
                f"mask={self.mask!r}. Use mask='1d', or another gradient mode "
                "with the transposable mask."
            )
        if self.gradient == "sste" and self.mask_refresh_interval != 1:
            raise ValueError(
                "SparsityConfig(gradient='sste') recomputes its continuous pruning "
                "S(W) from W at every step, so it cannot hold a mask; got "
                f"mask_refresh_interval={self.mask_refresh_interval}. Use 1."
            )

    def _validate_activation_wgrad(self):
        wgrad = parse_activation_pattern(self.activation_wgrad, "activation_wgrad")
        if wgrad is None:
            return
        pattern = parse_activation_pattern(self.activations)
        if pattern is None or not pattern.compacts:
            raise ValueError(
                f"SparsityConfig.activation_wgrad={self.activation_wgrad!r} sparsifies the weight "
                "gradients of a compacted activation along tokens, but activations="
                f"{self.activations!r} is not one (it needs 'V:N:M' with M >= 8, e.g. '64:4:16'); "
                "set such activations or activation_wgrad=None"
            )
        if not wgrad.compacts:
            raise ValueError(
                f"SparsityConfig.activation_wgrad={self.activation_wgrad!r} must keep 4 of every "
                "M >= 8 tokens ('V:N:M' with M >= 8, e.g. '64:4:8'): the weight-gradient GEMMs "
                "gather the kept tokens"
            )
        if self.wgrad_sparsity is not None:
            raise ValueError(
                f"SparsityConfig.activation_wgrad={self.activation_wgrad!r} replaces the weight-"
                f"gradient GEMM that wgrad_sparsity={self.wgrad_sparsity!r} would prune: choose "
                "one (set wgrad_sparsity=None or activation_wgrad=None)"
            )
        if self.fp8 is not None:
            raise ValueError(
                f"SparsityConfig(fp8={self.fp8!r}): the FP8 path's weight-gradient GEMMs are dense "
                "FP8 GEMMs, which do not take both-ways weight gradients; set activation_wgrad=None"
            )

    def _validate_fp8(self):
        _choice("fp8", self.fp8, FP8_FORMATS)
        _choice("fp8_order", self.fp8_order, FP8_ORDERS)
        object.__setattr__(self, "fp8_order", Fp8Order(self.fp8_order).value)  # a plain string
        if self.fp8_order == Fp8Order.QUANTIZE_THEN_PRUNE and self.fp8 is None:
            raise ValueError(
                "SparsityConfig(fp8_order='quantize-then-prune') orders pruning and FP8 "
                "quantization, but fp8 is None; set fp8='hybrid' or 'e4m3'"
            )
        if self.fp8 is not None and self.wgrad_sparsity is not None:
            raise ValueError(
                f"SparsityConfig(fp8={self.fp8!r}): the FP8 path's weight-gradient GEMM is a dense "
                "FP8 GEMM, which does not take the MVUE-pruned dY; set wgrad_sparsity=None"
            )
        if self.fp8_order == Fp8Order.QUANTIZE_THEN_PRUNE and self.gradient == "sste":
            raise ValueError(
                "SparsityConfig(gradient='sste') prunes by a soft threshold of W, not by a mask "
                "of the quantized weight; use fp8_order='prune-then-quantize' with sste"
            )

    def __setattr__(self, name, value):
        # Later changes (layer.sparsity.mask = ...) are validated too: check on a copy, then set.
        # A misspelt field (cfg.weigths = None) would be ignored silently: refuse it.
        if getattr(self, "_validated", False):
            if name in _FIELD_NAMES:
                dataclasses.replace(self, **{name: value})
                if name in _MASK_RULE_FIELDS and getattr(self, name) != value:
                    # a held mask of the old rule must not survive (see megasparse.core.weight_state)
                    object.__setattr__(self, "mask_rule_revision", self.mask_rule_revision + 1)
            elif not name.startswith("_"):
                raise AttributeError(
                    f"SparsityConfig has no field {name!r}; the fields are {sorted(_FIELD_NAMES)}"
                )
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
        """The ActivationPattern (v, n, m) of `activations` (2:4 is (64, 2, 4)), or None."""
        return parse_activation_pattern(self.activations)

    @property
    def activation_wgrad_pattern(self):
        """The ActivationPattern applied along tokens for both-ways weight gradients, or None."""
        return parse_activation_pattern(self.activation_wgrad, "activation_wgrad")


_FIELD_NAMES = {f.name for f in dataclasses.fields(SparsityConfig)}
_MASK_RULE_FIELDS = ("weights", "mask", "enabled", "nonfinite_weights", "fp8", "fp8_order")
