"""Sparse MoE experts: drop-ins for Megatron-core's SequentialMLP, with per-expert 2:4 masks.

SparseSequentialMLP
    Megatron's SequentialMLP whose experts have SparseColumn/RowParallelLinear fc1/fc2 (each
    expert its own masks) and SparseMLP's fused activation sparsity. Same constructor (plus an
    optional `sparsity=` that makes plain Megatron linears sparse), same forward contract, same
    parameters and sharded_state_dict: dense and sparse expert checkpoints are interchangeable.
    Each expert's GEMMs run on the sparse backend (cuSPARSELt / CUTLASS) when there is one.

SparseTEGroupedMLP
    Megatron's TEGroupedMLP (Transformer Engine's grouped experts: parameters `weight{i}` of
    TE GroupedLinear) with `sparsity=`; its sparse forward is the grouped path below on the
    masked TE weights (bf16/fp16; a per-expert loop where grouping does not apply). Under FP8
    (weights only), TEGroupedMLP's own forward runs and its sparse TE grouped linears take over
    TE's GroupedLinear GEMMs: FP8 2:4 per expert under a per-tensor recipe (megasparse.te.fp8_forward),
    else TE's grouped FP8 GEMM on W*M. Masks come from the TE grouped linears' per-step states.

SparseGroupedMLP
    The same module and parameters as SparseSequentialMLP, but the forward runs all local experts at once: one mask
    kernel over the stacked expert weights and one grouped GEMM per product
    (torch._grouped_mm: forward, input gradient, weight gradient) on the masked weights.
    PyTorch has no grouped 2:4 GEMM, so this trades the sparse-tensor-core speed-up of each
    expert for one launch instead of one per expert: the better choice for many small experts.
    It needs grouped-GEMM-friendly shapes (hidden and ffn per rank 16-byte aligned), fp32 /
    bf16 / fp16 and, on CUDA, sm90+; a non-gated activation without bias-activation fusion and
    without FP8. Anything else falls back to SparseSequentialMLP's per-expert loop.
"""

import dataclasses

import torch
from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP

from megasparse.core.activation_sparsity import ActivationStats, sparsify, squared_relu_sparsify
from megasparse.megatron.compat import with_sparse_linears
from megasparse.config import SparsityConfig
from megasparse.megatron.mlp import install_activation_sparsity, is_squared_relu
from megasparse.core.backends import BACKENDS
from megasparse.core.linear_op import grouped_linear, masked_weight
from megasparse.core.weight_state import refuse_graph_capture


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


def run_forward_pre_hooks(module) -> None:
    """Run `module`'s forward pre-hooks (global ones first, as `Module.__call__` does) without its
    forward, for the grouped paths that read the expert linears' weights directly: Megatron DDP
    with overlap_param_gather waits for a module's parameter all-gather in such a hook
    (`hook(module, *unused)` on `module.parameters(recurse=False)`), so skipping it would read
    weights still being gathered. The hooks get no inputs; what they return is not used."""
    hooks = torch.nn.modules.module._global_forward_pre_hooks
    for hook_id, hook in (*hooks.items(), *module._forward_pre_hooks.items()):
        if hook_id in module._forward_pre_hooks_with_kwargs:
            hook(module, (), {})
        else:
            hook(module, ())


def _grouped_gemm_device_ok(device, dtype) -> bool:
    """torch._grouped_mm is one fast kernel only for bf16 on sm90+; elsewhere on CUDA it loops with a
    host sync, and the per-expert sparse GEMMs are the better choice. (CPU: any dtype, for tests.)"""
    if not hasattr(torch, "_grouped_mm"):
        return False
    return device.type != "cuda" or (
        dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    )


def can_group(config, x, fc1_weight, fc2_weight) -> bool:
    """Whether the grouped path applies: grouped-GEMM-friendly dtype, shapes, device and activation."""
    aligned = (
        16 // x.element_size() if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else 0
    )
    return (
        aligned > 0
        and x.shape[0] > 0
        and _grouped_gemm_device_ok(x.device, x.dtype)
        and not (
            config.gated_linear_unit
            or config.bias_activation_fusion
            or config.use_te_activation_func
        )
        and not (getattr(config, "fp8", None) or getattr(config, "fp4", None))
        and getattr(config, "moe_latent_size", None) is None
        and fc1_weight.shape[1] % aligned == 0
        and fc1_weight.shape[0] % aligned == 0
        and fc2_weight.shape[0] % aligned == 0
    )


class StackedWeights:
    """[experts, out, in] of this step's W*M, stacked once per optimizer step from the experts' states."""

    def __init__(self):
        self._steps, self._stacked = None, None

    def __call__(self, steps, sparsity):
        if (
            self._steps is None
            or len(steps) != len(self._steps)
            or any(a is not b for a, b in zip(steps, self._steps))
        ):
            self._steps, self._stacked = list(steps), torch.stack([s.dense() for s in steps])
        return masked_weight(steps, sparsity.gradient, sparsity.srste_decay, stacked=self._stacked)


def _activation_with_recompute(activation, h, tokens_per_expert, stats, config):
    """The activation, recomputed in the backward when Megatron's recompute_modules has "moe_act"."""
    if (
        "moe_act" not in (getattr(config, "recompute_modules", None) or [])
        or not getattr(config, "recompute_granularity", None) == "selective"
    ):
        return activation(h, tokens_per_expert, stats), None
    from megatron.core import tensor_parallel

    checkpoint = tensor_parallel.CheckpointWithoutOutput(
        fp8=getattr(config, "fp8", None)
    )  # None: no FP8
    run = lambda h, tokens: activation(h, tokens, stats)  # noqa: E731  (checkpoint saves tensors only)
    return checkpoint.checkpoint(run, h, tokens_per_expert), checkpoint


def grouped_ffn(x, tokens_per_expert, probs, fc1, fc2, activation, stats, config):
    """All local experts' FFNs with two grouped GEMMs. fc1/fc2: (stacked masked weights, biases or None).

    Mirrors Megatron's expert MLP: act(x W1^T + b1) * p, then W2, plus b2 * p.
    """
    if config.moe_apply_probs_on_input:  # as SequentialMLP: scale the input, then probs are 1
        x = (probs.unsqueeze(-1) * x).to(x.dtype)
        probs = torch.ones_like(probs)
    tokens_per_expert = torch.as_tensor(tokens_per_expert, device=x.device)
    offsets = tokens_per_expert.cumsum(0).to(torch.int32)
    expert_of_token = torch.repeat_interleave(
        torch.arange(len(tokens_per_expert), device=x.device),
        tokens_per_expert,
        output_size=x.shape[0],
    )
    (w1, b1), (w2, b2) = fc1, fc2
    h = grouped_linear(x, w1, offsets)
    if b1 is not None:
        h = h + b1[expert_of_token]
    a, checkpoint = _activation_with_recompute(activation, h, tokens_per_expert, stats, config)
    p = probs.unsqueeze(-1)
    a = (a * p).to(a.dtype)  # as MLP's per_token_scale
    y = grouped_linear(a, w2, offsets)
    if checkpoint is not None:
        checkpoint.discard_output_and_register_recompute(y)
    if b2 is not None:  # as MLP: the expert bias is scaled by the token's prob
        y = y + b2[expert_of_token] * p
    return y


def sparse_activation(plain_activation, fc2_sparsity):
    """activation(h, tokens_per_expert, stats) for grouped experts: fused with the sparsifier when asked."""

    def run(h, tokens_per_expert, stats):
        if not fc2_sparsity.sparsifies_activations:
            return plain_activation(h)
        pattern = fc2_sparsity.activation_pattern
        squared = fc2_sparsity.activation_function == "squared_relu" or is_squared_relu(
            plain_activation
        )

        def one(chunk):
            if squared:
                return squared_relu_sparsify(chunk, pattern, stats)[0]
            return sparsify(plain_activation(chunk), pattern, stats)[0]

        if pattern[1] == 4:  # 2:4 is per token: all experts in one pass
            return one(h)
        # V:N:M blocks of V tokens must not mix experts
        return torch.cat([one(chunk) for chunk in torch.split(h, tokens_per_expert.tolist())])

    return run


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
        y = grouped_ffn(
            x,
            tokens_per_expert,
            permuted_probs,
            self._sparse_weights_and_biases("linear_fc1", fc1s),
            self._sparse_weights_and_biases("linear_fc2", fc2s),
            sparse_activation(plain, fc2s[0].sparsity),
            self.grouped_activation_stats,
            self.config,
        )
        return y, None

    def _sparse_weights_and_biases(self, name, layers):
        """Each expert's per-step state gives its mask (held masks included); stacked once per step."""
        dense = BACKENDS["dense"]  # the grouped GEMM runs on W*M
        for layer in layers:  # their forwards do not run: their hooks must, before any read
            run_forward_pre_hooks(layer)
        steps = [layer.weight_state.step(layer.weight, layer.sparsity, dense) for layer in layers]
        weights = self._stacked[name](steps, layers[0].sparsity)
        biases = None if layers[0].bias is None else torch.stack([layer.bias for layer in layers])
        return weights, biases


def looped_ffn(x, tokens_per_expert, probs, fc1, fc2, activation, stats, config):
    """grouped_ffn's result with one GEMM per expert (where grouped GEMMs do not apply)."""
    if config.moe_apply_probs_on_input:
        x = (probs.unsqueeze(-1) * x).to(x.dtype)
        probs = torch.ones_like(probs)
    counts = torch.as_tensor(tokens_per_expert).tolist()
    (w1, b1), (w2, b2) = fc1, fc2
    outputs = []
    for e, (xe, pe) in enumerate(zip(torch.split(x, counts), torch.split(probs, counts))):
        h = torch.nn.functional.linear(xe, w1[e], None if b1 is None else b1[e])
        a = (activation(h, torch.tensor([xe.shape[0]]), stats) * pe.unsqueeze(-1)).to(h.dtype)
        y = torch.nn.functional.linear(a, w2[e])
        outputs.append(y if b2 is None else y + b2[e] * pe.unsqueeze(-1))
    return torch.cat(outputs)


class SparseTEGroupedMLP(TEGroupedMLP):
    def __init__(self, num_local_experts, config, submodules, *args, sparsity=None, **kwargs):
        if sparsity is not None and not isinstance(sparsity, SparsityConfig):
            raise TypeError(
                f"sparsity must be a megasparse.SparsityConfig, got {type(sparsity).__name__}"
            )
        sparsity = dataclasses.replace(sparsity) if sparsity is not None else SparsityConfig()
        if getattr(config, "moe_single_grouped_weight", False):
            raise NotImplementedError(
                "megasparse: moe_single_grouped_weight keeps all experts in one TE parameter and runs TE's op "
                "fuser, which SparseTEGroupedMLP does not enter; set moe_single_grouped_weight=False "
                "(--no-moe-single-grouped-weight) for sparse experts."
            )
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
                (fc2_in, self.sparsity.activation_pattern[1], "ffn size per expert-TP rank")
            )
        for size, multiple, what in checks:
            if size % multiple:
                raise ValueError(
                    f"megasparse: the {what} ({size}) must be a multiple of {multiple} for the sparse groups"
                )
        self.grouped_activation_stats = ActivationStats()
        self._stacked = {"linear_fc1": StackedWeights(), "linear_fc2": StackedWeights()}

    # the SparseModule interface: masks and held state live in the sparse TE grouped linears

    def _sparse_linears(self):
        return [self.linear_fc1, self.linear_fc2]

    def sparsity_mask(self, weight=None):
        """The mask of one expert weight (`weight0`.. of linear_fc1 / linear_fc2)."""
        if weight is None:
            raise ValueError(
                "megasparse: SparseTEGroupedMLP has one mask per expert weight: pass the weight, "
                "e.g. sparsity_mask(experts.linear_fc1.weight0)"
            )
        for linear in self._sparse_linears():
            if any(w is weight for w in self._weights(linear)):
                return linear.sparsity_mask(weight)
        raise ValueError("megasparse: that tensor is not one of this module's expert weights")

    def sparsity_stats(self) -> dict:
        return {
            "activations": self.activation_stats(),
            "fc1": self.linear_fc1.sparsity_stats(),
            "fc2": self.linear_fc2.sparsity_stats(),
        }

    def set_sparsity_iteration(self, iteration: int) -> None:
        for linear in self._sparse_linears():
            linear.set_sparsity_iteration(iteration)

    def reset_held_mask(self) -> None:
        for linear in self._sparse_linears():
            linear.reset_held_mask()

    @staticmethod
    def _with_sparse_te_linears(submodules, sparsity):
        from megasparse.megatron.compat import linear_entry
        from megasparse.te.linear import sparse_te_class

        weights_only = dataclasses.replace(sparsity, activations=None, activation_function=None)
        entries = {}
        for name in ("linear_fc1", "linear_fc2"):
            cls = getattr(submodules, name)
            cls = getattr(cls, "module", getattr(cls, "func", cls))
            if isinstance(cls, type):
                entries[name] = linear_entry(sparse_te_class(cls), weights_only)
        return dataclasses.replace(submodules, **entries)

    def _weights(self, linear):
        return [getattr(linear, f"weight{i}") for i in range(self.num_local_experts)]

    def _sparse_weights_and_biases(self, name):
        """The sparse TE grouped linear's per-step states give the masks; stacked once per step."""
        linear = getattr(self, name)
        run_forward_pre_hooks(linear)  # its forward does not run: its hooks must, before any read
        weights = self._stacked[name](linear.weight_steps(), self.sparsity)
        biases = [getattr(linear, f"bias{i}", None) for i in range(self.num_local_experts)]
        has_bias = all(b is not None and b.numel() for b in biases)
        return weights, torch.stack(biases) if has_bias else None

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
        fc1 = self._sparse_weights_and_biases("linear_fc1")
        fc2 = self._sparse_weights_and_biases("linear_fc2")
        run = grouped_ffn if can_group(self.config, x, fc1[0][0], fc2[0][0]) else looped_ffn
        y = run(
            x,
            tokens_per_expert,
            permuted_probs,
            fc1,
            fc2,
            sparse_activation(self.activation_func, s),
            self.grouped_activation_stats,
            self.config,
        )
        return y, None
