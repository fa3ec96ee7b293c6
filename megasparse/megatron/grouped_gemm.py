"""The grouped-GEMM engine of the sparse experts: stacked per-step W*M, one grouped GEMM per product.

`grouped_ffn` runs all local experts' FFNs with two torch._grouped_mm calls (forward, input and
weight gradients by PyTorch's autograd); `looped_ffn` gives the same result with one GEMM per
expert where grouping does not apply (`can_group`). `StackedWeights` stacks the experts' masked
weights once per optimizer step; `run_forward_pre_hooks` runs the hooks of linears whose forward
the grouped path skips.
"""

import torch

from megasparse.core.activation_sparsity import activate_sparse
from megasparse.megatron.mlp import is_squared_relu
from megasparse.core.linear_op import masked_weight


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient (_grouped_mm's backward needs one)."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_linear(x: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [tokens, in] sorted by group, weights [groups, out, in], offsets int32 cumulative row ends.

    One grouped GEMM (torch._grouped_mm) with PyTorch's own autograd for the input and weight gradients.
    """
    return _ContiguousGrad.apply(
        torch._grouped_mm(x.contiguous(), weights.transpose(1, 2), offs=offsets)
    )


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

    def __call__(self, steps):
        if (
            self._steps is None
            or len(steps) != len(self._steps)
            or any(a is not b for a, b in zip(steps, self._steps))
        ):
            self._steps, self._stacked = list(steps), torch.stack([s.dense() for s in steps])
        return masked_weight(steps, stacked=self._stacked)


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


def both_ways_refusal(sparsity) -> str:
    return (
        f"megasparse: activation_wgrad={sparsity.activation_wgrad!r} (both-ways weight "
        "gradients) needs each expert's own linears, but these grouped experts compute "
        "their weight gradients with one exact grouped GEMM. Use SparseSequentialMLP or "
        "SparseGroupedMLP (local spec, --transformer-impl local), or activation_wgrad=None."
    )


def sparse_activation(plain_activation, fc2_sparsity):
    """activation(h, tokens_per_expert, stats) for grouped experts: fused with the sparsifier when asked.

    The grouped GEMMs take the activation dense: a compacted pattern (M >= 8) runs its masked math
    here (same values, no work skipped), and both-ways weight gradients, which the grouped GEMM's
    own weight gradient cannot apply, are refused."""
    squared_relu = is_squared_relu(plain_activation)

    def run(h, tokens_per_expert, stats):
        if not fc2_sparsity.sparsifies_activations:
            return plain_activation(h)
        if fc2_sparsity.activation_wgrad is not None:  # set after construction
            raise NotImplementedError(both_ways_refusal(fc2_sparsity))

        def one(chunk):
            return activate_sparse(plain_activation, chunk, fc2_sparsity, stats, squared_relu)

        if fc2_sparsity.activation_pattern.is_2_4:  # 2:4 is per token: all experts in one pass
            return one(h)
        # V:N:M blocks of V tokens must not mix experts
        return torch.cat([one(chunk) for chunk in torch.split(h, tokens_per_expert.tolist())])

    return run


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
