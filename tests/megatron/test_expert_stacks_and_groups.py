"""Grouped experts across the micro-batches of one optimizer step whose gated expert set changes
(uneven, varying loads): the W*M of all experts is stacked once per step (zero-row groups for the
experts running alone), outputs and every gradient (per-step terms once, main_grad fusion under
Megatron DDP's rule) equal the float64 per-expert masked reference; and the group TE grouped experts
agree the speed gate and sum S-STE's beta over is the expert-TP group, not the dense TP group."""

import pytest
import torch

import megasparse
from megasparse import SparseGroupedMLP, SparsityConfig
from megasparse.core.weight_state import WeightStep
from megasparse.testing import run_distributed
from expert_builders import EXPERTS, HIDDEN, make_experts, make_te_experts
from reference import sparse_mlp_reference
from test_expert_sparse_gemms import GATE_TOKENS, sparse_backend  # noqa: F401  (fixture)

# per micro-batch, tokens per expert: each time other experts reach GATE_TOKENS (run alone), an
# expert with no tokens, all experts alone, none alone
MICRO_BATCHES = [[5, 1, 1, 0], [1, 6, 1, 1], [2, 1, 5, 7], [1, 1, 1, 1], [4, 5, 4, 6]]
DECAY = 0.05


def _alone(counts):
    return [e for e, n in enumerate(counts) if n >= GATE_TOKENS]


class _Experts:
    """Each expert's fc1 / fc2 weight and the module's sparse layers, for the local
    (SparseGroupedMLP) and the TE (SparseTEGroupedMLP) grouped experts alike."""

    def __init__(self, module):
        self.module = module
        if hasattr(module, "local_experts"):
            self.w1 = [e.linear_fc1.weight for e in module.local_experts]
            self.w2 = [e.linear_fc2.weight for e in module.local_experts]
            self.layers = [
                lin for e in module.local_experts for lin in (e.linear_fc1, e.linear_fc2)
            ]
        else:
            self.w1 = [getattr(module.linear_fc1, f"weight{e}") for e in range(EXPERTS)]
            self.w2 = [getattr(module.linear_fc2, f"weight{e}") for e in range(EXPERTS)]
            self.layers = [module.linear_fc1, module.linear_fc2]

    def masks(self):
        """The masks of this step, each expert weight's (fc1 then fc2)."""
        if hasattr(self.module, "local_experts"):
            return [e.linear_fc1.sparsity_mask() for e in self.module.local_experts] + [
                e.linear_fc2.sparsity_mask() for e in self.module.local_experts
            ]
        return [self.module.sparsity_mask(w) for w in self.w1 + self.w2]

    def fuse_wgrad(self):
        """Wgrad accumulation fusion on every expert linear, main_grad zeroed."""
        for layer in self.layers:
            layer.gradient_accumulation_fusion = True  # Megatron's local linears
            layer.fuse_wgrad_accumulation = True  # TE's
        for w in self.w1 + self.w2:
            w.main_grad = torch.zeros_like(w)
            w.grad_added_to_main_grad = False

    def step_gradient(self, w):
        """The weight's gradient of the step: main_grad under fusion, else .grad."""
        return w.main_grad if hasattr(w, "main_grad") else w.grad


def _ddp_hook(weights):
    """Megatron DDP's post-backward hook per micro-batch (distributed_data_parallel.py, 0.16.1 and
    0.19.2): .grad goes into main_grad unless the weight is flagged as added; the flag stays set
    for the rest of the step."""
    for w in weights:
        if w.grad is not None and not w.grad_added_to_main_grad:
            w.main_grad.add_(w.grad)
        w.grad = None


def _run_step(experts, dtype, step_seed, fused):
    """One optimizer step of MICRO_BATCHES micro-batches; returns the float64 reference of every
    weight gradient (per-expert masked MLPs, summed) and checks each output and input gradient."""
    masks = experts.masks()
    m1, m2 = masks[:EXPERTS], masks[EXPERTS:]
    expected = [torch.zeros_like(w, dtype=torch.float64) for w in experts.w1 + experts.w2]
    for mb, counts in enumerate(MICRO_BATCHES):
        g = torch.Generator().manual_seed(100 * step_seed + mb)
        x = torch.randn(sum(counts), HIDDEN, generator=g, dtype=torch.float64)
        probs = torch.rand(sum(counts), generator=g, dtype=torch.float64) + 0.1
        dy = torch.randn(sum(counts), HIDDEN, generator=g, dtype=torch.float64)
        xr = x.to(dtype).requires_grad_(True)
        y, _ = experts.module(xr, torch.tensor(counts), probs.to(dtype))
        y.backward(dy.to(dtype))
        if fused:
            _ddp_hook(experts.w1 + experts.w2)
        start = 0
        for e, n in enumerate(counts):
            rows = slice(start, start + n)
            start += n
            ref = sparse_mlp_reference(
                x[rows],
                experts.w1[e],
                None,
                experts.w2[e],
                None,
                m1[e],
                m2[e],
                None,
                "squared_relu",
                grad_output=dy[rows],
                probs=probs[rows],
            )
            msg = f"micro-batch {mb}, expert {e}"
            tol = dict(rtol=2e-4, atol=2e-4) if dtype == torch.float32 else {}
            torch.testing.assert_close(y[rows].double(), ref["y"], **tol, msg=msg + " output")
            torch.testing.assert_close(xr.grad[rows].double(), ref["dx"], **tol, msg=msg + " dx")
            expected[e] += ref["dw1"]
            expected[EXPERTS + e] += ref["dw2"]
    return expected, masks


@pytest.mark.usefixtures("megatron_tp1")
@pytest.mark.parametrize(
    "cls,dtype",
    [
        ("SparseGroupedMLP", torch.float32),  # one grouped GEMM (zero-row groups)
        ("SparseTEGroupedMLP", torch.float32),
        ("SparseTEGroupedMLP", torch.float64),  # no grouped GEMM for float64: one GEMM per expert
    ],
)
@pytest.mark.parametrize("gradient", ["ste", "srste", "masked"])
@pytest.mark.parametrize("fused", [False, True])
def test_changing_gated_sets_stack_once_per_step_and_match_the_reference(
    sparse_backend,  # noqa: F811
    monkeypatch,
    cls,
    dtype,
    gradient,
    fused,
):
    sparsity = SparsityConfig(backend="auto", gradient=gradient, srste_decay=DECAY)
    if cls == "SparseGroupedMLP":
        module = make_experts(SparseGroupedMLP, sparsity, dtype=dtype)
        assert module._can_group(torch.zeros(1, HIDDEN, dtype=dtype)) == (dtype == torch.float32)
    else:
        module = make_te_experts(getattr(megasparse, cls), sparsity, dtype)
    experts = _Experts(module)
    if fused:
        experts.fuse_wgrad()
    copies = []
    copy = WeightStep.dense_for_copy
    monkeypatch.setattr(WeightStep, "dense_for_copy", lambda s: copies.append(1) or copy(s))
    stacks = module._stacked.values()
    opt = torch.optim.SGD(experts.w1 + experts.w2, lr=0.1)
    for step in range(2):
        copies.clear()
        sparse_backend.gemms.clear()
        expected, masks = _run_step(experts, dtype, step, fused)
        # the gated sets changed from micro-batch to micro-batch ...
        sparse_rows = sorted(
            r for role, sparse, r in sparse_backend.gemms if role == "forward" and sparse
        )
        assert sparse_rows == sorted(2 * [c[e] for c in MICRO_BATCHES for e in _alone(c)])
        # ... yet each linear stacked the W*M of all experts once, one weight-sized copy
        assert len(copies) == 2 * EXPERTS
        held = sum(s.held().numel() for s in stacks)
        assert held == sum(w.numel() for w in experts.w1 + experts.w2)
        for e, (w, mask, want) in enumerate(zip(experts.w1 + experts.w2, masks, expected)):
            want = want.clone()
            if gradient == "masked":
                want *= mask
            elif gradient == "srste":  # the per-step term, once whatever the micro-batches
                want += DECAY * (~mask) * w.detach().double()
            got = experts.step_gradient(w)
            tol = dict(rtol=2e-4, atol=2e-4) if dtype == torch.float32 else {}
            torch.testing.assert_close(got.double(), want, **tol, msg=f"weight {e}, step {step}")
        opt.step()
        for w in experts.w1 + experts.w2:
            w.grad = None
            if fused:
                w.main_grad.zero_()
                w.grad_added_to_main_grad = False


# --- the speed gate's and S-STE's group of TE grouped experts, over 2 gloo ranks -----------------


def _gate_group_worker(expert_tp):
    """SparseTEGroupedMLP on 2 ranks whose token counts differ: the group handed to the speed gate
    and S-STE's beta sum group are the expert-TP group (None for one rank); with expert-TP 2 the
    beta is the one of the whole expert weight, its shards on the two ranks."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from backend_standins import CountingSparseBackend
    from megasparse.core import sparse_module, speed_gate
    from megasparse.core.gradients import sste_scale

    backend = CountingSparseBackend()
    sparse_module.resolve_backend = lambda *a, **k: backend
    speed_gate.applies = lambda requested, backend, weight: True
    groups = []

    def sparse_roles(layer, step, backend_, tokens, group=None):
        groups.append(group)
        return speed_gate.ROLES if tokens >= GATE_TOKENS else ()

    speed_gate.sparse_roles = sparse_roles
    rank = dist.get_rank()
    experts = make_te_experts(
        megasparse.SparseTEGroupedMLP,
        SparsityConfig(backend="auto", gradient="sste"),
        torch.float32,
        seed=rank,  # expert-TP 2: each rank holds other shards of the expert weights
    )
    for linear in (experts.linear_fc1, experts.linear_fc2):
        for weight, _ in linear.sparse_weights():
            # as the real ones are marked: TE's GroupedLinear marks every weight{i} tensor-parallel
            # (set_tensor_model_parallel_attributes(is_parallel=True); TE v2.5 and v2.17
            # grouped_linear.py), Megatron's TEGroupedLinear allreduce = not (is_expert and EP > 1)
            # (megatron-core 0.16.1 and 0.19.2 extensions/transformer_engine.py): True at EP=1
            weight.tensor_model_parallel, weight.allreduce = True, True
    counts = [[5, 0, 7, 3], [1, 1, 1, 1]][rank]  # the ranks' own tokens (sequence shards)
    x = torch.randn(sum(counts), HIDDEN, generator=torch.Generator().manual_seed(rank))
    y, _ = experts(x, torch.tensor(counts), torch.ones(sum(counts)))
    y.sum().backward()
    expected = parallel_state.get_expert_tensor_parallel_group()
    assert expected.size() == expert_tp
    assert groups and all((g is None) if expert_tp == 1 else (g is expected) for g in groups), (
        f"rank {rank}: the gate was asked over {groups}, not the expert-TP group"
    )
    for linear in (experts.linear_fc1, experts.linear_fc2):
        for e, (weight, state) in enumerate(linear.sparse_weights()):
            shards = [torch.empty_like(weight) for _ in range(expert_tp)]
            dist.all_gather(shards, weight.detach(), group=expected)
            full = torch.cat(shards, 0)  # beta is per tensor: any split of it gives the same sums
            beta = state.step(weight, linear.sparsity, backend).sste_beta
            torch.testing.assert_close(beta, sste_scale(full), msg=f"rank {rank} expert {e}")


@pytest.mark.parametrize(
    "sizes",
    [
        dict(tensor_model_parallel_size=2, expert_tensor_parallel_size=1),  # TP ranks: other tokens
        dict(tensor_model_parallel_size=1, expert_tensor_parallel_size=2),
    ],
)
def test_te_grouped_experts_agree_the_gate_and_sste_beta_over_the_expert_tp_group(sizes):
    run_distributed(
        _gate_group_worker, world_size=2, args=(sizes["expert_tensor_parallel_size"],), **sizes
    )
