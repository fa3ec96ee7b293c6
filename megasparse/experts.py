"""Sparse MoE experts: drop-ins for Megatron-core's SequentialMLP, with per-expert 2:4 masks.

SparseSequentialMLP
    Megatron's SequentialMLP whose experts have SparseColumn/RowParallelLinear fc1/fc2 (each
    expert its own masks) and SparseMLP's fused activation sparsity. Same constructor (plus an
    optional `sparsity=` that makes plain Megatron linears sparse), same forward contract, same
    parameters and sharded_state_dict: dense and sparse expert checkpoints are interchangeable.
    Each expert's GEMMs run on the sparse backend (cuSPARSELt / CUTLASS) when there is one.

SparseGroupedMLP
    The same module and parameters, but the forward runs all local experts at once: one mask
    kernel over the stacked expert weights and one grouped GEMM per product
    (torch._grouped_mm: forward, input gradient, weight gradient) on the masked weights.
    PyTorch has no grouped 2:4 GEMM, so this trades the sparse-tensor-core speed-up of each
    expert for one launch instead of one per expert: the better choice for many small experts.
    It needs grouped-GEMM-friendly shapes (hidden and ffn per rank 16-byte aligned), fp32 /
    bf16 / fp16 and, on CUDA, sm90+; a non-gated activation without bias-activation fusion and
    without FP8. Anything else falls back to SparseSequentialMLP's per-expert loop.
"""

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from megasparse.activation_sparsity import ActivationStats, is_squared_relu, sparsify, squared_relu_sparsify
from megasparse.compat import with_sparse_linears
from megasparse.mlp import install_activation_sparsity
from megasparse.ops import grouped_linear, masked_weight, weight_mask


class SparseSequentialMLP(SequentialMLP):
    def __init__(self, num_local_experts, config, submodules, *args, sparsity=None, **kwargs):
        if sparsity is not None:
            submodules = with_sparse_linears(submodules, sparsity)
        super().__init__(num_local_experts, config, submodules, *args, **kwargs)
        for expert in self.local_experts:
            install_activation_sparsity(expert)
        self.grouped_activation_stats = ActivationStats()  # what SparseGroupedMLP's forward measures

    def activation_stats(self, reset: bool = False) -> dict:
        """Activation statistics summed over the local experts since the last reset (this rank)."""
        total = ActivationStats()
        sources = [e.linear_fc2.activation_stats for e in self.local_experts if hasattr(e.linear_fc2, "activation_stats")]
        for stats in sources + [self.grouped_activation_stats]:
            if stats.sums is not None:
                total.add(stats.sums)
            if reset:
                stats.reset()
        return total.as_dict()


def _grouped_gemm_device_ok(device) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (9, 0)


class SparseGroupedMLP(SparseSequentialMLP):
    def _can_group(self, x) -> bool:
        cfg = self.config
        fc1, fc2 = self.local_experts[0].linear_fc1, self.local_experts[0].linear_fc2
        aligned = 16 // x.element_size() if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else 0
        return (
            aligned > 0
            and x.shape[0] > 0
            and _grouped_gemm_device_ok(x.device)
            and not (cfg.gated_linear_unit or cfg.bias_activation_fusion or cfg.use_te_activation_func)
            and not (getattr(cfg, "fp8", None) or getattr(cfg, "fp4", None))
            and getattr(cfg, "moe_latent_size", None) is None
            and hasattr(fc1, "sparsity")
            and hasattr(fc2, "sparsity")
            and fc1.weight.shape[1] % aligned == 0
            and fc1.weight.shape[0] % aligned == 0
            and fc2.weight.shape[0] % aligned == 0
        )

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x = permuted_local_hidden_states
        if not self._can_group(x):
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        if self.config.moe_apply_probs_on_input:  # as SequentialMLP: scale the input, then probs are 1
            x = (permuted_probs.unsqueeze(-1) * x).to(x.dtype)
            permuted_probs = torch.ones_like(permuted_probs)
        tokens_per_expert = torch.as_tensor(tokens_per_expert, device=x.device)
        offsets = tokens_per_expert.cumsum(0).to(torch.int32)
        expert_of_token = torch.repeat_interleave(
            torch.arange(self.num_local_experts, device=x.device), tokens_per_expert, output_size=x.shape[0]
        )
        fc1s = [e.linear_fc1 for e in self.local_experts]
        fc2s = [e.linear_fc2 for e in self.local_experts]

        h = grouped_linear(x, self._stacked_sparse_weight(fc1s), offsets)
        if fc1s[0].bias is not None:
            h = h + torch.stack([f.bias for f in fc1s])[expert_of_token]
        a = self._activation(h, tokens_per_expert, fc2s[0].sparsity)
        probs = permuted_probs.unsqueeze(-1)
        a = (a * probs).to(a.dtype)  # as MLP's per_token_scale
        y = grouped_linear(a, self._stacked_sparse_weight(fc2s), offsets)
        if fc2s[0].bias is not None:  # as MLP: the expert bias is scaled by the token's prob
            y = y + torch.stack([f.bias for f in fc2s])[expert_of_token] * probs
        return y, None

    def _stacked_sparse_weight(self, layers):
        """[experts, out, in] masked weights with each layer's gradient mode; one mask kernel when masks are fresh."""
        sparsity = layers[0].sparsity
        weights = torch.stack([layer.weight for layer in layers])
        if not sparsity.prunes_weights:
            return weights
        if sparsity.mask_refresh_interval == 1:
            flat = weights.detach().reshape(-1, weights.shape[-1])
            mask = weight_mask(flat, sparsity.mask, sparsity.nonfinite_weights).reshape(weights.shape)
        else:  # held masks live in each layer
            mask = torch.stack([layer._current_mask(layer.weight) for layer in layers])
        return masked_weight(weights, mask, sparsity.gradient, sparsity.srste_decay)

    def _activation(self, h, tokens_per_expert, fc2_sparsity):
        activation = self.local_experts[0].activation_func
        activation = getattr(activation, "activation", activation)  # the plain function under the hook
        if not fc2_sparsity.sparsifies_activations:
            return activation(h)
        pattern = fc2_sparsity.activation_pattern
        squared = fc2_sparsity.activation_function == "squared_relu" or is_squared_relu(activation)
        stats = self.grouped_activation_stats

        def run(chunk):
            if squared:
                return squared_relu_sparsify(chunk, pattern, stats)[0]
            return sparsify(activation(chunk), pattern, stats)[0]

        if pattern[1] == 4:  # 2:4 is per token: all experts in one pass
            return run(h)
        # V:N:M blocks of V tokens must not mix experts
        return torch.cat([run(chunk) for chunk in torch.split(h, tokens_per_expert.tolist())])
