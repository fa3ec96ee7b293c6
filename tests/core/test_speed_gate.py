"""Speed gate on CPU: an injected timer stands in for CUDA events; gloo stands in for NCCL."""

import json
import logging
import os

import pytest
import torch
import torch.distributed as dist

from megasparse.core import speed_gate
from megasparse.core.speed_gate import SpeedGate, token_bucket
from megasparse.testing import free_port
from backend_standins import EmptyRefusingBackend

SHAPE, DTYPE = (16384, 3584, 8192), torch.bfloat16


def dense():
    return "dense"


def sparse():
    return "sparse"


def timer_for(dense_s, sparse_s, calls=None):
    def timer(fn):
        if calls is not None:
            calls.append(fn())
        return dense_s if fn is dense else sparse_s

    return timer


def never_time(fn):
    raise AssertionError("the gate timed a GEMM although it should not have")


def gate_use(gate, role="forward", group=None):
    pairs = {role: (dense, sparse)}
    return role in gate.decide("fc1", SHAPE, DTYPE, pairs, "NVIDIA H100 80GB HBM3", group)


@pytest.fixture(autouse=True)
def _gate_on(monkeypatch):
    monkeypatch.delenv(speed_gate.SWITCH_ENV, raising=False)


@pytest.mark.parametrize("dense_s, sparse_s, expected", [(2.0, 1.0, True), (1.0, 1.25, False)])
def test_uses_sparse_only_where_it_wins(tmp_path, caplog, dense_s, sparse_s, expected):
    calls = []
    gate = SpeedGate(tmp_path / "gate.json", timer_for(dense_s, sparse_s, calls))
    with caplog.at_level(logging.INFO, logger="megasparse.speed_gate"):
        assert gate_use(gate) is expected
    assert sorted(calls) == ["dense", "sparse"]
    line = caplog.records[-1].getMessage()
    assert f"{dense_s / sparse_s:.2f}x" in line and ("sparse (" if expected else "dense (") in line
    assert "fc1 forward" in line


def test_cache_hit_avoids_timing_and_keys_by_role(tmp_path):
    path = tmp_path / "gate.json"
    assert gate_use(SpeedGate(path, timer_for(2.0, 1.0))) is True
    assert gate_use(SpeedGate(path, never_time)) is True  # a new process: read from the file
    with pytest.raises(AssertionError, match="timed"):
        gate_use(SpeedGate(path, never_time), role="input_grad")  # another role is another entry
    ((key, entry),) = json.loads(path.read_text()).items()
    assert "H100" in key and "forward" in key and "16384x3584x8192" in key and "bfloat16" in key
    assert entry == {"sparse": True, "ratio": 2.0}


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(speed_gate.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert speed_gate.cache_path() == tmp_path / "megasparse" / "speed_gate.json"
    monkeypatch.setenv(speed_gate.CACHE_ENV, str(tmp_path / "x.json"))
    assert speed_gate.cache_path() == tmp_path / "x.json"


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_corrupt_cache_is_ignored_kept_and_rewritten(tmp_path, content):
    path = tmp_path / "gate.json"
    path.write_text(content)
    with pytest.warns(UserWarning, match="unreadable"):
        assert gate_use(SpeedGate(path, timer_for(1.0, 2.0))) is False
    assert (tmp_path / "gate.json.corrupt").read_text() == content  # nothing lost
    assert list(json.loads(path.read_text()).values()) == [{"sparse": False, "ratio": 0.5}]


def test_switch_off_means_always_sparse(tmp_path, monkeypatch):
    monkeypatch.setenv(speed_gate.SWITCH_ENV, "0")
    path = tmp_path / "gate.json"
    assert gate_use(SpeedGate(path, never_time)) is True
    assert not path.exists()


@pytest.mark.parametrize("value", ["off", "false", "2", ""])
def test_switch_refuses_values_other_than_0_and_1(monkeypatch, value):
    monkeypatch.setenv(speed_gate.SWITCH_ENV, value)
    with pytest.raises(ValueError, match="MEGASPARSE_SPEED_GATE must be 0.*or 1.*got"):
        speed_gate.enabled()


def _tp_worker(rank, port, cache_dir, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # rank 0 measures a win, rank 1 a loss: both must run dense
        gate = SpeedGate(
            os.path.join(cache_dir, f"rank{rank}.json"),
            timer_for(2.0, 1.0) if rank == 0 else timer_for(1.0, 2.0),
        )
        decision = gate_use(gate, group=dist.group.WORLD)
        winner = SpeedGate(os.path.join(cache_dir, f"win{rank}.json"), timer_for(2.0, 1.0))
        both_win = gate_use(winner, group=dist.group.WORLD)
        with open(os.path.join(results, f"{rank}.json"), "w") as f:
            json.dump([decision, both_win], f)
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_ranks_agree(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    torch.multiprocessing.spawn(
        _tp_worker, args=(free_port(), str(tmp_path), str(results)), nprocs=2
    )
    assert [json.loads((results / f"{r}.json").read_text()) for r in (0, 1)] == [
        [False, True],
        [False, True],
    ]


def test_token_buckets_are_powers_of_two_from_the_smallest_up_to_the_largest():
    powers = [
        2**k for k in range(40) if speed_gate.SMALLEST_BUCKET <= 2**k <= speed_gate.LARGEST_BUCKET
    ]
    assert powers[0] == speed_gate.SMALLEST_BUCKET and powers[-1] == speed_gate.LARGEST_BUCKET
    g = torch.Generator().manual_seed(0)
    counts = [0, 1, 4095, 4096, 4097, 8191, 8192, 65535, 65536, 65537, 10**7]
    counts += torch.randint(0, 200_000, (500,), generator=g).tolist()
    for tokens in counts:
        below = [b for b in powers if b <= tokens]
        assert token_bucket(tokens) == (below[-1] if below else None), tokens


class RecordingBackend(EmptyRefusingBackend):
    """A sparse backend on CPU that refuses empty operands, as the sparse kernels do, and records
    its GEMMs: (role, sparse operand, rows)."""

    def __init__(self):
        self.calls = []

    def compress(self, matrix):
        assert matrix.numel() > 0, "sparse kernel called with an empty operand"
        return matrix

    def linear(self, x2d, w, bias, sparse):
        self.calls.append(("forward", sparse, x2d.shape[0]))
        return super().linear(x2d, w, bias, sparse)

    def input_grad(self, dy2d, w, sparse):
        self.calls.append(("input_grad", sparse, dy2d.shape[0]))
        return super().input_grad(dy2d, w, sparse)


class CountingGate(SpeedGate):
    """The gate with its file reads and writes counted."""

    def __init__(self, path, timer):
        super().__init__(path, timer)
        self.reads = self.writes = 0

    def _load(self):
        self.reads += 1
        return super()._load()

    def _store(self, key, decision):
        self.writes += 1
        super()._store(key, decision)


@pytest.fixture
def gated(monkeypatch, tmp_path):
    """backend='auto' layers on CPU that ask a fresh gate (injected timer: forward loses,
    input_grad wins) and run on a RecordingBackend; gate.timings lists the timed GEMMs."""
    backend = RecordingBackend()
    monkeypatch.setattr("megasparse.core.sparse_module.resolve_backend", lambda *a, **k: backend)
    monkeypatch.setattr(
        speed_gate, "applies", lambda requested, backend, weight: requested == "auto"
    )
    timings = []

    def timer(fn):
        before = len(backend.calls)
        fn()  # runs the GEMM: an empty operand would reach the backend here
        ((role, sparse, rows),) = backend.calls[before:]
        del backend.calls[before:]
        timings.append((role, sparse, rows))
        return {("forward", None): 1.0, ("input_grad", None): 2.0}.get((role, sparse), 1.5)

    gate = CountingGate(tmp_path / "gate.json", timer)
    gate.timings, gate.backend = timings, backend
    monkeypatch.setattr(speed_gate, "_GATE", gate)
    return gate


def _masked_reference(layer, x, dy):
    """float64 masked dense forward and input gradient."""
    w = (layer.weight * layer.sparsity_mask()).double()
    return x.double() @ w.t() + layer.bias.double(), dy.double() @ w


def _check_against_masked_reference(layer, token_counts):
    """Forward and input gradient of `layer` at each token count equal the float64 reference."""
    for tokens in token_counts:
        x = torch.randn(tokens, 16, dtype=torch.float64, requires_grad=True)
        y = layer(x)[0]
        dy = torch.randn_like(y)
        y.backward(dy)
        y_ref, dx_ref = _masked_reference(layer, x.detach(), dy)
        torch.testing.assert_close(y.detach(), y_ref)
        torch.testing.assert_close(x.grad, dx_ref)


@pytest.mark.usefixtures("megatron_tp1")
def test_empty_and_small_token_counts_run_dense_and_are_never_timed(gated):
    from megasparse import SparsityConfig
    from megatron_helpers import make_column, make_config

    layer = make_column(make_config(), 16, 32, SparsityConfig(mask="transposable"))
    _check_against_masked_reference(layer, (0, 1, 100, 4095, 0))
    assert gated.timings == [] and gated.reads == gated.writes == 0
    # the GEMMs with rows ran dense on W*M; the empty ones ran no GEMM at all
    assert all(sparse is None and rows > 0 for _, sparse, rows in gated.backend.calls)


@pytest.mark.usefixtures("megatron_tp1")
def test_layers_follow_the_gate_per_role_and_decide_once_per_bucket(gated):
    """backend='auto' on a GPU: a role the gate finds slower runs the dense GEMM on W*M; a bucket
    is timed once at its own token count, whatever count in it comes first."""
    from megasparse import SparsityConfig
    from megatron_helpers import make_column, make_config

    layer = make_column(make_config(), 16, 32, SparsityConfig(mask="transposable"))
    _check_against_masked_reference(layer, (5000, 4096, 8191, 6000))  # one bucket: 4096
    assert gated.timings == [
        ("forward", None, 4096),
        ("forward", "weight", 4096),
        ("input_grad", None, 4096),
        ("input_grad", "weight", 4096),
    ]
    assert set((role, sparse) for role, sparse, _ in gated.backend.calls) == {
        ("forward", None),
        ("input_grad", "weight"),
    }


@pytest.mark.usefixtures("megatron_tp1")
def test_gate_decisions_leave_the_global_rng_alone_so_recompute_matches(gated):
    """A decision inside a checkpointed region draws nothing from the global generator: the
    recompute (which restores the RNG state and finds the decision made) gives the dropout after
    the layer the forward's mask, and that mask is the one the seed gives without any gate."""
    from torch.utils.checkpoint import checkpoint

    from megasparse import SparsityConfig
    from megatron_helpers import make_column, make_config

    layer = make_column(make_config(), 16, 32, SparsityConfig(mask="transposable"))
    x = torch.randn(4096, 16, dtype=torch.float64)  # one bucket: the gate decides

    def block(inputs):
        return torch.nn.functional.dropout(layer(inputs)[0], 0.5, training=True)

    state = torch.get_rng_state()
    with torch.no_grad():
        layer(x)
    assert len(gated.decided) == 1 and torch.equal(torch.get_rng_state(), state)

    torch.manual_seed(5)
    keep = torch.nn.functional.dropout(torch.ones(4096, 32, dtype=torch.float64), 0.5)
    dy = torch.randn(4096, 32, dtype=torch.float64)
    y_ref, dx_ref = _masked_reference(layer, x, dy * keep)
    for checkpointed in (False, True):
        gated.decided.clear()  # decide again, inside the (checkpointed) forward
        torch.manual_seed(5)
        xr = x.clone().requires_grad_(True)
        y = checkpoint(block, xr, use_reentrant=False) if checkpointed else block(xr)
        y.backward(dy)
        assert len(gated.decided) == 1
        torch.testing.assert_close(y.detach(), y_ref * keep, msg=f"checkpointed={checkpointed}")
        torch.testing.assert_close(xr.grad, dx_ref, msg=f"checkpointed={checkpointed}")


def _random_loads(generator, experts, micro_batches):
    """Tokens per expert: a quarter of them 0, the rest log-uniform in [1, 20000]."""
    logs = torch.rand(micro_batches, experts, generator=generator) * torch.log(
        torch.tensor(20_000.0)
    )
    loads = logs.exp().long()
    loads[torch.rand(micro_batches, experts, generator=generator) < 0.25] = 0
    return loads


@pytest.mark.usefixtures("megatron_tp1")
def test_expert_loads_are_decided_once_per_bucket_without_syncs_afterwards(gated, monkeypatch):
    """100 micro-batches of random expert loads: timings, gate file reads and writes and TP
    all-reduces happen once per (weight shape, bucket), shared by the experts, never per count."""
    from megasparse import SparseSequentialMLP, SparsityConfig

    from expert_builders import EXPERTS, make_experts

    all_reduces = []
    real_all_reduce = dist.all_reduce
    monkeypatch.setattr(
        dist, "all_reduce", lambda *a, **k: all_reduces.append(1) or real_all_reduce(*a, **k)
    )
    experts = make_experts(
        SparseSequentialMLP, SparsityConfig(mask="transposable"), dtype=torch.float32
    )
    optimizer = torch.optim.SGD(experts.parameters(), lr=1e-3)
    loads = _random_loads(torch.Generator().manual_seed(0), EXPERTS, 100)
    buckets = {token_bucket(n) for n in loads.flatten().tolist()} - {None}
    assert len(buckets) == 3 and (loads == 0).any()  # the loads span buckets and empty experts
    for i, load in enumerate(loads):
        x = torch.randn(int(load.sum()), 16, requires_grad=True)
        y, _ = experts(x, load, torch.ones(x.shape[0]))
        y.square().mean().backward()
        if i % 25 == 24:
            optimizer.step()
            optimizer.zero_grad()
    decisions = len(buckets) * 2  # fc1 and fc2 shapes; every expert shares them
    assert len(gated.timings) == decisions * 2 * 2  # two roles, dense and sparse each
    assert sorted({rows for _, _, rows in gated.timings}) == sorted(buckets)
    assert len(all_reduces) == decisions  # one agreement per decision, both roles at once
    assert gated.writes == decisions * 2 and gated.reads <= decisions * 3
