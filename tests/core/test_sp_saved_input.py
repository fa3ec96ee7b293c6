"""Under sequence parallelism the column-parallel sparse ops save only the local input shard.

The op all-gathers the [T/TP, h] shards into the [T, h] GEMM input; for its weight gradient it
keeps the local shard (the FP8 op: its e4m3 rows, cast with the total input's scale) and
all-gathers it again in the backward, as TE's Linear / LayerNormLinear (module/linear.py:
backward_input_needs_gather, TE 2.5 and main) and Megatron's own linear do. Checked on 2 gloo
ranks with autograd's saved-tensor hooks (every tensor the op saves), with a token count that is
no multiple of the FP8 GEMMs' 16: the bf16-path gradients against the float64 masked reference of
the total input and both ranks' weight shards; the FP8 op's equal, bit for bit, to the same op
on the total input with its input gradient all-reduced afterwards.
"""

import dataclasses

import torch
import torch.distributed as dist

from megasparse import SparsityConfig
from megasparse.core.backends import DenseBackend
from megasparse.core.input_comm import ColumnInputComm
from megasparse.core.linear_op import LinearPlan, sparse_linear
from megasparse.core.masks import pack_mask, weight_mask
from megasparse.core.weight_state import WeightStep
from megasparse.fp8 import linear as fp8_linear
from megasparse.testing import run_distributed
from reference import masked_linear_reference

TOKENS, HIDDEN, ROWS = 14, 16, 16  # TOKENS: the total sequence, split over 2 ranks; 7 a rank
F64 = torch.float64


def _largest_saved(run, weight):
    """(elements, bytes) of the largest tensor besides `weight` that autograd saves in `run()`,
    and run()'s result."""
    sizes = [(0, 0)]

    def pack(t):
        if t.data_ptr() != weight.data_ptr():
            sizes.append((t.numel(), t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return max(sizes), out


def _tensors(size):
    g = torch.Generator().manual_seed(3)
    x_total = torch.randn(TOKENS, HIDDEN, generator=g, dtype=F64)
    weights = [torch.randn(ROWS, HIDDEN, generator=g, dtype=F64) for _ in range(size)]
    grads = [torch.randn(TOKENS, ROWS, generator=g, dtype=F64) for _ in range(size)]
    return x_total, weights, grads


def _check_sparse_op(rank, size, comm):
    local = TOKENS // size
    x_total, weights, grads = _tensors(size)
    masks = [weight_mask(w) for w in weights]
    x = x_total[rank * local : (rank + 1) * local].clone().requires_grad_(True)
    weight = weights[rank].clone().requires_grad_(True)
    plan = LinearPlan(DenseBackend(), input_comm=comm)

    (elements, _), y = _largest_saved(
        lambda: sparse_linear(x, weight, None, masks[rank], plan, SparsityConfig()), weight
    )
    assert elements == local * HIDDEN, (
        f"rank {rank}: the op saved a tensor of {elements} elements for the backward; the local "
        f"input shard has {local * HIDDEN} (the backward all-gathers it again)"
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


def _check_fp8_op(rank, size, comm, fp8_wgrad):
    where = f"rank {rank} fp8_wgrad={fp8_wgrad}"
    local = TOKENS // size
    x_total, weights, grads = _tensors(size)
    x_total = x_total.to(torch.bfloat16)
    w, dy = weights[rank].float(), grads[rank].to(torch.bfloat16)

    def run(x_in, input_comm):
        x = x_in.clone().requires_grad_(True)
        weight = w.clone().requires_grad_(True)
        step = WeightStep(weight, pack_mask(weight_mask(w)), DenseBackend(), False, True)
        plan = fp8_linear.default_plan(out_dtype=torch.bfloat16, input_comm=input_comm)
        plan = dataclasses.replace(plan, fp8_wgrad=fp8_wgrad)
        largest, y = _largest_saved(
            lambda: fp8_linear.fp8_sparse_linear_step(x, weight, None, step, plan), weight
        )
        y.backward(dy)
        return largest, y, x, weight

    (elements, nbytes), y, x, weight = run(x_total[rank * local : (rank + 1) * local], comm)
    element_size = 1 if fp8_wgrad else 2  # e4m3 rows, or the bf16 input
    assert (elements, nbytes) == (local * HIDDEN, local * HIDDEN * element_size), (
        f"{where}: the op saved a tensor of {elements} elements, {nbytes} bytes; the local "
        f"input shard has {local * HIDDEN} elements"
    )
    _, y_u, x_u, weight_u = run(x_total, None)
    dist.all_reduce(x_u.grad)
    torch.testing.assert_close(y, y_u, rtol=0, atol=0, msg=lambda m: f"{where} y: {m}")
    torch.testing.assert_close(
        x.grad, x_u.grad[rank * local : (rank + 1) * local], rtol=0, atol=0, msg=where
    )
    torch.testing.assert_close(weight.grad, weight_u.grad, rtol=0, atol=0, msg=where)


def _worker():
    rank, size = dist.get_rank(), dist.get_world_size()
    comm = ColumnInputComm(None, sequence_parallel=True)
    _check_sparse_op(rank, size, comm)
    for fp8_wgrad in (True, False):
        _check_fp8_op(rank, size, comm, fp8_wgrad)


def test_sequence_parallel_ops_save_the_local_input_shard():
    run_distributed(_worker, world_size=2, tensor_model_parallel_size=2)
