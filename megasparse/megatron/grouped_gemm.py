"""The expert-GEMM engine of the sparse experts: per expert, its own 2:4 GEMM or a share of one grouped GEMM.

`grouped_ffn` runs all local experts' FFNs. Each linear (fc1, fc2) of the experts is an
`ExpertGemms` with a `LinearPlan` per expert (`expert_plans`): the roles the speed gate runs sparse
at the expert's token count (any count under backend="cusparselt" or MEGASPARSE_SPEED_GATE=0). An
expert with a sparse role in either linear runs its FFN alone: core's `sparse_linear_step` on its
rows, with its per-step compressed W*M (built once per optimizer step in its WeightStep), its
activation on its own rows (so no FFN-wide tensor is concatenated from per-expert pieces). The
other experts run together on their gathered rows: one torch._grouped_mm per product on the W*M of
ALL local experts, stacked once per optimizer step (`StackedWeights`), the experts running alone
given zero-row groups, so the stack does not depend on which experts the gate runs alone in a
micro-batch (input and weight gradients by PyTorch's autograd; the zero-row groups' weight
gradients are dropped, not added), or one GEMM each where grouping does not apply (`can_group`).
The outputs are concatenated in expert order; each dense weight gets the gradient of its step's
rule (a per-step term once, by whichever GEMM's backward comes first), into main_grad where its
linear fuses the weight-gradient accumulation. On a dense backend (CPU, or backend="auto" without
sparse kernels) every expert is in the grouped GEMMs and no host count is read.

Per-expert sparse GEMMs need the token counts on the host. Megatron's dropless alltoall dispatcher
and its allgather dispatcher hand the experts a CPU `tokens_per_expert` (megatron-core 0.16.1 and
0.19.2 token_dispatcher.py: `_maybe_dtoh_and_synchronize` copies it on a side stream before the
experts run; allgather `.cpu()`), so reading it costs nothing; a device tensor (alltoall with
moe_pad_expert_input_to_capacity, the flex / DeepEP dispatcher) costs one host sync per call, the
one TEGroupedMLP's and SequentialMLP's own forwards pay (`tokens_per_expert.tolist()`). It is read
only when a sparse backend is in use.

A batched sparse call over the experts (proposed, not built). PyTorch's `_cslt_sparse_mm` takes 2-D
operands only, so the sparse experts run one call each: per expert and micro-batch 4 calls (fc1 and
fc2, forward and dgrad; 2 with a 1d mask), each assumed ~15 us of host work (perfmodel's
CSLT_CALL_US: the autograd op, split/cat views, PyTorch's cuSPARSELt plan setup, a fresh plan per
call) and ~5 us of launch gap on the GPU. cuSPARSELt itself batches (`CUSPARSELT_MAT_NUM_BATCHES`,
`CUSPARSELT_MAT_BATCH_STRIDE` on its matrix descriptors), so a binding of its own (a torch custom op
over cusparseLtMatmul with batch count E, the compressed weights stacked at a fixed stride) would
run all sparse experts in one call, but every batch member has one shape: each expert's rows padded
to the largest count. At a +/-50% load spread (counts uniform in [0.5, 1.5] x the mean) the largest
of E counts is on average 0.5 + E/(E+1) of the mean: 1.39x for 8 experts, 1.48x for 64, so the
padded batch does 39% / 48% more GEMM work. Projected, H100 SXM, 70% of the dense peak, an
h4096/ffn14336 expert at ~8k rows (8 experts, top-2, 32k tokens): one forward GEMM is ~1.4 ms dense,
~0.9-1.2 ms 2:4, against ~5 us of gap per call, so the loop loses < 1% while the padded batch is
~39% slower than the loop, about as slow as dense (gain negative). Where counts are small enough for
launches to matter (64 experts, ~1k rows each) they are under the speed gate's smallest bucket and
run dense grouped anyway; what would pay there is a ragged (grouped) 2:4 kernel, not a padded batch.
The per-expert loop is kept.
"""

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megasparse.core.activation_sparsity import activate_sparse
from megasparse.megatron.mlp import is_squared_relu
from megasparse.core.linear_op import (
    LinearPlan,
    gradient_went_to_main_grad,
    sparse_linear_step,
)


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


class _StackedMaskedWeights(torch.autograd.Function):
    """The step's stacked W*M of all experts for one grouped GEMM call; the backward gives the dense
    weight of each expert in `members` (those with rows in the call) the gradient of its step's rule
    from its slice, and nothing to the others: their rows are not in the call (zero-row groups),
    their gradient (and any per-step term) comes from their own GEMMs. Under wgrad accumulation
    fusion the gradient is added to main_grad and Megatron's dummy gradient returned, as the
    experts' own GEMMs do, so an expert that runs alone in one micro-batch and grouped in the next
    (Megatron's DDP skips .grad once a weight is flagged as added to main_grad) loses nothing."""

    @staticmethod
    def forward(ctx, stacked, steps, members, fused, *weights):
        ctx.save_for_backward(*weights)
        ctx.steps, ctx.members = steps, members
        ctx.main_grads = [
            getattr(w, "main_grad", None) if f else None for w, f in zip(weights, fused)
        ]
        # a new view each call: the cached stack stays out of graphs
        return stacked.view_as(stacked)

    @staticmethod
    def backward(ctx, grad):
        grads = []
        for e, weight, main_grad in zip(ctx.members, ctx.saved_tensors, ctx.main_grads):
            step = ctx.steps[e]
            g = step.rule.dense_gradient(grad[e], weight, step)
            if main_grad is None:
                grads.append(g)
                continue
            weight.main_grad = main_grad
            main_grad.add_(g.to(main_grad.dtype))
            grads.append(gradient_went_to_main_grad(weight, grad.dtype))
        return (None, None, None, None, *grads)


class StackedWeights:
    """[experts, out, in]: this step's W*M of ALL local experts, stacked once per optimizer step
    from the experts' states, whatever set of experts runs grouped in each micro-batch (the experts
    running alone get zero-row groups); one weight-sized copy per step."""

    def __init__(self):
        self._steps, self._stack = None, None

    def __call__(self, steps, members=None, fusion=None):
        """The stack, with gradients for the experts `members` (default all); fusion: per expert,
        whether its linear accumulates the weight gradient into main_grad."""
        if (
            self._steps is None
            or len(steps) != len(self._steps)
            or any(a is not b for a, b in zip(steps, self._steps))
        ):  # a new optimizer step (or rebuilt states): the old stack is stale
            self._steps = list(steps)
            self._stack = torch.stack([s.dense_for_copy() for s in steps])
        members = tuple(range(len(steps))) if members is None else tuple(members)
        fused = [bool(fusion[e]) if fusion is not None else False for e in members]
        weights = [steps[e].weight for e in members]
        return _StackedMaskedWeights.apply(self._stack, self._steps, members, fused, *weights)

    def held(self) -> Optional[torch.Tensor]:
        """The stack held for this step (None before the first call)."""
        return self._stack


def host_counts(tokens_per_expert) -> list:
    """Token counts per expert as Python ints: free for Megatron's dispatchers' CPU tensor, one host
    sync for a device tensor (see the module docstring)."""
    if isinstance(tokens_per_expert, torch.Tensor):
        return tokens_per_expert.tolist()
    return [int(n) for n in tokens_per_expert]


def counts_for(backends, tokens_per_expert) -> Optional[list]:
    """The host token counts where some expert may run its own sparse GEMM (a backend of the
    experts' linears is sparse), else None: nothing read, no sync."""
    if all(backend.name == "dense" for backend in backends):
        return None
    return host_counts(tokens_per_expert)


# (expert index, its token count, its WeightStep) -> the roles the speed gate runs sparse
Gate = Callable[[int, int, object], tuple]


def expert_plans(steps, backends, counts, gate: Gate, fusion) -> list:
    """Per expert: the LinearPlan of its own GEMMs, its sparse roles those the speed gate runs sparse
    at its token count (none: dense); None where it has no sparse backend or no pruned W*M now, or
    counts is None (every backend dense). fusion: per expert, whether its linear accumulates the
    weight gradient into main_grad."""
    plans = []
    for e, (step, backend) in enumerate(zip(steps, backends)):
        if counts is None or backend.name == "dense" or not step.pruned:
            plans.append(None)
            continue
        roles = tuple(gate(e, counts[e], step))
        plans.append(LinearPlan(backend, step.transposable, bool(fusion[e]), roles))
    return plans


@dataclass
class ExpertGemms:
    """One linear (fc1 or fc2) of every local expert for one call: weights, this step's WeightSteps,
    per expert its LinearPlan or None (`expert_plans`), `stacked` W*M of all experts for the
    grouped GEMM, the stacked biases, and per expert whether its linear fuses the weight-gradient
    accumulation into main_grad (None: none does)."""

    weights: list
    steps: list
    plans: list
    stacked: StackedWeights
    biases: Optional[torch.Tensor] = None
    fusion: Optional[list] = None

    def sparse(self, e) -> bool:
        """Whether expert e runs some GEMM of this linear sparse now."""
        plan = self.plans[e]
        return plan is not None and bool(plan.sparse_weight_roles)

    def alone(self, e) -> Callable:
        """x -> x (W_e*M_e)^T by the expert's own op (sparse where its plan says, else dense on W*M
        held for the step)."""
        step, plan = self.steps[e], self.plans[e]
        if plan is None:
            fused = bool(self.fusion[e]) if self.fusion is not None else False
            plan = LinearPlan(step.backend, step.transposable, fused, sparse_weight_roles=())
        return lambda x: sparse_linear_step(x, self.weights[e], None, step, plan)

    def grouped(self, members, counts, grouped: bool, offsets=None) -> Callable:
        """x (the rows of all experts, in order; `counts` rows each, 0 for an expert not in
        `members`) -> each expert's rows times its W*M^T: one grouped GEMM on the step's stack of
        all experts (zero-row groups for the others), one dense GEMM per member where grouped is
        False. Only the `members` get weight gradients from it."""
        w = self.stacked(self.steps, members, self.fusion)
        if grouped and (offsets is not None or sum(counts) > 0):
            if offsets is None:  # host counts: copied without a stream sync
                offsets = torch.tensor(counts).cumsum(0).to(dtype=torch.int32)
            return lambda x: grouped_linear(x, w, offsets.to(x.device, non_blocking=True))

        def looped(x):
            parts = torch.split(x, counts)
            return torch.cat([torch.nn.functional.linear(parts[e], w[e]) for e in members])

        return looped

    def bias_rows(self, tokens_per_expert, rows, expert=None) -> Optional[torch.Tensor]:
        """Each of the `rows` rows' expert bias ([rows, out], `tokens_per_expert` rows of each
        expert), or, for one `expert`'s rows, its bias [out]; None without biases."""
        if self.biases is None:
            return None
        if expert is not None:
            return self.biases[expert]
        expert_of_token = torch.repeat_interleave(
            torch.arange(len(self.steps), device=self.biases.device),
            tokens_per_expert.to(self.biases.device, non_blocking=True),
            output_size=rows,
        )
        return self.biases[expert_of_token]


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


def grouped_ffn(
    x,
    tokens_per_expert,
    probs,
    fc1: ExpertGemms,
    fc2: ExpertGemms,
    activation,
    stats,
    config,
    counts=None,
    grouped: bool = True,
):
    """All local experts' FFNs (module docstring). Experts with a linear the speed gate runs sparse
    run their FFN alone on their own GEMMs; the others together, one grouped GEMM per product (one
    dense GEMM per expert where grouped is False). counts: the host token counts (read from
    tokens_per_expert when needed and not given).

    Mirrors Megatron's expert MLP: act(x W1^T + b1) * p, then W2, plus b2 * p.
    """
    if config.moe_apply_probs_on_input:  # as SequentialMLP: scale the input, then probs are 1
        x = (probs.unsqueeze(-1) * x).to(x.dtype)
        probs = torch.ones_like(probs)
    experts = len(fc1.steps)
    alone = [e for e in range(experts) if fc1.sparse(e) or fc2.sparse(e)]
    members = tuple(range(experts))
    run = functools.partial(
        _ffn, fc1=fc1, fc2=fc2, activation=activation, stats=stats, config=config
    )
    if not alone and grouped:  # one grouped GEMM per product: no host counts needed
        # a host tensor (Megatron's dispatchers) is copied without a stream sync
        tokens_per_expert = torch.as_tensor(tokens_per_expert).to(x.device, non_blocking=True)
        offsets = tokens_per_expert.cumsum(0).to(torch.int32)
        linears = [fc.grouped(members, None, True, offsets) for fc in (fc1, fc2)]
        return run(x, tokens_per_expert, probs, linears)
    if counts is None:
        counts = host_counts(tokens_per_expert)
    if not alone:  # one dense GEMM per expert
        linears = [fc.grouped(members, counts, False) for fc in (fc1, fc2)]
        return run(x, torch.tensor(counts), probs, linears)
    xs, ps = torch.split(x, counts), torch.split(probs, counts)
    ys = [None] * experts
    # alone first: a W*M an expert holds for the step (1d mask) is then what the stack copies
    for e in alone:  # its own GEMMs: sparse on its per-step compressed W*M where gated
        linears = [fc1.alone(e), fc2.alone(e)]
        ys[e] = run(xs[e], torch.tensor([counts[e]]), ps[e], linears, expert=e)
    together = tuple(e for e in members if e not in alone)
    if together:  # the others on their rows, gathered; the experts running alone: zero-row groups
        rows = [0 if e in alone else counts[e] for e in members]
        linears = [fc.grouped(together, rows, grouped) for fc in (fc1, fc2)]
        x_together = torch.cat([xs[e] for e in together])
        p_together = torch.cat([ps[e] for e in together])
        y = run(x_together, torch.tensor(rows), p_together, linears)
        for e, part in zip(together, y.split([counts[e] for e in together])):
            ys[e] = part
    return torch.cat(ys)


def _ffn(x, tokens_per_expert, probs, linears, fc1, fc2, activation, stats, config, expert=None):
    """The FFN on rows x (sorted by expert, `tokens_per_expert` each; one `expert`'s rows when
    given), with `linears` = (x -> x W1^T, a -> a W2^T)."""
    h = linears[0](x)
    b1 = fc1.bias_rows(tokens_per_expert, x.shape[0], expert)
    if b1 is not None:
        h = h + b1
    a, checkpoint = _activation_with_recompute(activation, h, tokens_per_expert, stats, config)
    p = probs.unsqueeze(-1)
    a = (a * p).to(a.dtype)  # as MLP's per_token_scale
    y = linears[1](a)
    if checkpoint is not None:
        checkpoint.discard_output_and_register_recompute(y)
    b2 = fc2.bias_rows(tokens_per_expert, x.shape[0], expert)
    if b2 is not None:  # as MLP: the expert bias is scaled by the token's prob
        y = y + b2 * p
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
