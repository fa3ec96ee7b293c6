"""Sparse local MoE experts: drop-ins for Megatron-core's SequentialMLP, with per-expert 2:4 masks.

(Transformer Engine's grouped experts: megasparse.te.experts.SparseTEGroupedMLP.)

SparseSequentialMLP
    Megatron's SequentialMLP whose experts have SparseColumn/RowParallelLinear fc1/fc2 (each
    expert its own masks) and SparseMLP's fused activation sparsity. Same constructor (plus an
    optional `sparsity=` that makes plain Megatron linears sparse), same forward contract, same
    parameters and sharded_state_dict: dense and sparse expert checkpoints are interchangeable.
    Each expert's GEMMs run on the sparse backend (cuSPARSELt / CUTLASS) when there is one.

SparseGroupedMLP
    The same module and parameters as SparseSequentialMLP, but the forward runs all local experts at
    once (megasparse.megatron.grouped_gemm): each expert whose token count the speed gate runs
    sparse runs its own 2:4 GEMMs (cuSPARSELt, its compressed W*M built once per optimizer step),
    the others one grouped GEMM per product (torch._grouped_mm: forward, input gradient, weight
    gradient) on their stacked masked weights: one launch for many small experts. It needs
    grouped-GEMM-friendly shapes (hidden and ffn per rank 16-byte aligned), fp32 / bf16 / fp16 and,
    on CUDA, sm90+; a non-gated activation without bias-activation fusion and without FP8. Anything
    else falls back to SparseSequentialMLP's per-expert loop, and so does a compacted activation
    (V:N:M with M >= 8, while it sparsifies): each expert then runs SparseMLP's compact path on its
    own tokens (there is no grouped gather-GEMM), so no V-token block mixes two experts and the
    GEMMs skip 1 - 4/M of their work.
"""

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from megasparse.core.activation_sparsity import ActivationStats
from megasparse.megatron.compat import with_sparse_linears
from megasparse.megatron.mlp import install_activation_sparsity
from megasparse.core.backends import BACKENDS
from megasparse.core.weight_state import refuse_graph_capture
from megasparse.megatron.grouped_gemm import (
    ExpertGemms,
    StackedWeights,
    can_group,
    expert_plans,
    grouped_ffn,
    counts_for,
    run_forward_pre_hooks,
    sparse_activation,
)


class SparseSequentialMLP(SequentialMLP):
    def __init__(self, num_local_experts, config, submodules, *args, sparsity=None, **kwargs):
        if sparsity is not None:
            submodules = with_sparse_linears(submodules, sparsity)
        super().__init__(num_local_experts, config, submodules, *args, **kwargs)
        for expert in self.local_experts:
            install_activation_sparsity(expert)
        self.grouped_activation_stats = (
            ActivationStats()
        )  # what SparseGroupedMLP's forward measures

    def activation_stats(self, reset: bool = False) -> dict:
        """Activation statistics summed over the local experts since the last reset (this rank)."""
        total = ActivationStats()
        sources = [
            e.linear_fc2.activation_counter
            for e in self.local_experts
            if hasattr(e.linear_fc2, "activation_counter")
        ]
        for stats in sources + [self.grouped_activation_stats]:
            if stats.sums is not None:
                total.add(stats.sums)
            if reset:
                stats.reset()
        return total.as_dict()


def compacts_now(sparsity) -> bool:
    """Whether the activation is held compacted now (V:N:M with M >= 8, in a sparse phase)."""
    return sparsity.sparsifies_activations and sparsity.activation_pattern.compacts


class SparseGroupedMLP(SparseSequentialMLP):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._stacked = {"linear_fc1": StackedWeights(), "linear_fc2": StackedWeights()}

    def _can_group(self, x) -> bool:
        fc1, fc2 = self.local_experts[0].linear_fc1, self.local_experts[0].linear_fc2
        return (
            hasattr(fc1, "sparsity")
            and hasattr(fc2, "sparsity")
            and fc1.sparsity.fp8 is None  # the FP8 path runs in the experts' own (local) linears
            and fc2.sparsity.fp8 is None
            and not compacts_now(fc2.sparsity)  # each expert runs SparseMLP's compact path
            and can_group(self.config, x, fc1.weight, fc2.weight)
        )

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x = permuted_local_hidden_states
        first = self.local_experts[0]  # before the dense shortcuts: any phase could be sparse
        linears = (first.linear_fc1, first.linear_fc2)
        refuse_graph_capture(x, *[fc.sparsity for fc in linears if hasattr(fc, "sparsity")])
        if not self._can_group(x):
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        fc1s = [e.linear_fc1 for e in self.local_experts]
        fc2s = [e.linear_fc2 for e in self.local_experts]
        plain = self.local_experts[0].activation_func
        plain = getattr(plain, "activation", plain)  # the function under SparseMLP's hook
        counts = counts_for([self._backend(fc) for fc in fc1s + fc2s], tokens_per_expert)
        y = grouped_ffn(
            x,
            tokens_per_expert,
            permuted_probs,
            self._expert_gemms("linear_fc1", fc1s, counts),
            self._expert_gemms("linear_fc2", fc2s, counts),
            sparse_activation(plain, fc2s[0].sparsity),
            self.grouped_activation_stats,
            self.config,
            counts=counts,
        )
        return y, None

    @staticmethod
    def _backend(layer):
        """The expert linear's own GEMM backend while it prunes (its per-step state keeps one), else dense."""
        if not layer.sparsity.prunes_weights:
            return BACKENDS["dense"]
        return layer.backend_for(layer.weight)

    def _expert_gemms(self, name, layers, counts) -> ExpertGemms:
        """Each expert's per-step state gives its mask (held masks included) and operands; experts the
        speed gate runs sparse at their token counts use their own 2:4 GEMMs, the rest one grouped
        GEMM on the W*M of all experts, stacked once per step."""
        for layer in layers:  # their forwards do not run: their hooks must, before any read
            run_forward_pre_hooks(layer)
        backends = [self._backend(layer) for layer in layers]
        steps = [
            layer.weight_state.step(layer.weight, layer.sparsity, backend)
            for layer, backend in zip(layers, backends)
        ]
        fusion = [getattr(layer, "gradient_accumulation_fusion", False) for layer in layers]
        plans = expert_plans(
            steps,
            backends,
            counts,
            lambda e, tokens, step: layers[e].gated_roles(
                tokens, step, backends[e], layers[e].tp_group
            ),
            fusion,
        )
        biases = None if layers[0].bias is None else torch.stack([layer.bias for layer in layers])
        weights = [layer.weight for layer in layers]
        return ExpertGemms(weights, steps, plans, self._stacked[name], biases, fusion)
