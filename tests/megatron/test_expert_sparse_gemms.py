"""Grouped experts on a sparse backend: experts the speed gate runs sparse use their own 2:4 GEMMs
on the per-step compressed W*M, the rest one grouped GEMM; checked against float64 per-expert
references with a counting stand-in for the sparse backend and a stand-in gate decision."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import megasparse
from megasparse import SparseGroupedMLP, SparsityConfig
from megasparse.core import speed_gate
from megasparse.core.sparse_operand import GRAD_OUTPUT, WEIGHT
from megasparse.core.weight_state import WeightStep
from backend_standins import CountingSparseBackend
from expert_builders import (
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

GATE_TOKENS = 4  # stand-in for the gate's smallest bucket: experts with 5 and 7 tokens run sparse
SPARSE_EXPERTS = [e for e, n in enumerate(TOKENS_PER_EXPERT) if n >= GATE_TOKENS]
DENSE_EXPERTS = [e for e, n in enumerate(TOKENS_PER_EXPERT) if n < GATE_TOKENS]  # incl. 0 tokens


class CountGroupedMM(TorchDispatchMode):
    """Rows of every torch._grouped_mm call (the backward's, by PyTorch's autograd, too)."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._grouped_mm:
            self.rows.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def sparse_backend(monkeypatch):
    """Every sparse layer resolves to the counting backend, and the stand-in gate runs an expert
    sparse from GATE_TOKENS tokens on (recording each decision asked for)."""
    backend = CountingSparseBackend()
    monkeypatch.setattr("megasparse.core.sparse_module.resolve_backend", lambda *a, **k: backend)
    monkeypatch.setattr(speed_gate, "applies", lambda requested, backend, weight: True)
    backend.decisions = []

    def sparse_roles(layer, step, backend_, tokens, group=None):
        assert backend_ is backend
        backend.decisions.append(tokens)
        return speed_gate.ROLES if tokens >= GATE_TOKENS else ()

    monkeypatch.setattr(speed_gate, "sparse_roles", sparse_roles)
    return backend


def _sparse_forwards(backend):
    return sorted(rows for role, sparse, rows in backend.gemms if role == "forward" and sparse)


@pytest.mark.parametrize("mask", ["1d", "transposable"])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_mlp_runs_gated_experts_sparse_and_the_rest_grouped(sparse_backend, mask, bias):
    sparsity = SparsityConfig(activations="2:4", mask=mask, backend="auto")
    experts = make_experts(SparseGroupedMLP, sparsity, dtype=torch.float32, add_bias_linear=bias)
    x, probs, tokens = make_expert_inputs(torch.float32)
    assert experts._can_group(x)
    with CountGroupedMM() as grouped:
        check_experts_against_reference(experts, x, probs, tokens, (64, 2, 4), 2e-4)
    sparse_rows = sorted(2 * [TOKENS_PER_EXPERT[e] for e in SPARSE_EXPERTS])
    assert _sparse_forwards(sparse_backend) == sparse_rows  # fc1 and fc2 of each gated expert
    input_grads = [sparse for role, sparse, _ in sparse_backend.gemms if role == "input_grad"]
    if mask == "transposable":  # the compressed (W*M)^T
        assert input_grads == [WEIGHT] * len(sparse_rows)
    else:  # fc2: dense on W*M; fc1: dH of the 2:4 activation as the sparse operand
        assert sorted(map(str, input_grads)) == sorted(
            map(str, [None, GRAD_OUTPUT] * len(SPARSE_EXPERTS))
        )
    dense_rows = sum(TOKENS_PER_EXPERT[e] for e in DENSE_EXPERTS)
    # fc1 and fc2 forward, and dX, dW of each: the dense experts' rows only
    assert len(grouped.rows) == 6 and all(dense_rows in shape for shape in grouped.rows)
    assert sorted(sparse_backend.decisions) == sorted(2 * TOKENS_PER_EXPERT)
    for e, expert in enumerate(experts.local_experts):
        for linear in (expert.linear_fc1, expert.linear_fc2):
            held = linear.sparsity_stats()["state_bytes"]
            weight_bytes = linear.weight.numel() * linear.weight.element_size()
            # alone: its compressed W*M, and (1d) W*M for the dense dgrad, held for the step;
            # together: only the stack holds its W*M
            assert ("compressed" in held) == (e in SPARSE_EXPERTS)
            held_dense = e in SPARSE_EXPERTS and mask == "1d"
            assert held.get("dense") == (weight_bytes if held_dense else None)


def test_an_expert_with_one_sparse_linear_runs_both_alone(sparse_backend, monkeypatch):
    """The gate runs fc1's shape sparse and fc2's dense: the gated experts run alone, fc2 dense on
    their W*M; the other experts stay in the grouped GEMM."""
    roles = lambda layer, step, backend, tokens, group=None: (  # noqa: E731
        speed_gate.ROLES if tokens >= GATE_TOKENS and step.weight.shape == (FFN, HIDDEN) else ()
    )
    monkeypatch.setattr(speed_gate, "sparse_roles", roles)
    experts = make_experts(SparseGroupedMLP, SparsityConfig(backend="auto"), dtype=torch.float32)
    x, probs, tokens = make_expert_inputs(torch.float32)
    with CountGroupedMM() as grouped:
        check_experts_against_reference(experts, x, probs, tokens, None, 2e-4)
    alone = sorted(TOKENS_PER_EXPERT[e] for e in SPARSE_EXPERTS)
    assert _sparse_forwards(sparse_backend) == alone  # fc1 only
    dense_forwards = [
        n for role, sparse, n in sparse_backend.gemms if role == "forward" and not sparse
    ]
    assert sorted(dense_forwards) == alone  # fc2 of the experts running alone
    dense_rows = sum(TOKENS_PER_EXPERT[e] for e in DENSE_EXPERTS)
    assert len(grouped.rows) == 6 and all(dense_rows in shape for shape in grouped.rows)


@pytest.mark.parametrize("activations,pattern", [(None, None), ("4:2:8", (4, 2, 8))])
def test_grouped_mlp_activations_on_the_mixed_path(sparse_backend, activations, pattern):
    """No activation sparsity, and a compacted pattern (each expert on SparseMLP's compact path,
    through its own linears, which take the same backend and gate)."""
    sparsity = SparsityConfig(activations=activations, backend="auto")
    experts = make_experts(SparseGroupedMLP, sparsity, dtype=torch.float32)
    x, probs, tokens = make_expert_inputs(torch.float32)
    check_experts_against_reference(experts, x, probs, tokens, pattern, 2e-4)
    # fc1 and fc2 of each gated expert; compacted, fc2 gathers the kept columns of (W*M)^T instead
    linears = 1 if activations else 2
    assert _sparse_forwards(sparse_backend) == sorted(
        linears * [TOKENS_PER_EXPERT[e] for e in SPARSE_EXPERTS]
    )


@pytest.mark.parametrize("activations,pattern", [("2:4", (64, 2, 4)), ("4:2:8", (4, 2, 8))])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.float64, 1e-10)])
def test_te_grouped_mlp_runs_gated_experts_sparse(sparse_backend, dtype, tol, activations, pattern):
    """bf16 branch of SparseTEGroupedMLP (TE's GroupedLinear stand-in): grouped (float32) and
    looped (float64: no grouped GEMM) dense experts beside the per-expert sparse ones; V:N:M
    blocks (4:2:8, its masked math) never mix two experts."""
    sparsity = SparsityConfig(activations=activations, backend="auto")
    experts = make_te_experts(megasparse.SparseTEGroupedMLP, sparsity, dtype)
    x, probs, tokens = make_expert_inputs(dtype)
    check_experts_against_reference(PerExpertView(experts), x, probs, tokens, pattern, tol)
    assert _sparse_forwards(sparse_backend) == sorted(
        2 * [TOKENS_PER_EXPERT[e] for e in SPARSE_EXPERTS]
    )


def _micro_batch_steps(experts, weights, monkeypatch, k=4, steps=2):
    """k micro-batches per optimizer step; per step, the compressions and W*M builds counted."""
    builds = []
    masked = WeightStep._masked
    monkeypatch.setattr(WeightStep, "_masked", lambda step: builds.append(1) or masked(step))
    opt = torch.optim.SGD(weights, lr=0.1)
    per_step = []
    for step in range(steps):
        backend = megasparse.core.sparse_module.resolve_backend()
        backend.compressed.clear()
        builds.clear()
        for micro_batch in range(k):
            x, probs, tokens = make_expert_inputs(torch.float32, seed=10 * step + micro_batch)
            y, _ = experts(x.requires_grad_(True), tokens, probs)
            y.square().sum().backward()
        per_step.append((list(backend.compressed), len(builds)))
        opt.step()
    return per_step


@pytest.mark.parametrize("mask", ["1d", "transposable"])
def test_each_sparse_expert_compresses_once_per_step_across_micro_batches(
    sparse_backend, monkeypatch, mask
):
    sparsity = SparsityConfig(activations="2:4", mask=mask, backend="auto")
    experts = make_experts(SparseGroupedMLP, sparsity, dtype=torch.float32)
    weights = [p for p in experts.parameters()]
    shapes = [(32, 16), (16, 32)]  # fc1 and fc2 W*M
    if mask == "transposable":
        shapes += [(16, 32), (32, 16)]  # their (W*M)^T for the sparse dgrad, held for the step
    for compressed, builds in _micro_batch_steps(experts, weights, monkeypatch):
        assert sorted(compressed) == sorted(shapes * len(SPARSE_EXPERTS))
        # per step, whatever the micro-batches: one W*M per expert weight (the 1d mask's, held,
        # also fills the stack of all experts); transposable (no W*M held) two more for each
        # sparse expert: its held (W*M)^T compression and the stack of all experts
        extra = 4 * len(SPARSE_EXPERTS) if mask == "transposable" else 0
        assert builds == 2 * len(TOKENS_PER_EXPERT) + extra
    assert len(sparse_backend.gemms) > 0


def test_sparse_and_grouped_experts_accumulate_into_main_grad(sparse_backend):
    """gradient_accumulation_fusion: the experts on their own sparse GEMMs and the grouped experts
    alike add their gradient into main_grad and return Megatron's dummy gradient (its DDP skips
    .grad of a weight flagged as added, so an expert grouped after running alone in the same step
    must not put its gradient in .grad); the float64 reference."""
    sparsity = SparsityConfig(backend="auto", gradient="masked")
    experts = make_experts(SparseGroupedMLP, sparsity, dtype=torch.float32)
    linears = [lin for e in experts.local_experts for lin in (e.linear_fc1, e.linear_fc2)]
    for linear in linears:
        linear.gradient_accumulation_fusion = True
        linear.weight.main_grad = torch.zeros_like(linear.weight)
        linear.weight.grad_added_to_main_grad = False
    x, probs, tokens = make_expert_inputs(torch.float32)
    reference = make_experts(SparseGroupedMLP, SparsityConfig(backend="dense", gradient="masked"))
    with torch.no_grad():  # the same weights, in float64
        for ref, ours in zip(reference.parameters(), experts.parameters()):
            ref.copy_(ours)
    xr = x.double().requires_grad_(True)
    y_ref, _ = reference(xr, tokens, probs.double())
    y, _ = experts(x.requires_grad_(True), tokens, probs)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y.backward(dy.float())
    y_ref.backward(dy)
    torch.testing.assert_close(y.double(), y_ref.detach(), rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=2e-4, atol=2e-4)
    for e, (ours, ref) in enumerate(zip(experts.local_experts, reference.local_experts)):
        for name in ("linear_fc1", "linear_fc2"):
            weight, expected = getattr(ours, name).weight, getattr(ref, name).weight.grad
            assert weight.grad_added_to_main_grad
            torch.testing.assert_close(weight.main_grad.double(), expected, rtol=2e-4, atol=2e-4)


def test_moe_act_recompute_on_the_mixed_path(sparse_backend, monkeypatch):
    """recompute_modules=["moe_act"]: each part (the experts running alone, the grouped rest)
    recomputes its activation in the backward, with the same outputs and gradients bit for bit."""
    from megatron.core import tensor_parallel

    used = []

    class Counting(tensor_parallel.CheckpointWithoutOutput):
        def discard_output_and_register_recompute(self, hook_tensor):
            used.append(True)
            return super().discard_output_and_register_recompute(hook_tensor)

    monkeypatch.setattr(tensor_parallel, "CheckpointWithoutOutput", Counting)
    x, probs, tokens = make_expert_inputs(torch.float32)
    results = []
    for recompute in (False, True):
        sparsity = SparsityConfig(activations="2:4", backend="auto")
        experts = make_te_experts(megasparse.SparseTEGroupedMLP, sparsity, torch.float32, seed=3)
        if recompute:
            experts.config.recompute_granularity = "selective"
            experts.config.recompute_modules = ["moe_act"]
        xr = x.clone().requires_grad_(True)
        y, _ = experts(xr, tokens, probs)
        y.backward(torch.ones_like(y))
        results.append([y.detach(), xr.grad] + [p.grad for p in experts.parameters()])
    assert len(used) == len(SPARSE_EXPERTS) + 1  # each expert alone, and the grouped rest
    for plain, recomputed in zip(*results):
        assert torch.equal(plain, recomputed)
