"""Column-parallel TE linears at TP=2 (gloo): the input communication runs inside megasparse's op.

On both routes (bf16/fp16: core's sparse op; FP8 under fp8_autocast: the FP8 op) the input
gradient's all-reduce (no SP) or reduce-scatter (SP) is launched after the dgrad GEMM and waited
for after the wgrad GEMM; output and gradients equal the path that communicates through Megatron's
mappings around the op (the TP=1 / float64 comparisons are in test_te_sparse_route.py).
"""

import torch
import torch.distributed as dist

from megasparse import SparsityConfig
from megasparse.core import linear_op
from megasparse.fp8 import linear as fp8_linear
from megasparse.te import forward as te_forward
from megasparse.te import fp8_route
from megasparse.te.linear import sparse_te_class
from megasparse.testing import run_distributed
from te_standins import TELinearLike, current_recipe

SEQ, BATCH, HIDDEN, FFN = 8, 2, 32, 64  # FP8 GEMMs: weight dims multiples of 16 per rank


class _Recorder:
    """Records the async collectives, their waits and the wgrad step of both ops."""

    def __init__(self):
        self.events, self._saved = [], []

    def _wrap(self, module, name, event):
        original = getattr(module, name)
        events = self.events

        class Handle:
            def __init__(self, handle):
                self.handle = handle

            def wait(self):
                result = self.handle.wait()
                events.append("wait")
                return result

        def recorded(*args, **kwargs):
            result = original(*args, **kwargs)
            if event != "comm start" or kwargs.get("async_op"):
                events.append(event)
            return Handle(result) if kwargs.get("async_op") else result

        self._saved.append((module, name, original))
        setattr(module, name, recorded)

    def __enter__(self):
        self._wrap(dist, "all_reduce", "comm start")
        self._wrap(dist, "reduce_scatter_tensor", "comm start")
        self._wrap(linear_op, "_weight_grad", "wgrad")
        self._wrap(fp8_linear, "_weight_gradient", "FP8 wgrad")
        return self

    def __exit__(self, *exc):
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)


def _mapping_column_input(module, x, gemm=None, total_needed=False):
    """The column input through Megatron's mappings around the op (gemm=None)."""
    return _COLUMN_INPUT(module, x)


_COLUMN_INPUT = te_forward._column_input


def _run(fc1, x_in, dy, in_op):
    x = x_in.clone().requires_grad_(True)
    fc1.zero_grad()
    te_forward._column_input = _COLUMN_INPUT if in_op else _mapping_column_input
    try:
        with _Recorder() as recorder:
            y, _ = fc1(x)  # Megatron's TE wrapper: (out, bias)
            y.backward(dy)
    finally:
        te_forward._column_input = _COLUMN_INPUT
    return y.detach(), x.grad, fc1.weight.grad.clone(), fc1.bias.grad.clone(), recorder.events


def _worker():
    from megatron.core import parallel_state

    rank, tp = dist.get_rank(), dist.get_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    torch.manual_seed(3)
    x_full = torch.randn(SEQ, BATCH, HIDDEN)
    w, b = torch.randn(FFN, HIDDEN), torch.randn(FFN)
    dy_full = torch.randn(SEQ, BATCH, FFN)
    rows = slice(rank * FFN // tp, (rank + 1) * FFN // tp)
    seq = slice(rank * SEQ // tp, (rank + 1) * SEQ // tp)
    te_fp8_state = fp8_route.te_fp8_state
    for fp8 in (False, True):
        dtype = torch.float32 if fp8 else torch.float64
        fp8_route.te_fp8_state = (lambda: (True, current_recipe())) if fp8 else te_fp8_state
        try:
            for sequence_parallel in (False, True):
                where = f"rank {rank} fp8={fp8} sp={sequence_parallel}"
                fc1 = sparse_te_class(TELinearLike)(
                    HIDDEN,
                    FFN,
                    parallel_mode="column",
                    sequence_parallel=sequence_parallel,
                    tp_group=group,
                    params_dtype=dtype,
                    sparsity=SparsityConfig(),
                )
                with torch.no_grad():
                    fc1.weight.copy_(w[rows]), fc1.bias.copy_(b[rows])
                x = (x_full[seq] if sequence_parallel else x_full).to(dtype)
                dy = dy_full[..., rows].to(dtype)
                fused = _run(fc1, x, dy, in_op=True)
                wgrad = "FP8 wgrad" if fp8 else "wgrad"  # which op ran
                assert fused[-1] == ["comm start", wgrad, "wait"], f"{where}: {fused[-1]}"
                unfused = _run(fc1, x, dy, in_op=False)
                assert "wait" not in unfused[-1], f"{where}: {unfused[-1]}"
                for name, a, e in zip(("y", "dx", "dw", "db"), fused[:-1], unfused[:-1]):
                    torch.testing.assert_close(a, e, rtol=0, atol=0, msg=f"{where} {name}")
        finally:
            fp8_route.te_fp8_state = te_fp8_state


def test_tp2_column_te_linear_overlaps_its_input_communication_on_both_routes():
    run_distributed(_worker, world_size=2, tensor_model_parallel_size=2)
