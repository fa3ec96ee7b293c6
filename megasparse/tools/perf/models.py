"""The shapes, recipes and training schedule the perf model projects (names -> what runs)."""

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ModelShape:
    """One transformer layer: non-gated Squared-ReLU FFN, causal flash attention at `seq`."""

    name: str
    hidden: int
    heads: int
    ffn: int
    seq: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


REFERENCE = ModelShape("h8192/ffn28672", 8192, 64, 28672)
# Llama-1B-like and Llama-7B-like with a non-gated Squared-ReLU FFN (7B's ffn 16384 matches the
# parameters of SwiGLU's 3 x 11008)
LLAMA_1B = ModelShape("Llama-1B-like", 2048, 16, 8192)
LLAMA_7B = ModelShape("Llama-7B-like", 4096, 32, 16384)
# --scope name -> (what it records, the shape)
SCOPES = {
    "ffn": ("ffn", REFERENCE),
    "layer": ("layer", REFERENCE),
    "layer_1b": ("layer", LLAMA_1B),
    "layer_7b": ("layer", LLAMA_7B),
}

# the sparse-then-dense schedule: shares of the optimizer steps in each phase
SCHEDULE = (("dense", 0.10), ("sparse", 0.70), ("dense", 0.20))


def schedule_ratio(sparse_ratio: float, schedule=SCHEDULE) -> float:
    """Speed-up over a whole run: dense steps cost the dense step, sparse steps 1 / sparse_ratio of it
    (a harmonic combination of the phases' speed-ups, weighted by their shares of steps)."""
    time = sum(
        share * (1.0 if phase == "dense" else 1.0 / sparse_ratio) for phase, share in schedule
    )
    return 1.0 / time


ACTIVATION_PATTERNS = ("64:2:8", "64:4:8", "64:2:16", "64:4:16", "64:4:32")
WGRAD_PATTERNS = ("64:4:8", "64:4:16")


@dataclass(frozen=True)
class Recipe:
    """What one FFN runs: the weights' 2:4 mask (None, "1d", "transposable"), the activation's pattern
    (None, "2:4", "V:N:M"), the both-ways weight-gradient pattern, FP8."""

    weights: Optional[str] = None
    activations: Optional[str] = None
    activation_wgrad: Optional[str] = None
    fp8: bool = False

    @property
    def name(self) -> str:
        weights = {None: "dense", "1d": "2:4 (1d)", "transposable": "2:4 (transposable)"}
        if self.fp8:
            return {None: "FP8 dense", "1d": "FP8 2:4", "transposable": "FP8 2:4 (transposable)"}[
                self.weights
            ]
        if self.activations is None:
            return "dense bf16" if self.weights is None else weights[self.weights]
        if self.activations == "2:4" and self.weights == "1d":
            return "2:4 + 2:4 act"
        name = f"{weights[self.weights]} + {self.activations} act"
        return name if self.activation_wgrad is None else f"{name} + wgrad {self.activation_wgrad}"

    @property
    def compacts(self) -> bool:
        """V:N:M with M >= 8: the activation speed path (gather/compact GEMMs)."""
        return self.activations not in (None, "2:4")


BASELINES = (
    Recipe(),
    Recipe("1d"),
    Recipe("transposable"),
    Recipe("1d", "2:4"),
    Recipe(None, "2:4"),
    Recipe(fp8=True),
    Recipe("1d", fp8=True),
    Recipe("transposable", fp8=True),
)
ACTIVATION_RECIPES = tuple(
    Recipe(weights, pattern, wgrad)
    for pattern in ACTIVATION_PATTERNS
    for wgrad in (None, *WGRAD_PATTERNS)
    for weights in ("transposable", "1d")
)
RECIPES = {r.name: r for r in BASELINES + ACTIVATION_RECIPES}


def recipe(value) -> Recipe:
    """A Recipe from itself or its name."""
    if isinstance(value, Recipe):
        return value
    if value not in RECIPES:
        raise ValueError(f"unknown recipe {value!r}; known: {', '.join(RECIPES)}")
    return RECIPES[value]


def mlp_config(hidden, ffn, dtype):
    """One bias-free Squared-ReLU MLP's TransformerConfig (the local and the TE-spec bench)."""
    from megatron.core.activations import squared_relu
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=8,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        activation_func=squared_relu,
        add_bias_linear=False,
        use_cpu_initialization=True,
    )
