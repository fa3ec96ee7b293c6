"""The input communication of a column-parallel sparse linear, run inside its op to overlap.

A column-parallel layer's input is replicated over its tensor-parallel group, or sharded along the
tokens (dim 0) with sequence parallelism. The forward all-gathers the shards (SP) into the total
input; the backward reduces the input gradient over the group: all-reduce (no SP) or
reduce-scatter back to the shards (SP). Megatron's own linear
(`LinearWithGradAccumulationAndAsyncCommunication`, megatron-core 0.16.1 and 0.19.2) and TE's
Linear backward (module/linear.py, TE 2.5 and main: `dgrad_work`) launch that reduction
asynchronously after the input-gradient GEMM and wait for it after the weight-gradient GEMM, so
the two overlap; megasparse's ops do the same with this description
(`LinearPlan.input_comm`, `Fp8LinearPlan.input_comm`): dgrad GEMM -> `start_reduce` -> wgrad GEMM
(and main_grad fusion) -> `wait()` -> the local input gradient.

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


def reduce_input_grad_overlapped(comm: Optional[ColumnInputComm], grad_total, weight_work):
    """The local input gradient of `grad_total` (None passes through), with `weight_work()` (the
    weight and bias gradient GEMMs) run while the reduction is in flight; returns (local input
    gradient, what weight_work returned)."""
    if comm is None or grad_total is None:
        return grad_total, weight_work()
    handle, out = comm.start_reduce(grad_total)
    result = weight_work()
    handle.wait()
    return out, result
