"""SparseTEGroupedMLP: Megatron's TEGroupedMLP (Transformer Engine's grouped experts) with 2:4 masks.

Its parameters are `weight{i}` of TE GroupedLinear; its sparse bf16/fp16 forward is the expert-GEMM
engine (megasparse.megatron.grouped_gemm) on the TE grouped linears' per-step states: each expert the
speed gate runs sparse at its token count on its own 2:4 GEMMs (cuSPARSELt, compressed W*M built
once per optimizer step), the rest one grouped GEMM on the W*M of all experts stacked once per step
(one GEMM per expert where grouping does not apply). Under FP8 (weights only), TEGroupedMLP's own
forward runs and its sparse TE grouped linears take over TE's GroupedLinear GEMMs: FP8 2:4 per
expert under a per-tensor recipe (megasparse.te.forward), else TE's grouped FP8 GEMM on W*M. Masks
come from the TE grouped linears' per-step states.
"""

import dataclasses
import functools

import torch
from megatron.core.transformer.moe.experts import TEGroupedMLP

from megasparse.core.activation_sparsity import ActivationStats
from megasparse.core.backends import BACKENDS
from megasparse.core.weight_state import refuse_graph_capture
from megasparse.core.sparse_module import SparseModuleMixin, take_sparsity
from megasparse.megatron.grouped_gemm import (
    ExpertGemms,
    StackedWeights,
    both_ways_refusal,
    can_group,
    expert_plans,
    grouped_ffn,
    counts_for,
    run_forward_pre_hooks,
    sparse_activation,
)
from megasparse.megatron.tp_group import expert_tp_group


class SparseTEGroupedMLP(SparseModuleMixin, TEGroupedMLP):
    def __init__(self, num_local_experts, config, submodules, *args, sparsity=None, **kwargs):
        sparsity = take_sparsity(sparsity)
        if getattr(config, "moe_single_grouped_weight", False):
            raise NotImplementedError(
                "megasparse: moe_single_grouped_weight keeps all experts in one TE parameter and runs TE's op "
                "fuser, which SparseTEGroupedMLP does not enter; set moe_single_grouped_weight=False "
                "(--no-moe-single-grouped-weight) for sparse experts."
            )
        if sparsity.activation_wgrad is not None:
            raise NotImplementedError(both_ways_refusal(sparsity))
        # Under FP8, TE's own grouped forward runs; its grouped linears then hand TE the masked weights.
        submodules = self._with_sparse_te_linears(submodules, sparsity)
        super().__init__(num_local_experts, config, submodules, *args, **kwargs)
        self.sparsity = sparsity
        fc1_in = self._weights(self.linear_fc1)[0].shape[1]
        fc2_in = self._weights(self.linear_fc2)[0].shape[1]
        checks = []
        if self.sparsity.weights is not None:
            checks += [(fc1_in, 4, "hidden size"), (fc2_in, 4, "ffn size per expert-TP rank")]
        if self.sparsity.activations is not None:
            checks.append(
                (fc2_in, self.sparsity.activation_pattern.m, "ffn size per expert-TP rank")
            )
        for size, multiple, what in checks:
            if size % multiple:
                raise ValueError(
                    f"megasparse: the {what} ({size}) must be a multiple of {multiple} for the sparse groups"
                )
        self.grouped_activation_stats = ActivationStats()
        self._stacked = {"linear_fc1": StackedWeights(), "linear_fc2": StackedWeights()}
        for linear in (self.linear_fc1, self.linear_fc2):  # S-STE's beta: over expert-TP only
            for state in getattr(linear, "weight_states", ()):
                state.process_group = functools.partial(expert_tp_group, linear)

    # the SparseModule interface: masks and held state live in the sparse TE grouped linears

    def _sparse_children(self) -> list:
        return [self.linear_fc1, self.linear_fc2]

    def sparsity_stats(self) -> dict:
        return {
            "activations": self.activation_stats(),
            "fc1": self.linear_fc1.sparsity_stats(),
            "fc2": self.linear_fc2.sparsity_stats(),
        }

    @staticmethod
    def _with_sparse_te_linears(submodules, sparsity):
        from megasparse.megatron.compat import linear_entry
        from megasparse.te.linear import sparse_te_class

        weights_only = dataclasses.replace(
            sparsity, activations=None, activation_function=None, activation_wgrad=None
        )
        entries = {}
        for name in ("linear_fc1", "linear_fc2"):
            cls = getattr(submodules, name)
            cls = getattr(cls, "module", getattr(cls, "func", cls))
            if isinstance(cls, type):
                entries[name] = linear_entry(sparse_te_class(cls), weights_only)
        return dataclasses.replace(submodules, **entries)

    def _weights(self, linear):
        return [getattr(linear, f"weight{i}") for i in range(self.num_local_experts)]

    def _backend(self, name):
        """The TE grouped linear's GEMM backend while it prunes (its per-step states keep one), else dense."""
        linear = getattr(self, name)
        if not linear.sparsity.prunes_weights:
            return BACKENDS["dense"]
        return linear.backend_for(self._weights(linear)[0])  # every expert weight has one shape

    def _expert_gemms(self, name, counts) -> ExpertGemms:
        """The sparse TE grouped linear's per-step states give the masks and operands; experts the
        speed gate runs sparse at their token counts use their own 2:4 GEMMs, the rest one grouped
        GEMM on the W*M of all experts, stacked once per step."""
        linear = getattr(self, name)
        run_forward_pre_hooks(linear)  # its forward does not run: its hooks must, before any read
        backend = self._backend(name)
        steps = linear.weight_steps(backend)
        fusion = [getattr(linear, "fuse_wgrad_accumulation", False)] * len(steps)  # TE's
        # the ranks that see the same tokens agree on the gate: the expert-TP group the weights are
        # split over (not the dense TP group: its ranks run the experts on other tokens)
        group = expert_tp_group(linear)
        plans = expert_plans(
            steps,
            [backend] * len(steps),
            counts,
            lambda e, tokens, step: linear.gated_roles(tokens, step, backend, group),
            fusion,
        )
        biases = [getattr(linear, f"bias{i}", None) for i in range(self.num_local_experts)]
        has_bias = all(b is not None and b.numel() for b in biases)
        weights = self._weights(linear)
        stacked_biases = torch.stack(biases) if has_bias else None
        return ExpertGemms(weights, steps, plans, self._stacked[name], stacked_biases, fusion)

    def activation_stats(self, reset: bool = False) -> dict:
        result = self.grouped_activation_stats.as_dict()
        if reset:
            self.grouped_activation_stats.reset()
        return result

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        s = self.sparsity
        refuse_graph_capture(permuted_local_hidden_states, s)  # before the dense shortcut
        if not (s.prunes_weights or s.sparsifies_activations):
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        if getattr(self.config, "fp8", None) or getattr(self.config, "fp4", None):
            if s.sparsifies_activations:
                raise NotImplementedError(
                    "megasparse: SparseTEGroupedMLP under FP8 prunes weights only; "
                    "set activations=None (activation sparsity runs in bf16)"
                )
            # the sparse TE grouped linears: FP8 2:4 per expert, or TE's grouped FP8 GEMM on W*M
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        x = permuted_local_hidden_states
        counts = counts_for(
            [self._backend(n) for n in ("linear_fc1", "linear_fc2")], tokens_per_expert
        )
        fc1 = self._expert_gemms("linear_fc1", counts)
        fc2 = self._expert_gemms("linear_fc2", counts)
        y = grouped_ffn(
            x,
            tokens_per_expert,
            permuted_probs,
            fc1,
            fc2,
            sparse_activation(self.activation_func, s),
            self.grouped_activation_stats,
            self.config,
            counts=counts,
            grouped=can_group(self.config, x, fc1.weights[0], fc2.weights[0]),
        )
        return y, None
