"""Sparse MoE experts at EP=1 (one gloo process): per-expert float64 references, grouping, checkpoints."""

import pytest
import torch
from megatron.core.activations import squared_relu
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP

from megasparse import SparseGroupedMLP, SparseSequentialMLP, SparsityConfig
from megatron_helpers import make_config
from reference import sparse_mlp_reference

pytestmark = pytest.mark.usefixtures("megatron_tp1")

HIDDEN, FFN, EXPERTS = 16, 32, 4
TOKENS_PER_EXPERT = [5, 0, 7, 3]  # an expert with no tokens, counts not aligned to anything


def _pg():
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


def _config(dtype=torch.float64, **kw):
    kw.setdefault("activation_func", squared_relu)
    # Megatron's own SequentialMLP cannot add an expert bias at EP=ETP=1 (in-place add on a view),
    # so experts here are bias-free, as in Megatron's MoE configs; the grouped path is tested with bias too.
    kw.setdefault("add_bias_linear", False)
    return make_config(dtype=dtype, hidden_size=HIDDEN, ffn_hidden_size=FFN, moe_ffn_hidden_size=FFN,
                       num_moe_experts=EXPERTS, **kw)


def _experts(cls, sparsity, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    extra = {} if cls is SequentialMLP else {"sparsity": sparsity}
    return cls(EXPERTS, _config(dtype, **kw), submodules, pg_collection=_pg(), **extra)


def _inputs(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = sum(TOKENS_PER_EXPERT)
    x = torch.randn(n, HIDDEN, generator=g, dtype=torch.float64) - 0.2
    probs = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    return x.to(dtype), probs.to(dtype), torch.tensor(TOKENS_PER_EXPERT)


def _check_against_reference(experts, x, probs, tokens, pattern, tol):
    xr = x.clone().requires_grad_(True)
    y, bias = experts(xr, tokens, probs)
    assert bias is None
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y.backward(dy.to(y.dtype))
    start = 0
    for e, n in enumerate(TOKENS_PER_EXPERT):
        rows = slice(start, start + n)
        start += n
        fc1, fc2 = experts.local_experts[e].linear_fc1, experts.local_experts[e].linear_fc2
        ref = sparse_mlp_reference(x[rows], fc1.weight, fc1.bias, fc2.weight, fc2.bias, fc1.sparsity_mask(),
                                   fc2.sparsity_mask(), pattern, "squared_relu", grad_output=dy[rows], probs=probs[rows])
        close = dict(rtol=tol, atol=tol)
        torch.testing.assert_close(y[rows].double(), ref["y"], **close, msg=f"expert {e} output")
        torch.testing.assert_close(xr.grad[rows].double(), ref["dx"], **close, msg=f"expert {e} input grad")
        for name, p in (("dw1", fc1.weight), ("db1", fc1.bias), ("dw2", fc2.weight), ("db2", fc2.bias)):
            if p is None:
                continue
            assert p.grad is not None, f"expert {e} {name}: every expert parameter gets a gradient"
            torch.testing.assert_close(p.grad.double(), ref[name], **close, msg=f"expert {e} {name}")


@pytest.mark.parametrize("activations,pattern", [(None, None), ("2:4", (64, 4)), ("4:2:8", (4, 8))])
def test_sparse_sequential_mlp_matches_per_expert_reference(activations, pattern):
    experts = _experts(SparseSequentialMLP, SparsityConfig(activations=activations, backend="dense"))
    x, probs, tokens = _inputs(torch.float64)
    _check_against_reference(experts, x, probs, tokens, pattern, 1e-10)
    masks = [e.linear_fc1.sparsity_mask() for e in experts.local_experts]
    assert not torch.equal(masks[0], masks[1])  # each expert has its own mask
    expected = sum(TOKENS_PER_EXPERT) * FFN if activations else 0
    assert experts.activation_stats()["elements"] == expected


@pytest.mark.parametrize("activations,pattern", [("2:4", (64, 4)), ("4:2:8", (4, 8))])
@pytest.mark.parametrize("mask", ["1d", "transposable"])
def test_sparse_grouped_mlp_runs_one_grouped_gemm_and_matches_reference(monkeypatch, activations, pattern, mask):
    calls = []
    original = torch._grouped_mm

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counting)
    sparsity = SparsityConfig(activations=activations, mask=mask, gradient="srste", srste_decay=0.0, backend="dense")
    experts = _experts(SparseGroupedMLP, sparsity, dtype=torch.float32)
    x, probs, tokens = _inputs(torch.float32)
    _check_against_reference(experts, x, probs, tokens, pattern, 2e-4)
    assert len(calls) == 6  # fc1, fc2 forward; and dX, dW of each in the backward: no per-expert loop
    assert experts.activation_stats()["elements"] == sum(TOKENS_PER_EXPERT) * FFN


def test_grouped_mlp_with_expert_bias_matches_reference():
    experts = _experts(SparseGroupedMLP, SparsityConfig(activations="2:4", backend="dense"), dtype=torch.float32,
                       add_bias_linear=True)
    x, probs, tokens = _inputs(torch.float32)
    assert experts._can_group(x)
    _check_against_reference(experts, x, probs, tokens, (64, 4), 2e-4)


def test_grouped_falls_back_to_the_loop_where_it_cannot_group():
    experts = _experts(SparseGroupedMLP, SparsityConfig(activations="2:4", backend="dense"))  # float64: no grouped GEMM
    x, probs, tokens = _inputs(torch.float64)
    assert not experts._can_group(x)
    _check_against_reference(experts, x, probs, tokens, (64, 4), 1e-10)


@pytest.mark.parametrize("cls", [SparseSequentialMLP, SparseGroupedMLP])
def test_expert_checkpoints_are_interchangeable_with_dense_sequential_mlp(cls):
    from megatron.core import parallel_state

    dense = _experts(SequentialMLP, None, dtype=torch.float32, seed=3)
    sparse = _experts(cls, SparsityConfig(mask_refresh_interval=3), dtype=torch.float32, seed=4)
    sd_dense, sd_sparse = dense.state_dict(), sparse.state_dict()
    assert list(sd_dense) == list(sd_sparse)
    assert all(getattr(sd_dense[k], "shape", None) == getattr(sd_sparse[k], "shape", None) for k in sd_dense)
    meta = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    sh_dense, sh_sparse = dense.sharded_state_dict("moe.experts.", metadata=meta), sparse.sharded_state_dict("moe.experts.", metadata=meta)
    assert sorted(sh_dense) == sorted(sh_sparse)
    for k, v in sh_dense.items():
        if hasattr(v, "global_shape"):
            assert (v.key, v.global_shape, v.global_offset) == (sh_sparse[k].key, sh_sparse[k].global_shape, sh_sparse[k].global_offset)
    sparse.load_state_dict(sd_dense)  # dense -> sparse
    dense2 = _experts(SequentialMLP, None, dtype=torch.float32, seed=5)
    dense2.load_state_dict(sparse.state_dict())  # -> dense again: nothing lost
    for k, v in dense.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, dense2.state_dict()[k]), k


def test_all_tokens_to_other_ranks_still_gives_every_parameter_a_gradient():
    experts = _experts(SparseGroupedMLP, SparsityConfig(activations="2:4", backend="dense"), dtype=torch.float32)
    x = torch.zeros(0, HIDDEN, requires_grad=True)
    y, _ = experts(x, torch.zeros(EXPERTS, dtype=torch.long), torch.zeros(0))
    (y.sum() + 0.0).backward()
    assert y.shape == (0, HIDDEN)
    assert all(p.grad is not None and not p.grad.any() for p in experts.parameters())
