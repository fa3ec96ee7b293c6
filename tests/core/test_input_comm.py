"""Column-parallel input communication inside the sparse linear ops, on 2 gloo ranks.

Each rank holds its own weight shard (a column-parallel layer's rows); the input is replicated, or
sharded along the tokens with sequence parallelism. Checked on every rank:
- the order of the backward's work: under sequence parallelism the saved input shard's all-gather
  launched, dgrad GEMM, the gather waited for; then the reduction launched, wgrad GEMM (and
  main_grad fusion), the reduction waited for (recorded by wrapping the backend's dgrad GEMM, the
  op's weight-gradient step, torch.distributed's collectives and their handles' waits);
- a collective launched is waited for also when the work beside it raises;
- output and gradients against the float64 masked reference built from every rank's shard (the
  input gradient is the sum over ranks of dY_r (W_r*M_r), sliced to the rank's tokens under SP),
  and equal to the unfused path (the op on the gathered input, its input gradient all-reduced
  after the backward);
- main_grad fusion, 0 tokens, and the FP8 op's order and gradients.
"""

import contextlib

import torch
import torch.distributed as dist

from megasparse import SparsityConfig
from megasparse.core import linear_op
from megasparse.core.backends import DenseBackend
from megasparse.core.input_comm import ColumnInputComm
from megasparse.core.linear_op import LinearPlan, sparse_linear
from megasparse.core.masks import weight_mask
from megasparse.testing import run_distributed
from reference import masked_linear_reference

TOKENS, BATCH, HIDDEN, ROWS = 6, 2, 16, 8  # TOKENS: the total sequence, split over 2 ranks
F64 = torch.float64


class _RecordingBackend(DenseBackend):
    def __init__(self, events):
        self.events = events

    def input_grad(self, dy2d, w, sparse):
        self.events.append("dgrad GEMM")
        return super().input_grad(dy2d, w, sparse)


class _RecordedHandle:
    def __init__(self, handle, events, event):
        self.handle, self.events, self.event = handle, events, event

    def wait(self):
        result = self.handle.wait()
        self.events.append(self.event)
        return result


@contextlib.contextmanager
def _recorded(events, monkey_targets):
    """Record the collectives (and their waits) and each `(module, name, event)` call."""
    saved = []

    def wrap(module, name, event, async_event="comm start", wait_event="wait"):
        original = getattr(module, name)

        def recorded(*args, **kwargs):
            if kwargs.get("async_op"):
                events.append(async_event)
                return _RecordedHandle(original(*args, **kwargs), events, wait_event)
            events.append(event)
            return original(*args, **kwargs)

        saved.append((module, name, original))
        setattr(module, name, recorded)

    wrap(dist, "all_reduce", "comm start")
    wrap(dist, "reduce_scatter_tensor", "comm start")
    wrap(dist, "all_gather_into_tensor", "forward gather", "gather start", "gather wait")
    for target in monkey_targets:
        wrap(*target)
    try:
        yield
    finally:
        for module, name, original in reversed(saved):
            setattr(module, name, original)


def _tensors(rank, tokens=TOKENS, dtype=F64):
    """The replicated total input and every rank's weight shard, bias and output gradient."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, BATCH, HIDDEN, generator=g, dtype=F64)
    shards = []
    for _ in range(2):
        w = torch.randn(ROWS, HIDDEN, generator=g, dtype=F64)
        b = torch.randn(ROWS, generator=g, dtype=F64)
        dy = torch.randn(tokens, BATCH, ROWS, generator=g, dtype=F64)
        shards.append((w.to(dtype), b.to(dtype), dy.to(dtype)))
    return x.to(dtype), shards


def _local(x_total, rank, sequence_parallel):
    if not sequence_parallel:
        return x_total
    per_rank = x_total.shape[0] // 2
    return x_total[rank * per_rank : (rank + 1) * per_rank]


def _expected(x_total, shards, rank, mask_kind, gradient, sequence_parallel):
    """float64: this rank's output and weight / bias gradients, its share of the summed dX."""
    refs = []
    for w, b, dy in shards:
        mask = weight_mask(w, mask_kind)
        refs.append(masked_linear_reference(x_total, w, b, mask, gradient, 0.1, grad_output=dy))
    dx_total = refs[0]["dx"] + refs[1]["dx"]
    return refs[rank], _local(dx_total, rank, sequence_parallel)


def _run(x_local, w, b, dy, mask, plan, sparsity, fused=False):
    x = x_local.clone().requires_grad_(True)
    weight, bias = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    if fused:
        weight.main_grad = torch.zeros(w.shape, dtype=F64)
        weight.grad_added_to_main_grad = False
    y = sparse_linear(x, weight, bias, mask, plan, sparsity)
    y.backward(dy)
    return y, x, weight, bias


def _check_order(events, where, sequence_parallel, dgrad="dgrad GEMM"):
    backward = [e for e in events if e != "forward gather"]
    expected = [dgrad, "comm start", "wgrad", "wait"]
    if sequence_parallel:  # the saved local input shard is gathered again while the dgrad runs
        expected = ["gather start", dgrad, "gather wait", *expected[1:]]
    assert backward == expected, f"{where}: {events}"


def _check_sparse_op(rank, sequence_parallel, mask_kind, gradient, fused):
    where = f"rank {rank} sp={sequence_parallel} {mask_kind}/{gradient} fused={fused}"
    group = dist.group.WORLD
    x_total, shards = _tensors(rank)
    w, b, dy = shards[rank]
    mask = weight_mask(w, mask_kind)
    sparsity = SparsityConfig(mask=mask_kind, gradient=gradient, srste_decay=0.1)
    ref, ref_dx = _expected(x_total, shards, rank, mask_kind, gradient, sequence_parallel)
    events = []
    comm = ColumnInputComm(group, sequence_parallel)
    plan = LinearPlan(
        _RecordingBackend(events),
        mask_kind == "transposable",
        gradient_accumulation_fusion=fused,
        input_comm=comm,
    )
    with _recorded(events, [(linear_op, "_weight_grad", "wgrad")]):
        y, x, weight, bias = _run(
            _local(x_total, rank, sequence_parallel), w, b, dy, mask, plan, sparsity, fused
        )
    _check_order(events, where, sequence_parallel)
    assert ("forward gather" in events) == sequence_parallel, where
    close = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, ref["y"], **close, msg=lambda m: f"{where} y: {m}")
    torch.testing.assert_close(x.grad, ref_dx, **close, msg=lambda m: f"{where} dx: {m}")
    dw = weight.main_grad if fused else weight.grad
    torch.testing.assert_close(dw, ref["dw"], **close, msg=lambda m: f"{where} dw: {m}")
    torch.testing.assert_close(bias.grad, ref["db"], **close, msg=lambda m: f"{where} db: {m}")
    if fused:
        assert weight.grad_added_to_main_grad, where

    # the unfused path: the op on the total input, its input gradient reduced afterwards
    unfused = LinearPlan(DenseBackend(), mask_kind == "transposable", fused)
    y_u, x_u, weight_u, bias_u = _run(x_total, w, b, dy, mask, unfused, sparsity, fused)
    dist.all_reduce(x_u.grad, group=group)
    torch.testing.assert_close(y, y_u, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, _local(x_u.grad, rank, sequence_parallel), rtol=0, atol=0)
    torch.testing.assert_close(
        weight.main_grad if fused else weight.grad,
        weight_u.main_grad if fused else weight_u.grad,
        rtol=0,
        atol=0,
    )


def _check_compact_dh(rank, sequence_parallel):
    """fc1 of a SparseMLP: dH arrives carrying its compact V:N:M form; the dgrad gathers its chosen
    columns (gather_k_matmul), then the same overlap."""
    from megasparse.config import ActivationPattern
    from megasparse.core import compact_activation
    from megasparse.core.activation_sparsity import ActivationStats, squared_relu_sparsify

    where = f"rank {rank} compact dH sp={sequence_parallel}"
    x_total, shards = _tensors(rank)
    pattern = ActivationPattern(16, 4, 8)  # 12 token rows: a ragged last block of V=16
    marked = [squared_relu_sparsify(dy, pattern, ActivationStats())[0] for _, _, dy in shards]
    shards = [(w, b, dy) for (w, b, _), dy in zip(shards, marked)]
    w, b, dy = shards[rank]
    ref, ref_dx = _expected(x_total, shards, rank, "1d", "ste", sequence_parallel)
    events = []
    plan = LinearPlan(
        _RecordingBackend(events), input_comm=ColumnInputComm(dist.group.WORLD, sequence_parallel)
    )
    targets = [(linear_op, "_weight_grad", "wgrad")]
    targets += [(compact_activation, "gather_k_matmul", "compact dgrad GEMM")]
    with _recorded(events, targets):
        y, x, weight, bias = _run(
            _local(x_total, rank, sequence_parallel),
            w,
            b,
            dy,
            weight_mask(w),
            plan,
            SparsityConfig(),
        )
    _check_order(events, where, sequence_parallel, dgrad="compact dgrad GEMM")
    close = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, ref_dx, **close, msg=lambda m: f"{where} dx: {m}")
    torch.testing.assert_close(weight.grad, ref["dw"], **close, msg=lambda m: f"{where} dw: {m}")


def _check_empty(rank, sequence_parallel):
    """0 tokens on every rank: no GEMM, no communication, zero gradients."""
    x_total, shards = _tensors(rank, tokens=0)
    w, b, dy = shards[rank]
    mask = weight_mask(w)
    events = []
    plan = LinearPlan(input_comm=ColumnInputComm(dist.group.WORLD, sequence_parallel))
    with _recorded(events, []):
        y, x, weight, bias = _run(x_total, w, b, dy, mask, plan, SparsityConfig())
    assert y.shape == (0, BATCH, ROWS) and x.grad.shape == x_total.shape
    assert events == [], events
    assert torch.equal(weight.grad, torch.zeros_like(w))
    assert torch.equal(bias.grad, torch.zeros_like(b))


def _check_fp8_op(rank, sequence_parallel):
    """The FP8 op (CPU emulation): the same order, and the fused result equals the unfused one."""
    from megasparse.core.weight_state import WeightStep
    from megasparse.fp8 import linear as fp8_linear

    where = f"rank {rank} fp8 sp={sequence_parallel}"
    group = dist.group.WORLD
    x_total, shards = _tensors(rank, tokens=32, dtype=torch.float32)  # 16 tokens a rank
    x_total = x_total.to(torch.bfloat16)
    w, b, dy = shards[rank]
    w = torch.nn.functional.pad(w, (0, 0, 0, 16 - ROWS))  # FP8 GEMMs: dims multiples of 16
    b, dy = torch.nn.functional.pad(b, (0, 16 - ROWS)), torch.nn.functional.pad(dy, (0, 16 - ROWS))
    dy = dy.to(torch.bfloat16)
    mask = weight_mask(w)
    sparsity = SparsityConfig()

    def run(x_in, comm, events):
        x = x_in.clone().requires_grad_(True)
        weight, bias = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        step = WeightStep(weight, _bits(mask), DenseBackend(), False, True, sparsity=sparsity)
        plan = fp8_linear.default_plan(out_dtype=torch.bfloat16, input_comm=comm)
        targets = [(fp8_linear, "_weight_gradient", "wgrad")]
        targets += [(fp8_linear.fp8_gemm, "sparse_fp8_mm", "forward GEMM")]
        targets += [(fp8_linear.fp8_gemm, "dense_fp8_mm", "dense FP8 GEMM")]
        with _recorded(events, targets):
            y = fp8_linear.fp8_sparse_linear_step(x, weight, bias, step, plan)
            y.backward(dy)
        return y, x, weight

    events = []
    comm = ColumnInputComm(group, sequence_parallel)
    y, x, weight = run(_local(x_total, rank, sequence_parallel), comm, events)
    # 1d mask: the dgrad is a dense FP8 GEMM, and so is the wgrad (inside the gradient step)
    dgrad = ["dense FP8 GEMM"]
    expected = ["forward GEMM", *dgrad, "comm start", "wgrad", "dense FP8 GEMM", "wait"]
    if sequence_parallel:  # the saved e4m3 rows of the local shard are gathered during the dgrad
        dgrad = ["gather start", *dgrad, "gather wait"]
        expected = ["forward gather", "forward GEMM", *dgrad, *expected[2:]]
    assert events == expected, f"{where}: {events}"
    y_u, x_u, weight_u = run(x_total, None, [])
    dist.all_reduce(x_u.grad, group=group)
    torch.testing.assert_close(y, y_u, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, _local(x_u.grad, rank, sequence_parallel), rtol=0, atol=0)
    torch.testing.assert_close(weight.grad, weight_u.grad, rtol=0, atol=0)


def _bits(mask):
    from megasparse.core.masks import pack_mask

    return pack_mask(mask)


def _input_comm_worker():
    rank = dist.get_rank()
    assert dist.get_world_size() == 2
    for sequence_parallel in (False, True):
        for mask_kind, gradient, fused in (
            ("1d", "ste", False),
            ("transposable", "srste", False),
            ("1d", "ste", True),
            ("1d", "masked", True),
        ):
            _check_sparse_op(rank, sequence_parallel, mask_kind, gradient, fused)
        _check_compact_dh(rank, sequence_parallel)
        _check_empty(rank, sequence_parallel)
        _check_fp8_op(rank, sequence_parallel)


def test_input_comm_overlaps_the_weight_gradient_and_matches_the_references():
    # one spawn for every check: starting two processes costs more than the checks
    run_distributed(_input_comm_worker)


def test_single_process_comm_is_the_identity():
    x = torch.randn(4, 3, dtype=F64)
    comm = ColumnInputComm(None, sequence_parallel=True)
    assert comm.gather(x) is x and comm.total_tokens(4) == 4
    handle, out = comm.start_reduce(x)
    assert handle.wait() and out is x


class _StubComm:
    """A sequence-parallel comm of 2 ranks whose collectives only record their launch and wait."""

    sequence_parallel, world_size = True, 2

    def __init__(self, events):
        self.events = events

    def _handle(self, name):
        events = self.events

        class Handle:
            def wait(self):
                events.append(f"{name} wait")

        events.append(f"{name} start")
        return Handle()

    def start_gather(self, x):
        return self._handle("gather"), torch.cat([x, x])

    def start_reduce(self, grad):
        return self._handle("reduce"), grad[: grad.shape[0] // 2]


def test_collectives_are_waited_for_when_the_work_beside_them_raises():
    from megasparse.core.input_comm import column_backward

    x = torch.randn(2, 3, dtype=F64)

    def fails(*_):
        raise RuntimeError("GEMM failed")

    for input_grad_work, weight_work, expected in (
        (fails, lambda total: None, ["gather start", "gather wait"]),
        (
            lambda: torch.ones(4, 3),
            fails,
            ["gather start", "gather wait", "reduce start", "reduce wait"],
        ),
    ):
        events = []
        try:
            column_backward(_StubComm(events), x, input_grad_work, weight_work)
        except RuntimeError as error:
            assert str(error) == "GEMM failed"
        else:
            raise AssertionError("the work's error was swallowed")
        assert events == expected, events
