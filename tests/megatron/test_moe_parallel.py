"""Sparse experts inside Megatron's MoELayer over gloo (2 processes): EP=2 and expert-TP=2.

Reference: on every rank, its own tokens through the router's choices and the FULL expert
weights in float64 (what EP=1 / ETP=1 computes): out[t] = sum_e p[t, e] * expert_e(x[t]).
Activations are 2:4 (per token, so the reference is independent of how tokens are grouped).
"""

import pytest
import torch
import torch.distributed as dist

from megasparse import SparsityConfig
from megasparse.testing import run_distributed

HIDDEN, FFN, EXPERTS, TOPK = 16, 32, 4, 2


def _full_expert_weights():
    g = torch.Generator().manual_seed(42)
    return {
        "w1": torch.randn(EXPERTS, FFN, HIDDEN, generator=g, dtype=torch.float64),
        "w2": torch.randn(EXPERTS, HIDDEN, FFN, generator=g, dtype=torch.float64),
        "router": torch.randn(EXPERTS, HIDDEN, generator=g, dtype=torch.float64),
    }


def _moe_layer(experts_cls, dispatcher, ep, etp, dtype):
    from megatron.core.activations import squared_relu
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron_helpers import make_config

    from megasparse.megatron.compat import LINEARS_ARE_BUILDERS

    cfg = make_config(
        dtype=dtype,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        moe_ffn_hidden_size=FFN,
        num_attention_heads=2,
        num_moe_experts=EXPERTS,
        moe_router_topk=TOPK,
        moe_token_dispatcher_type=dispatcher,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        add_bias_linear=False,
        activation_func=squared_relu,
        moe_aux_loss_coeff=0.0,
        moe_router_load_balancing_type="none",
    )
    sparsity = SparsityConfig(activations="2:4", mask="transposable", backend="dense")
    mlp = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    if LINEARS_ARE_BUILDERS:
        import functools

        experts = functools.partial(experts_cls, submodules=mlp, sparsity=sparsity)
    else:
        experts = ModuleSpec(module=experts_cls, params={"sparsity": sparsity}, submodules=mlp)
    return MoELayer(cfg, MoESubmodules(experts=experts), layer_number=1)


def _load_full_weights(moe, full, ep, etp):
    from megatron.core import parallel_state as ps

    ep_rank = ps.get_expert_model_parallel_rank() if ep > 1 else 0
    etp_rank = ps.get_expert_tensor_parallel_rank() if etp > 1 else 0
    shard = FFN // etp
    cols = slice(etp_rank * shard, (etp_rank + 1) * shard)
    with torch.no_grad():
        moe.router.weight.copy_(full["router"])
        for i, expert in enumerate(moe.experts.local_experts):
            e = ep_rank * len(moe.experts.local_experts) + i
            expert.linear_fc1.weight.copy_(full["w1"][e][cols])
            expert.linear_fc2.weight.copy_(full["w2"][e][:, cols])


def _reference(x, probs, full):
    """float64: sum over chosen experts of p * fc2(sparsify24(relu(fc1(x))^2)), transposable weight masks."""
    from megasparse.kernels import activation_sparsify_reference, mask_transposable_reference

    out = torch.zeros_like(x, dtype=torch.float64)
    for e in range(EXPERTS):
        w1 = full["w1"][e] * mask_transposable_reference(full["w1"][e])
        w2 = full["w2"][e] * mask_transposable_reference(full["w2"][e])
        h = x.double() @ w1.t()
        a = activation_sparsify_reference(h, 64, 4, squared_relu=True)[0]
        out += probs[:, e : e + 1].double() * (a @ w2.t())
    return out


def _moe_worker(experts_cls_name, dispatcher, ep, etp, dtype_name):
    from megasparse.megatron import experts as sparse_experts

    dtype = getattr(torch, dtype_name)
    moe = _moe_layer(getattr(sparse_experts, experts_cls_name), dispatcher, ep, etp, dtype)
    full = _full_expert_weights()
    _load_full_weights(moe, full, ep, etp)
    rank = dist.get_rank()
    x = torch.randn(
        6, 2, HIDDEN, generator=torch.Generator().manual_seed(100 + rank), dtype=torch.float64
    ).to(dtype)
    out, _ = moe(x)
    probs, routing_map = moe.router(x.reshape(-1, HIDDEN))
    assert routing_map.sum(1).eq(TOPK).all()
    ref = _reference(x.reshape(-1, HIDDEN), probs.detach(), full).reshape(x.shape)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(
        out.double(),
        ref,
        rtol=tol,
        atol=tol,
        msg=lambda m: f"rank {rank} {experts_cls_name} {dispatcher} ep={ep} etp={etp}: {m}",
    )
    out.sum().backward()
    for name, p in moe.experts.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


ALLTOALL_NEEDS_CUDA = (
    pytest.mark.gpu
)  # Megatron's alltoall dispatcher creates CUDA streams in __init__

CASES = [
    ("SparseSequentialMLP", "allgather", 2, 1, "float64"),
    pytest.param("SparseSequentialMLP", "alltoall", 2, 1, "float64", marks=ALLTOALL_NEEDS_CUDA),
    ("SparseSequentialMLP", "allgather", 1, 2, "float64"),
    ("SparseGroupedMLP", "allgather", 2, 1, "float32"),
    ("SparseGroupedMLP", "allgather", 1, 2, "float32"),
]


@pytest.mark.parametrize("experts_cls,dispatcher,ep,etp,dtype", CASES)
def test_moe_layer_with_sparse_experts_matches_full_weight_reference(
    experts_cls, dispatcher, ep, etp, dtype
):
    run_distributed(
        _moe_worker,
        world_size=2,
        args=(experts_cls, dispatcher, ep, etp, dtype),
        tensor_model_parallel_size=1,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
