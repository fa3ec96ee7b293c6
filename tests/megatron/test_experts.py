"""Sparse MoE experts at EP=1 (one gloo process): per-expert float64 references, grouping, checkpoints."""

import pytest
import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from megasparse import SparseGroupedMLP, SparseSequentialMLP, SparsityConfig
from expert_builders import (
    EXPERTS,
    FFN,
    HIDDEN,
    TOKENS_PER_EXPERT,
    PerExpertView,
    check_experts_against_reference,
    make_expert_inputs,
    make_experts,
    make_te_experts,
)

pytestmark = pytest.mark.usefixtures("megatron_tp1")


@pytest.mark.parametrize(
    "activations,pattern", [(None, None), ("2:4", (64, 2, 4)), ("4:2:8", (4, 2, 8))]
)
def test_sparse_sequential_mlp_matches_per_expert_reference(activations, pattern):
    experts = make_experts(
        SparseSequentialMLP, SparsityConfig(activations=activations, backend="dense")
    )
    x, probs, tokens = make_expert_inputs(torch.float64)
    check_experts_against_reference(experts, x, probs, tokens, pattern, 1e-10)
    masks = [e.linear_fc1.sparsity_mask() for e in experts.local_experts]
    assert not torch.equal(masks[0], masks[1])  # each expert has its own mask
    expected = sum(TOKENS_PER_EXPERT) * FFN if activations else 0
    assert experts.activation_stats()["elements"] == expected


# a compacted pattern (M >= 8) runs per expert on SparseMLP's compact path instead:
# test_activation_speed_path.py
@pytest.mark.parametrize("activations,pattern", [("2:4", (64, 2, 4))])
@pytest.mark.parametrize("mask", ["1d", "transposable"])
def test_sparse_grouped_mlp_runs_one_grouped_gemm_and_matches_reference(
    monkeypatch, activations, pattern, mask
):
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class CountGroupedMM(
        TorchDispatchMode
    ):  # sees the backward's grouped GEMMs too (PyTorch's autograd)
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten._grouped_mm:
                calls.append(args[0].shape)
            return func(*args, **(kwargs or {}))

    sparsity = SparsityConfig(
        activations=activations, mask=mask, gradient="srste", srste_decay=0.0, backend="dense"
    )
    experts = make_experts(SparseGroupedMLP, sparsity, dtype=torch.float32)
    x, probs, tokens = make_expert_inputs(torch.float32)
    with CountGroupedMM():
        check_experts_against_reference(experts, x, probs, tokens, pattern, 2e-4)
    assert (
        len(calls) == 6
    )  # fc1, fc2 forward; and dX, dW of each in the backward: no per-expert loop
    assert experts.activation_stats()["elements"] == sum(TOKENS_PER_EXPERT) * FFN


def test_grouped_mlp_with_expert_bias_matches_reference():
    experts = make_experts(
        SparseGroupedMLP,
        SparsityConfig(activations="2:4", backend="dense"),
        dtype=torch.float32,
        add_bias_linear=True,
    )
    x, probs, tokens = make_expert_inputs(torch.float32)
    assert experts._can_group(x)
    check_experts_against_reference(experts, x, probs, tokens, (64, 2, 4), 2e-4)


def test_grouped_falls_back_to_the_loop_where_it_cannot_group():
    experts = make_experts(
        SparseGroupedMLP, SparsityConfig(activations="2:4", backend="dense")
    )  # float64: no grouped GEMM
    x, probs, tokens = make_expert_inputs(torch.float64)
    assert not experts._can_group(x)
    check_experts_against_reference(experts, x, probs, tokens, (64, 2, 4), 1e-10)


def _gather_weights_in_forward_pre_hooks(linears):
    """Model Megatron DDP's overlapped parameter all-gather: each linear's own parameters hold
    zeros (the gather in flight) until its forward pre-hook, registered with DDP's signature
    `hook(module, *unused)`, writes the real values. Returns the modules in hook-call order and
    a function that completes the gathers still pending (as a later synchronization would)."""
    calls, pending = [], {}

    def finish(module):
        with torch.no_grad():
            for param, value in zip(module.parameters(recurse=False), pending.pop(module, ())):
                param.copy_(value)

    def hook(module, *unused):
        calls.append(module)
        finish(module)

    for linear in linears:
        pending[linear] = [p.detach().clone() for p in linear.parameters(recurse=False)]
        with torch.no_grad():
            for param in linear.parameters(recurse=False):
                param.zero_()
        linear.register_forward_pre_hook(hook)
    return calls, lambda: [finish(linear) for linear in linears]


@pytest.mark.parametrize(
    "grouped,dtype,tol",
    [
        ("SparseGroupedMLP", torch.float32, 2e-4),  # float64 falls back to the experts' forwards
        ("SparseTEGroupedMLP", torch.float32, 2e-4),
        ("SparseTEGroupedMLP", torch.float64, 1e-10),
    ],
)
def test_grouped_experts_run_the_linears_forward_pre_hooks_before_reading_weights(
    grouped, dtype, tol
):
    """The grouped paths read the expert linears' weights without calling them: each linear's
    forward pre-hooks still run, once per forward and before its weights are read, so the first
    forward gives the result of the gathered weights (float32: grouped GEMMs; float64: a loop)."""
    import megasparse

    sparsity = SparsityConfig(activations="2:4", backend="dense")
    if grouped == "SparseGroupedMLP":
        experts = make_experts(megasparse.SparseGroupedMLP, sparsity, dtype, add_bias_linear=True)
        linears = [e.linear_fc1 for e in experts.local_experts]
        linears += [e.linear_fc2 for e in experts.local_experts]
    else:
        experts = make_te_experts(megasparse.SparseTEGroupedMLP, sparsity, dtype)
        linears = [experts.linear_fc1, experts.linear_fc2]
    calls, finish_gathers = _gather_weights_in_forward_pre_hooks(linears)
    x, probs, tokens = make_expert_inputs(dtype)
    with torch.no_grad():
        first = experts(x, tokens, probs)[0]
    finish_gathers()  # nothing left to do where the hooks ran
    checked = experts if grouped == "SparseGroupedMLP" else PerExpertView(experts)
    check_experts_against_reference(
        checked, x, probs, tokens, (64, 2, 4), tol
    )  # the gathered weights
    with torch.no_grad():
        torch.testing.assert_close(first, experts(x, tokens, probs)[0], rtol=0, atol=0)
    assert sorted(map(id, calls)) == sorted(map(id, linears * 3))  # each linear's, per forward


@pytest.mark.parametrize("cls", [SparseSequentialMLP, SparseGroupedMLP])
def test_sparse_experts_run_under_inference_mode_as_under_no_grad(cls):
    experts = make_experts(cls, SparsityConfig(activations="2:4", backend="dense"), torch.float32)
    x, probs, tokens = make_expert_inputs(torch.float32)
    with torch.no_grad():
        expected = experts(x, tokens, probs)[0]
    with torch.inference_mode():
        got = experts(x, tokens, probs)[0]
    assert got.is_inference() and torch.equal(got, expected)


@pytest.mark.parametrize("cls", [SparseSequentialMLP, SparseGroupedMLP])
def test_expert_checkpoints_are_interchangeable_with_dense_sequential_mlp(cls):
    from megatron.core import parallel_state

    dense = make_experts(SequentialMLP, None, dtype=torch.float32, seed=3)
    sparse = make_experts(cls, SparsityConfig(), dtype=torch.float32, seed=4)
    sd_dense, sd_sparse = dense.state_dict(), sparse.state_dict()
    assert list(sd_dense) == list(sd_sparse)
    assert all(
        getattr(sd_dense[k], "shape", None) == getattr(sd_sparse[k], "shape", None)
        for k in sd_dense
    )
    meta = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    sh_dense, sh_sparse = (
        dense.sharded_state_dict("moe.experts.", metadata=meta),
        sparse.sharded_state_dict("moe.experts.", metadata=meta),
    )
    assert sorted(sh_dense) == sorted(sh_sparse)
    for k, v in sh_dense.items():
        if hasattr(v, "global_shape"):
            assert (v.key, v.global_shape, v.global_offset) == (
                sh_sparse[k].key,
                sh_sparse[k].global_shape,
                sh_sparse[k].global_offset,
            )
    held = make_experts(cls, SparsityConfig(mask_refresh_interval=3), dtype=torch.float32, seed=4)
    extra = set(held.sharded_state_dict("moe.experts.", metadata=meta)) - set(sh_dense)
    assert extra and all("megasparse_" in k for k in extra)  # held masks add only their own entries
    sparse.load_state_dict(sd_dense)  # dense -> sparse
    dense2 = make_experts(SequentialMLP, None, dtype=torch.float32, seed=5)
    dense2.load_state_dict(sparse.state_dict())  # -> dense again: nothing lost
    for k, v in dense.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, dense2.state_dict()[k]), k


def test_all_tokens_to_other_ranks_still_gives_every_parameter_a_gradient():
    experts = make_experts(
        SparseGroupedMLP, SparsityConfig(activations="2:4", backend="dense"), dtype=torch.float32
    )
    x = torch.zeros(0, HIDDEN, requires_grad=True)
    y, _ = experts(x, torch.zeros(EXPERTS, dtype=torch.long), torch.zeros(0))
    (y.sum() + 0.0).backward()
    assert y.shape == (0, HIDDEN)
    assert all(p.grad is not None and not p.grad.any() for p in experts.parameters())


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 2e-4), (torch.float64, 1e-10)]
)  # grouped / looped path
def test_sparse_te_grouped_mlp_logic_matches_reference(dtype, tol):
    from megasparse import SparseTEGroupedMLP

    experts = make_te_experts(
        SparseTEGroupedMLP, SparsityConfig(activations="2:4", backend="dense"), dtype
    )
    x, probs, tokens = make_expert_inputs(dtype)
    check_experts_against_reference(PerExpertView(experts), x, probs, tokens, (64, 2, 4), tol)
    assert experts.activation_stats()["elements"] == sum(TOKENS_PER_EXPERT) * FFN


def test_disabled_sparse_te_grouped_mlp_is_te_grouped_mlp():
    from megatron.core.transformer.moe.experts import TEGroupedMLP

    from megasparse import SparseTEGroupedMLP

    sparse = make_te_experts(
        SparseTEGroupedMLP, SparsityConfig(enabled=False), torch.float32, seed=2
    )
    dense = make_te_experts(TEGroupedMLP, None, torch.float32, seed=2)
    x, probs, tokens = make_expert_inputs(torch.float32)
    assert torch.equal(sparse(x, tokens, probs)[0], dense(x, tokens, probs)[0])
    assert list(sparse.state_dict()) == list(dense.state_dict())


def test_sparse_te_grouped_mlp_honours_moe_act_recompute(monkeypatch):
    """recompute_modules=["moe_act"]: the sparse activation is recomputed in the backward (Megatron's
    CheckpointWithoutOutput), with the same outputs and gradients bit for bit."""
    from megatron.core import tensor_parallel

    from megasparse import SparseTEGroupedMLP

    used = []

    class Counting(tensor_parallel.CheckpointWithoutOutput):
        def discard_output_and_register_recompute(self, hook_tensor):
            used.append(True)
            return super().discard_output_and_register_recompute(hook_tensor)

    monkeypatch.setattr(tensor_parallel, "CheckpointWithoutOutput", Counting)
    x, probs, tokens = make_expert_inputs(torch.float32)
    results = []
    for recompute in (False, True):
        experts = make_te_experts(
            SparseTEGroupedMLP,
            SparsityConfig(activations="2:4", backend="dense"),
            torch.float32,
            seed=3,
        )
        if recompute:
            experts.config.recompute_granularity = "selective"
            experts.config.recompute_modules = ["moe_act"]
        xr = x.clone().requires_grad_(True)
        y, _ = experts(xr, tokens, probs)
        y.backward(torch.ones_like(y))
        results.append([y.detach(), xr.grad] + [p.grad for p in experts.parameters()])
    assert used  # the recompute path ran
    for plain, recomputed in zip(*results):
        assert torch.equal(plain, recomputed)


def test_fp8_experts_run_each_experts_fp8_linears_including_an_empty_one():
    """fp8 experts leave the grouped path (its GEMMs are not FP8) for the per-expert loop, whose
    local linears run FP8 2:4; the expert with 0 tokens gets zero weight gradients."""
    sparsity = SparsityConfig(fp8="hybrid", activations="2:4")
    experts = make_experts(SparseGroupedMLP, sparsity, dtype=torch.float32)
    x, probs, tokens = make_expert_inputs(torch.float32)
    assert not experts._can_group(x)
    xr = x.clone().requires_grad_(True)
    y, _ = experts(xr, tokens, probs)
    y.sum().backward()
    start = 0
    for e, n in enumerate(TOKENS_PER_EXPERT):
        expert = experts.local_experts[e]
        rows = slice(start, start + n)
        start += n
        if n == 0:
            assert expert.linear_fc1.weight.grad.abs().sum() == 0
            continue
        with torch.no_grad():
            h, _ = expert.linear_fc1(x[rows])
            a = expert.activation_func(h) * probs[rows].unsqueeze(-1)
            ref, _ = expert.linear_fc2(a)
        torch.testing.assert_close(y[rows], ref, rtol=1e-5, atol=1e-5)
    plain = make_experts(SparseGroupedMLP, SparsityConfig(activations="2:4"), dtype=torch.float32)
    y_plain, _ = plain(x, tokens, probs)  # the same experts without FP8
    rel = ((y - y_plain).norm() / y_plain.norm()).item()
    assert 0 < rel < 0.1  # FP8 changed the result, by FP8's error only
