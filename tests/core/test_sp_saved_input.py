"""Under sequence parallelism the column-parallel sparse op saves only the local input shard.

The op all-gathers the [T/TP, h] shards into the [T, h] GEMM input; for its weight gradient it
keeps the local shard and all-gathers it again in the backward, as TE's Linear / LayerNormLinear
(module/linear.py: backward_input_needs_gather, TE 2.5 and main) and Megatron's own linear do.
Checked on 2 gloo ranks with autograd's saved-tensor hooks (every tensor the op saves), and the
gradients against the float64 masked reference of the total input and both ranks' weight shards.
"""

import torch
import torch.distributed as dist

from megasparse import SparsityConfig
from megasparse.core.backends import DenseBackend
from megasparse.core.input_comm import ColumnInputComm
from megasparse.core.linear_op import LinearPlan, sparse_linear
from megasparse.core.masks import weight_mask
from megasparse.testing import run_distributed
from reference import masked_linear_reference

TOKENS, HIDDEN, ROWS = 12, 16, 8  # TOKENS: the total sequence, split over 2 ranks
F64 = torch.float64


def _saved_input_rows(run):
    """The token rows of every [rows, HIDDEN] tensor autograd saves while `run()` builds the graph."""
    rows = []

    def pack(t):
        if t.dim() == 2 and t.shape[-1] == HIDDEN and t.shape[0] != ROWS:
            rows.append(t.shape[0])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return rows, out


def _worker():
    rank, size = dist.get_rank(), dist.get_world_size()
    local = TOKENS // size
    g = torch.Generator().manual_seed(3)
    x_total = torch.randn(TOKENS, HIDDEN, generator=g, dtype=F64)
    weights = [torch.randn(ROWS, HIDDEN, generator=g, dtype=F64) for _ in range(size)]
    grads = [torch.randn(TOKENS, ROWS, generator=g, dtype=F64) for _ in range(size)]
    masks = [weight_mask(w) for w in weights]
    x = x_total[rank * local : (rank + 1) * local].clone().requires_grad_(True)
    weight = weights[rank].clone().requires_grad_(True)
    plan = LinearPlan(DenseBackend(), input_comm=ColumnInputComm(None, sequence_parallel=True))

    rows, y = _saved_input_rows(
        lambda: sparse_linear(x, weight, None, masks[rank], plan, SparsityConfig())
    )
    assert rows and max(rows) == local, (
        f"rank {rank}: the op saved inputs of {rows} rows for the backward; the local shard has "
        f"{local} (the backward all-gathers it again)"
    )
    y.backward(grads[rank])

    refs = [
        masked_linear_reference(x_total, w, None, m, "ste", grad_output=dy)
        for w, m, dy in zip(weights, masks, grads)
    ]
    close = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, refs[rank]["y"], **close)
    torch.testing.assert_close(weight.grad, refs[rank]["dw"], **close)
    dx_total = sum(ref["dx"] for ref in refs)
    torch.testing.assert_close(x.grad, dx_total[rank * local : (rank + 1) * local], **close)


def test_sequence_parallel_op_saves_the_local_input_shard():
    run_distributed(_worker, world_size=2, tensor_model_parallel_size=2)
