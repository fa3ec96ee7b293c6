"""The input communication of a column-parallel sparse linear, run inside its op to overlap.

A column-parallel layer's input is replicated over its tensor-parallel group, or sharded along the
tokens (dim 0) with sequence parallelism. The forward all-gathers the shards (SP) into the total
input; the backward reduces the input gradient over the group: all-reduce (no SP) or
reduce-scatter back to the shards (SP). Under SP the op saves only the local shard for the weight
gradient and all-gathers it again in the backward, as Megatron's own linear
(`LinearWithGradAccumulationAndAsyncCommunication`, megatron-core 0.16.1 and 0.19.2) and TE's
Linear / LayerNormLinear (module/linear.py, TE 2.5 and main: `backward_input_needs_gather`) do:
saving the gathered input would hold TP times the activation memory (h8192, 16k tokens, TP=8,
bf16: 224 MiB more per column layer per micro-batch in flight). Their backward, and megasparse's
ops with this description (`LinearPlan.input_comm`, `Fp8LinearPlan.input_comm`), run
`column_backward`: the input all-gather launched (SP) -> dgrad GEMM -> wait for the gather ->
the input gradient's reduction launched -> wgrad GEMM (and main_grad fusion) on the gathered
input -> wait -> the local input gradient; the gather overlaps the dgrad GEMM and the reduction
the wgrad GEMM.

On CUDA the collective runs on its communicator's stream and the wgrad GEMM on the compute stream.
As for Megatron's overlap, launch with CUDA_DEVICE_MAX_CONNECTIONS=1 so that the GPU starts the
communication kernel before the wgrad GEMM (with more hardware queues the GEMM may take the SMs
first and the communication runs after it, exposed).

Only torch.distributed: the group is given (the layer's tensor-parallel group).
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


class _Done:
    """The handle of a reduction that needed no communication."""

    def wait(self):
        return True


@dataclass(frozen=True)
class ColumnInputComm:
    """The input communication of one column-parallel call on `group` (a torch.distributed group).

    sequence_parallel: the input arrives sharded along dim 0 (tokens); the forward all-gathers it
    and the backward reduce-scatters the input gradient. Else the input is replicated: no forward
    communication, the backward all-reduces the input gradient (Megatron's allreduce_dgrad).
    A group of one rank communicates nothing."""

    group: Optional[object]
    sequence_parallel: bool

    @property
    def world_size(self) -> int:
        if self.group is None and not dist.is_initialized():
            return 1  # a single process: nothing to communicate
        return dist.get_world_size(self.group)

    def total_tokens(self, local_tokens: int) -> int:
        """The GEMM's token count for `local_tokens` input rows on this rank."""
        return local_tokens * self.world_size if self.sequence_parallel else local_tokens

    def gather(self, x_local: torch.Tensor) -> torch.Tensor:
        """The total input of the GEMM: the SP shards all-gathered along dim 0; else x_local."""
        size = self.world_size
        if not self.sequence_parallel or size == 1 or x_local.numel() == 0:
            return x_local  # (SP shards are equal: every rank skips an empty gather alike)
        total = x_local.new_empty((x_local.shape[0] * size, *x_local.shape[1:]))
        dist.all_gather_into_tensor(total, x_local.contiguous(), group=self.group)
        return total

    def own_shard(self, total: torch.Tensor) -> torch.Tensor:
        """A copy of this rank's rows of a tensor laid out as `gather`'s output (dim 0), in its
        own storage, so that saving it does not keep the total alive."""
        return total.chunk(self.world_size)[dist.get_rank(self.group)].clone()

    def start_gather(self, x_local: torch.Tensor):
        """Launch `gather(x_local)` without waiting: (handle, total). `total` holds the gathered
        input once `handle.wait()` has returned (x_local itself where nothing is communicated:
        no SP, one rank, or 0 tokens, which every rank has alike since SP shards are equal).
        e4m3 / e5m2 shards travel as their bytes (torch.distributed's backends differ on float8)."""
        size = self.world_size
        if not self.sequence_parallel or size == 1 or x_local.numel() == 0:
            return _Done(), x_local
        total = x_local.new_empty((x_local.shape[0] * size, *x_local.shape[1:]))
        send = x_local.contiguous()
        if x_local.element_size() == 1 and x_local.is_floating_point():
            send, receive = send.view(torch.uint8), total.view(torch.uint8)
        else:
            receive = total
        handle = dist.all_gather_into_tensor(receive, send, group=self.group, async_op=True)
        return handle, total

    def start_reduce(self, grad_total: torch.Tensor):
        """Launch the input gradient's reduction without waiting: (handle, out). `out` holds the
        local input gradient once `handle.wait()` has returned: the reduce-scatter's shard (SP) or
        `grad_total` all-reduced in place (it must be contiguous and not shared)."""
        size = self.world_size
        if size == 1 or grad_total.numel() == 0:
            return _Done(), grad_total
        if not self.sequence_parallel:
            if not grad_total.is_contiguous():
                grad_total = grad_total.contiguous()
            return dist.all_reduce(grad_total, group=self.group, async_op=True), grad_total
        rows = grad_total.shape[0]
        if rows % size:
            raise ValueError(
                f"megasparse: the sequence-parallel input gradient has {rows} rows, not a multiple "
                f"of the tensor-parallel size {size}; the input's dim 0 must be the sequence "
                "shard, the same size on every rank"
            )
        out = grad_total.new_empty((rows // size, *grad_total.shape[1:]))
        handle = dist.reduce_scatter_tensor(
            out, grad_total.contiguous(), group=self.group, async_op=True
        )
        return handle, out


def regathers(comm: Optional[ColumnInputComm]) -> bool:
    """Whether the op saves the local input shard and all-gathers it again in the backward."""
    return comm is not None and comm.sequence_parallel and comm.world_size > 1


def column_backward(comm: Optional[ColumnInputComm], saved_input, input_grad_work, weight_work):
    """The backward of a column-parallel call in Megatron's and TE's order; returns (local input
    gradient, what weight_work returned).

    saved_input: what the forward saved for the weight gradient: the local shard when
    `regathers(comm)` (all-gathered here while `input_grad_work()` runs), else the GEMM's input
    itself; None: the weight gradient needs no input. input_grad_work() -> the input gradient of
    the GEMM's total input, or None; weight_work(total_input) -> the weight and bias gradients,
    run while the input gradient's reduction is in flight. Every launched collective is waited
    for, also when the work beside it raises."""
    gather = regathers(comm) and saved_input is not None
    handle, total_input = comm.start_gather(saved_input) if gather else (_Done(), saved_input)
    try:
        grad_total = input_grad_work()
    finally:
        handle.wait()
    if comm is None or grad_total is None:
        return grad_total, weight_work(total_input)
    handle, grad_local = comm.start_reduce(grad_total)
    try:
        result = weight_work(total_input)
    finally:
        handle.wait()
    return grad_local, result
