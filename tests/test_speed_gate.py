"""Speed gate on CPU: an injected timer stands in for CUDA events; gloo stands in for NCCL."""

import json
import logging
import os

import pytest
import torch
import torch.distributed as dist

from megasparse import speed_gate
from megasparse.speed_gate import SpeedGate
from megasparse.testing import free_port

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
    return gate.use_sparse("fc1", role, SHAPE, DTYPE, dense, sparse, "NVIDIA H100 80GB HBM3", group)


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


@pytest.mark.usefixtures("megatron_tp1")
def test_layers_follow_the_gate_per_role_and_ask_once_per_shape(monkeypatch):
    """backend='auto' on a GPU: a role the gate finds slower runs the dense GEMM on W*M; asked once."""
    from megasparse import SparsityConfig, speed_gate as gate_module
    from megasparse.backends import DenseBackend
    from megatron_helpers import make_column, make_config

    class Recording(DenseBackend):
        name = "recording-sparse"
        calls = []

        def linear(self, x2d, w, bias, sparse):
            self.calls.append(("forward", sparse))
            return super().linear(x2d, w, bias, sparse)

        def input_grad(self, dy2d, w, sparse):
            self.calls.append(("input_grad", sparse))
            return super().input_grad(dy2d, w, sparse)

    asked = []
    monkeypatch.setattr("megasparse.layers.resolve_backend", lambda *a, **k: Recording())
    monkeypatch.setattr(
        gate_module, "applies", lambda requested, backend, weight: requested == "auto"
    )
    monkeypatch.setattr(
        gate_module,
        "sparse_roles",
        lambda layer, step, backend, tokens, group: asked.append(tokens) or ("input_grad",),
    )
    layer = make_column(make_config(), 16, 32, SparsityConfig(mask="transposable"))
    for _ in range(3):
        x = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
        layer(x)[0].sum().backward()
    assert asked == [6]  # one decision for this shard shape and token count
    assert set(Recording.calls) == {("forward", None), ("input_grad", "weight")}
