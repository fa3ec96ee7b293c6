"""Speed gate: run a GEMM role sparse only where the sparse GEMM measurably beats the dense one.

Decisions are made per token bucket (`token_bucket`), not per token count: fewer than
SMALLEST_BUCKET tokens run dense and are never measured (a fixed choice that bounds the number of
decisions and keeps an expert with 0 tokens away from any sparse kernel; backend="cusparselt" or
MEGASPARSE_SPEED_GATE=0 run small counts sparse); from there on, each power of two up to
LARGEST_BUCKET is one bucket, measured at the bucket's own token count (never more rows than the
call has), and every count from LARGEST_BUCKET up shares the last bucket. Other per-shape work (an
algorithm search, say) should key its cache by `token_bucket` too.

On first use of a (device, torch, cuSPARSELt, role, shard shape, dtype, bucket) the gate times the
dense and the sparse GEMM over a few iterations (CUDA events), keeps the decision in a JSON cache
(`$MEGASPARSE_SPEED_GATE_CACHE`, else `$XDG_CACHE_HOME/megasparse/speed_gate.json`, else
`~/.cache/megasparse/speed_gate.json`) and logs one line per decision. Tensor-parallel ranks
agree: sparse only if every rank of the group measured a win (one all-reduce per decision). The
agreed decision is kept in memory and shared by every layer of that shard shape (all experts of a
MoE layer), so after warm-up a micro-batch reads no file, times nothing and syncs nothing.
`MEGASPARSE_SPEED_GATE=0` turns it off (always sparse, at any token count). The timer is
injectable, so the logic is tested on CPU.
"""

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megasparse.core.gpu_timer import cuda_event_seconds
from megasparse.core.sparse_operand import WEIGHT

logger = logging.getLogger("megasparse.speed_gate")  # the name users filter on

ROLES = ("forward", "input_grad")
SWITCH_ENV, CACHE_ENV = "MEGASPARSE_SPEED_GATE", "MEGASPARSE_SPEED_GATE_CACHE"
SMALLEST_BUCKET = 4096  # fewer tokens: dense, not measured
LARGEST_BUCKET = 65536  # this many tokens and more: one bucket


def token_bucket(tokens: int) -> Optional[int]:
    """The bucket of a GEMM with `tokens` rows: None below SMALLEST_BUCKET (run dense, measure
    nothing), else the largest power of two <= tokens, at most LARGEST_BUCKET.
    4095 -> None, 4096..8191 -> 4096, 8192..16383 -> 8192, ..., >= 65536 -> 65536."""
    tokens = int(tokens)
    if tokens < SMALLEST_BUCKET:
        return None
    return min(1 << (tokens.bit_length() - 1), LARGEST_BUCKET)


def enabled() -> bool:
    """The switch MEGASPARSE_SPEED_GATE: 1 (default) gates, 0 keeps every sparse role sparse;
    anything else is refused, so that "off" or "false" cannot silently mean on."""
    value = os.environ.get(SWITCH_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(
            f"megasparse: {SWITCH_ENV} must be 0 (always sparse) or 1 (the speed gate decides), "
            f"got {value!r}"
        )
    return value == "1"


def cache_path() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "megasparse" / "speed_gate.json"


def cuda_event_timer(fn: Callable[[], object], iterations: int = 10, warmup: int = 3) -> float:
    """Mean seconds per call of fn on the current CUDA stream (no device-wide sync: inside a step)."""
    return cuda_event_seconds(fn, iterations, warmup)


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


def agree(votes, group=None) -> list:
    """One decision per vote for the whole group: sparse only if every rank says sparse.
    All votes travel in one all-reduce (one host sync)."""
    return [bool(v) for v in _all_reduce([bool(v) for v in votes], dist.ReduceOp.MIN, group)]


def agree_max(values, group=None) -> list:
    """The largest value of each position over the group's ranks (one all-reduce), for choices
    that are numbers rather than votes (a cuSPARSELt algorithm, megasparse.core.cusparselt_search)."""
    return _all_reduce([int(v) for v in values], dist.ReduceOp.MAX, group)


def _all_reduce(values: list, op, group) -> list:
    """`values` reduced by `op` over the group (one all-reduce); themselves without a group."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return values
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    tally = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tally, op=op, group=group)
    return tally.tolist()


class SpeedGate:
    def __init__(self, path: Optional[Path] = None, timer: Callable = cuda_event_timer):
        self.path = Path(path) if path is not None else cache_path()
        self.timer = timer
        self.decided = {}  # in-memory decisions of this process: key -> sparse roles

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

    def decide(self, layer: str, shape, dtype, pairs: dict, device_name: str, group=None) -> tuple:
        """The roles of `pairs` ({role: (dense_fn, sparse_fn)}, each running one GEMM) that `layer`
        should run sparse at `shape` (tokens, out, in): from the file cache, else timed, then agreed
        by the group. Not remembered: `sparse_roles` keeps the result per bucket."""
        if not enabled():
            return tuple(pairs)
        cache, decisions, timed = self._load(), [], []
        for role, (dense_fn, sparse_fn) in pairs.items():
            key = decision_key(device_name, role, shape, dtype)
            decision = cache.get(key)
            timed.append(decision is None)
            if decision is None:
                dense_s, sparse_s = self.timer(dense_fn), self.timer(sparse_fn)
                decision = {"sparse": sparse_s < dense_s, "ratio": dense_s / sparse_s}
                self._store(key, decision)
            decisions.append(decision)
        agreed = agree([d["sparse"] for d in decisions], group)
        for role, decision, sparse, was_timed in zip(pairs, decisions, agreed, timed):
            logger.info(
                "megasparse speed gate: %s %s %s %s: %s (dense/sparse time %.2fx%s%s)",
                layer,
                role,
                tuple(shape),
                str(dtype).replace("torch.", ""),
                "sparse" if sparse else "dense",
                decision["ratio"],
                "" if was_timed else ", cached",
                "" if sparse == decision["sparse"] else ", overruled by another TP rank",
            )
        return tuple(role for role, sparse in zip(pairs, agreed) if sparse)


def gemm_pair(role: str, tokens: int, weight: torch.Tensor, backend):
    """(dense_fn, sparse_fn) for a role at a shard shape, through the backend's own GEMMs
    (compression is per step: untimed). tokens >= 1: sparse kernels refuse empty operands."""
    if tokens < 1:
        raise ValueError(
            f"megasparse: the speed gate times GEMMs of at least one token, got {tokens}; "
            "decide through token_bucket, which sends small counts to the dense GEMM"
        )
    out_features, in_features = weight.shape
    # A private generator: the decision may run inside a recomputed (checkpointed) region, whose
    # recompute restores the global RNG state and decides nothing, so drawing from the global
    # generator here would give a later dropout a different mask in the recompute.
    generator = torch.Generator(weight.device).manual_seed(0)
    if role == "forward":
        x = torch.randn(
            tokens, in_features, dtype=weight.dtype, device=weight.device, generator=generator
        )
        sparse_w = backend.compress(weight)
        return (
            (lambda: backend.linear(x, weight, None, None)),
            (lambda: backend.linear(x, sparse_w, None, WEIGHT)),
        )
    dy = torch.randn(
        tokens, out_features, dtype=weight.dtype, device=weight.device, generator=generator
    )
    sparse_wt = backend.compress(weight.t().contiguous())
    return (
        (lambda: backend.input_grad(dy, weight, None)),
        (lambda: backend.input_grad(dy, sparse_wt, WEIGHT)),
    )


def applies(requested_backend: str, backend, weight) -> bool:
    """The gate decides only for backend='auto' with a sparse backend on a CUDA weight."""
    return requested_backend == "auto" and backend.name != "dense" and weight.is_cuda and enabled()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


_GATE = None


def gate() -> SpeedGate:
    """The process's speed gate (its decisions are shared by all layers)."""
    global _GATE
    if _GATE is None:
        _GATE = SpeedGate()
    return _GATE


def sparse_roles(layer: str, step, backend, tokens: int, group=None) -> tuple:
    """The roles ("forward", "input_grad") where this weight step's W*M should run sparse for a
    call with `tokens` rows: decided once per (backend, shard shape, dtype, device, mask kind,
    token bucket, group), then looked up without reading files, timing or synchronizing."""
    bucket = token_bucket(tokens)
    if bucket is None:
        return ()  # dense: nothing measured, and an empty operand never reaches a kernel
    weight, transposable = step.weight, step.transposable
    # the agreed decision holds for this group
    key = (
        backend.name,
        tuple(weight.shape),
        weight.dtype,
        weight.device,
        transposable,
        bucket,
        group,
    )
    speed_gate = gate()
    roles = speed_gate.decided.get(key)
    if roles is None:
        with torch.no_grad():  # timing builds no autograd graph
            masked = step.dense().detach()
            pairs = {
                role: gemm_pair(role, bucket, masked, backend)
                for role in ROLES
                if role == "forward" or transposable
            }
            shape = (bucket, *masked.shape)
            name = device_name(masked.device)
            roles = speed_gate.decide(layer, shape, masked.dtype, pairs, name, group)
            # the backend's per-bucket choices (a cuSPARSELt algorithm) are made here too: once
            prepare = getattr(backend, "prepare_algorithms", None)
            if prepare is not None:
                prepare(roles, bucket, masked, group)
        speed_gate.decided[key] = roles
    return roles
