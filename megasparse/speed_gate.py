"""Speed gate: run a GEMM role sparse only where the sparse GEMM measurably beats the dense one.

On first use of a (device, torch, cuSPARSELt, role, shard shape, dtype) the gate times the dense
and the sparse GEMM over a few iterations (CUDA events), keeps the decision in a JSON cache
(`$MEGASPARSE_SPEED_GATE_CACHE`, else `$XDG_CACHE_HOME/megasparse/speed_gate.json`, else
`~/.cache/megasparse/speed_gate.json`) and logs one line per layer. Tensor-parallel ranks agree:
sparse only if every rank of the group measured a win. `MEGASPARSE_SPEED_GATE=0` turns it off
(always sparse). The timer is injectable, so the logic is tested on CPU.
"""

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger("megasparse.speed_gate")

ROLES = ("forward", "input_grad")
SWITCH_ENV, CACHE_ENV = "MEGASPARSE_SPEED_GATE", "MEGASPARSE_SPEED_GATE_CACHE"


def enabled() -> bool:
    return os.environ.get(SWITCH_ENV, "1") != "0"


def cache_path() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "megasparse" / "speed_gate.json"


def cuda_event_timer(fn: Callable[[], object], iterations: int = 10, warmup: int = 3) -> float:
    """Mean seconds per call of fn on the current CUDA stream."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iterations / 1e3


def versions_key(device_name: str) -> str:
    cusparselt = (
        torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
    )
    return f"{device_name}|torch {torch.__version__}|cusparselt {cusparselt}"


def decision_key(device_name, role, shape, dtype) -> str:
    if role not in ROLES:
        raise ValueError(f"megasparse: speed gate role must be one of {ROLES}, got {role!r}")
    dims = "x".join(str(int(d)) for d in shape)
    return f"{versions_key(device_name)}|{role}|{dims}|{str(dtype).replace('torch.', '')}"


def agree(sparse: bool, group=None) -> bool:
    """One decision for the whole group: sparse only if every rank says sparse."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return sparse
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    vote = torch.tensor([1 if sparse else 0], dtype=torch.int32, device=device)
    dist.all_reduce(vote, op=dist.ReduceOp.MIN, group=group)
    return bool(vote.item())


class SpeedGate:
    def __init__(self, path: Optional[Path] = None, timer: Callable = cuda_event_timer):
        self.path = Path(path) if path is not None else cache_path()
        self.timer = timer

    def _load(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            data = error
        if isinstance(data, dict):
            return data
        backup = self.path.with_name(self.path.name + ".corrupt")
        why = data if isinstance(data, Exception) else "not a JSON object"
        warnings.warn(
            f"megasparse: speed gate cache {self.path} is unreadable ({why}); "
            f"ignoring it (moved to {backup}) and measuring again"
        )
        os.replace(self.path, backup)  # kept for inspection: nothing lost
        return {}

    def _store(self, key: str, decision: dict) -> None:
        cache = self._load()  # merge with what other processes wrote meanwhile
        cache[key] = decision
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(tmp, self.path)  # atomic: readers never see half a file

    def use_sparse(
        self, layer: str, role: str, shape, dtype, dense_fn, sparse_fn, device_name: str, group=None
    ) -> bool:
        """Whether `layer` should run `role` sparse. dense_fn / sparse_fn run one GEMM each."""
        if not enabled():
            return True
        key = decision_key(device_name, role, shape, dtype)
        decision = self._load().get(key)
        cached = decision is not None
        if not cached:
            dense_s, sparse_s = self.timer(dense_fn), self.timer(sparse_fn)
            decision = {"sparse": sparse_s < dense_s, "ratio": dense_s / sparse_s}
            self._store(key, decision)
        sparse = agree(bool(decision["sparse"]), group)
        logger.info(
            "megasparse speed gate: %s %s %s %s: %s (dense/sparse time %.2fx%s%s)",
            layer,
            role,
            tuple(shape),
            str(dtype).replace("torch.", ""),
            "sparse" if sparse else "dense",
            decision["ratio"],
            ", cached" if cached else "",
            "" if sparse == decision["sparse"] else ", overruled by another TP rank",
        )
        return sparse


def gemm_pair(role: str, tokens: int, weight: torch.Tensor, backend):
    """(dense_fn, sparse_fn) for a role at a shard shape (compression is per step: untimed)."""
    out_features, in_features = weight.shape
    if role == "forward":
        x = torch.randn(tokens, in_features, dtype=weight.dtype, device=weight.device)
        sparse_w = backend.tensor_class().from_dense(weight)
        return (lambda: torch.nn.functional.linear(x, weight)), (
            lambda: torch.nn.functional.linear(x, sparse_w)
        )
    dy = torch.randn(tokens, out_features, dtype=weight.dtype, device=weight.device)
    sparse_wt = backend.tensor_class().from_dense(weight.t().contiguous())
    return (lambda: dy @ weight), (lambda: torch.nn.functional.linear(dy, sparse_wt))


def applies(requested_backend: str, backend, weight) -> bool:
    """The gate decides only for backend='auto' with a sparse backend on a CUDA weight."""
    return requested_backend == "auto" and backend.name != "dense" and weight.is_cuda and enabled()


_GATE = None


def sparse_roles(layer: str, step, backend, tokens: int, group=None) -> tuple:
    """The roles ("forward", "input_grad") where this weight step's W*M should run sparse."""
    global _GATE
    if _GATE is None:
        _GATE = SpeedGate()
    weight = step.dense()
    device_name = torch.cuda.get_device_name(weight.device)
    roles = ["forward"] + (["input_grad"] if step.transposable else [])
    return tuple(
        role
        for role in roles
        if _GATE.use_sparse(
            layer,
            role,
            (tokens, *weight.shape),
            weight.dtype,
            *gemm_pair(role, tokens, weight, backend),
            device_name,
            group,
        )
    )
