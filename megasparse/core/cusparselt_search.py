"""cuSPARSELt algorithm choice per (role, speed-gate bucket, dtype, shard shape): searched once per
process, checked against algorithm 0, kept in the speed gate's JSON, agreed across TP ranks.

Opt-in: MEGASPARSE_CUSPARSELT_SEARCH=1. Unset or 0: every cuSPARSELt call runs algorithm 0 with
split_k=1, exactly as without this module. The search is opt-in until a GPU run of
`make gpu-check` (its cusparselt_search part) has checked it, because some cuSPARSELt algorithms
have returned wrong results (pytorch/pytorch#155333: A100, torch 2.7.1+cu128, cuSPARSELt 0.6.3,
alg_id=20 failed allclose against the dense product, non-deterministically: the report's 128xN
shapes passed, 256x128 and larger failed; xformers turned its own algorithm tuning off over it).

What torch offers (torch 2.13's Python, and aten/.../sparse/cuda/cuSPARSELtOps.cpp with
torch/csrc's cuSPARSELt bindings): `torch._C._cusparselt.mm_search(compressed_A, dense_B, bias,
alpha, out_dtype, transpose_result)` returns (alg_id, split_k, split_k_mode, max_alg_id) in the
builds whose `_cslt_sparse_mm` takes split_k_mode (2.13's does); the deprecated
`torch._cslt_sparse_mm_search(...)` returns alg_id only (then split_k=1, split_k_mode=-1).
`torch._cslt_sparse_mm(..., alg_id, split_k, split_k_mode)` runs one.
Every torch call builds a fresh plan: no plan can be kept from Python.

Numerics: a chosen algorithm is accepted only if, on the search's own operands, VALIDATION_RUNS
results each lie within TOLERANCE_ULPS units in the last place (of the output dtype) of
max|result of algorithm 0| from algorithm 0's result; else algorithm 0 stays, with the reason in
the JSON. A rejected algorithm costs speed, never accuracy.

Hot path: `AlgorithmSearch.lookup(role, tokens, dtype, shape, device)` is one dict look-up (no
file, no search, no sync); the search runs where the speed gate decides (`prepare_weight_roles`,
once per key) or, for the FP8 GEMM, on a bucket's first call (`fp8_arguments`).
"""

import logging
import os
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist

from megasparse.core import speed_gate

logger = logging.getLogger("megasparse.cusparselt_search")

SWITCH_ENV = "MEGASPARSE_CUSPARSELT_SEARCH"
VALIDATION_RUNS = 3  # the wrong results of pytorch#155333 came and went between runs
TOLERANCE_ULPS = 2  # of the output dtype, times max|algorithm 0's result|
ROLES = ("forward", "input_grad", "fp8")


class Algorithm(NamedTuple):
    alg_id: int = 0
    split_k: int = 1
    split_k_mode: int = -1

    def arguments(self) -> dict:
        """torch._cslt_sparse_mm's keyword arguments for this algorithm."""
        return {"alg_id": self.alg_id, "split_k": self.split_k, "split_k_mode": self.split_k_mode}

    def encoded(self) -> int:
        """One non-negative int, ordered by alg_id first (for the MAX all-reduce)."""
        return (self.alg_id * 1024 + self.split_k) * 16 + (self.split_k_mode + 1)

    @staticmethod
    def decoded(code: int) -> "Algorithm":
        rest, mode = divmod(int(code), 16)
        alg_id, split_k = divmod(rest, 1024)
        return Algorithm(alg_id, split_k, mode - 1)


DEFAULT = Algorithm()


def enabled() -> bool:
    value = os.environ.get(SWITCH_ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"megasparse: {SWITCH_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def torch_search(compressed, dense, bias, alpha, out_dtype, transpose_result) -> Algorithm:
    """cuSPARSELt's own search through whatever this torch exposes."""
    binding = getattr(torch._C, "_cusparselt", None)
    if binding is not None and hasattr(binding, "mm_search"):
        found = binding.mm_search(compressed, dense, bias, alpha, out_dtype, transpose_result)
        return Algorithm(*(int(v) for v in found[:3]))
    found = torch._cslt_sparse_mm_search(
        compressed, dense, bias, alpha, out_dtype, transpose_result
    )
    return Algorithm(int(found))


def sparse_mm(
    compressed,
    dense,
    algorithm: Algorithm,
    bias=None,
    alpha=None,
    out_dtype=None,
    transpose_result=False,
):
    """torch._cslt_sparse_mm with `algorithm` (looked up at call time, so tests can stand in)."""
    return torch._cslt_sparse_mm(
        compressed, dense, bias, alpha, out_dtype, transpose_result, **algorithm.arguments()
    )


class Operands(NamedTuple):
    """One GEMM problem as torch._cslt_sparse_mm takes it: the search's and the check's inputs."""

    compressed: torch.Tensor
    dense: torch.Tensor
    bias: Optional[torch.Tensor] = None
    alpha: Optional[torch.Tensor] = None
    out_dtype: Optional[torch.dtype] = None
    transpose_result: bool = False


def json_key(device_name: str, role: str, bucket: int, dtype, shape, transpose_result) -> str:
    dims = "x".join(str(int(d)) for d in (bucket, *shape))
    layout = "transposed result" if transpose_result else "result"
    return (
        f"{speed_gate.versions_key(device_name)}|cusparselt algorithm|{role}|{dims}|"
        f"{str(dtype).replace('torch.', '')}|{layout}"
    )


def agree_on(algorithm: Algorithm, check: Callable[[Algorithm], bool], group=None) -> Algorithm:
    """One algorithm for the whole group: the highest any rank chose, if every rank's own check of
    it passes, else algorithm 0 (two all-reduces, once per key)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return algorithm
    (highest,) = speed_gate.agree_max([algorithm.encoded()], group)
    candidate = Algorithm.decoded(highest)
    ok = candidate in (algorithm, DEFAULT) or check(candidate)
    (all_ok,) = speed_gate.agree([ok], group)
    return candidate if all_ok else DEFAULT


class AlgorithmSearch:
    """The process's algorithm table. `search` and `run` stand in for torch's in tests."""

    def __init__(self, gate: Optional[speed_gate.SpeedGate] = None, search=None, run=None):
        self.gate = gate
        self.search = search or torch_search
        self.run = run or sparse_mm
        # (role, bucket, dtype, shape, device, transpose_result) -> agreed Algorithm: the hot path
        self.table = {}
        self.own = {}  # the same key -> this rank's validated choice (before agreement)
        self.agreed = set()  # (key, group) pairs already agreed

    def _gate(self) -> speed_gate.SpeedGate:
        return self.gate or speed_gate.gate()

    def lookup(self, role: str, tokens: int, dtype, shape, device, transpose_result=True):
        """The algorithm for a call with `tokens` rows: one dict look-up; algorithm 0 when the
        search is off, below the smallest bucket or for a key not searched."""
        if not enabled():
            return DEFAULT
        bucket = speed_gate.token_bucket(tokens)
        if bucket is None:
            return DEFAULT
        key = (role, bucket, dtype, tuple(shape), device, transpose_result)
        return self.table.get(key, DEFAULT)

    def check(self, algorithm: Algorithm, operands: Operands):
        """(accepted, max |difference| to algorithm 0, tolerance, why not)."""
        if algorithm == DEFAULT:
            return True, 0.0, 0.0, ""
        reference = self.run(operands.compressed, operands.dense, DEFAULT, *operands[2:])
        tolerance = TOLERANCE_ULPS * torch.finfo(reference.dtype).eps
        reference = reference.float()
        tolerance *= max(reference.abs().max().item(), torch.finfo(torch.float32).tiny)
        worst = 0.0
        for _ in range(VALIDATION_RUNS):
            try:
                got = self.run(operands.compressed, operands.dense, algorithm, *operands[2:])
            except RuntimeError as error:
                return False, worst, tolerance, f"algorithm {tuple(algorithm)} raised: {error}"
            worst = max(worst, (got.float() - reference).abs().max().item())
            if not worst <= tolerance:
                return (
                    False,
                    worst,
                    tolerance,
                    f"algorithm {tuple(algorithm)} differs from algorithm 0 by {worst:.3g} > "
                    f"{tolerance:.3g}",
                )
        return True, worst, tolerance, ""

    def _own_choice(self, key_text: str, operands: Operands) -> Algorithm:
        """This rank's algorithm: the JSON's (re-checked, not searched), else searched and checked."""
        record = self._gate()._load().get(key_text)
        if isinstance(record, dict) and "alg_id" in record:
            cached = Algorithm(record["alg_id"], record["split_k"], record["split_k_mode"])
            accepted, _, _, reason = self.check(cached, operands)
            if accepted:
                return cached
            logger.warning("megasparse cuSPARSELt search: cached %s rejected: %s", key_text, reason)
        found = self.search(*operands)
        accepted, worst, tolerance, reason = self.check(found, operands)
        chosen = found if accepted else DEFAULT
        self._gate()._store(
            key_text,
            {
                **chosen._asdict(),
                "found": list(found),
                "accepted": accepted,
                "max_abs_diff_to_alg0": worst,
                "tolerance": tolerance,
                "reason": reason or ("the search chose algorithm 0" if found == DEFAULT else ""),
            },
        )
        return chosen

    def algorithm_for(
        self, role, bucket, dtype, shape, operands: Operands, group=None, device_name=None
    ) -> Algorithm:
        """The agreed algorithm for (role, bucket, dtype, shard shape), decided once per process
        (and once per group for the agreement), then kept for `lookup`."""
        if role not in ROLES:
            raise ValueError(
                f"megasparse: cuSPARSELt search role must be one of {ROLES}, got {role!r}"
            )
        device = operands.dense.device
        key = (role, bucket, dtype, tuple(shape), device, operands.transpose_result)
        if (key, group) in self.agreed:
            return self.table[key]
        if key not in self.own:
            name = device_name or speed_gate.device_name(device)
            text = json_key(name, role, bucket, dtype, shape, operands.transpose_result)
            self.own[key] = self._own_choice(text, operands)
        own = self.own[key]
        agreed = agree_on(own, lambda a: self.check(a, operands)[0], group)
        self.table[key] = agreed
        self.agreed.add((key, group))
        logger.info(
            "megasparse cuSPARSELt search: %s bucket %d %s %s: algorithm %s%s",
            role,
            bucket,
            str(dtype).replace("torch.", ""),
            tuple(shape),
            tuple(agreed),
            "" if agreed == own else f" (this rank chose {tuple(own)}, agreed by the TP group)",
        )
        return agreed


def prepare_weight_roles(roles, bucket: int, masked: torch.Tensor, group=None) -> None:
    """Search the algorithm of each sparse weight role of W*M (`masked`, [out, in]) at `bucket`
    tokens, as the cuSPARSELt backend runs it: the compressed W*M (forward) or (W*M)^T
    (input_grad) times the transposed [bucket, k] activation or gradient, result transposed.
    Called where the speed gate decides (once per key), never per micro-batch."""
    if not enabled():
        return
    generator = torch.Generator(masked.device).manual_seed(0)  # the global RNG stays untouched
    for role in roles:
        matrix = masked if role == "forward" else masked.t().contiguous()
        dense = torch.randn(
            bucket, matrix.shape[1], dtype=matrix.dtype, device=matrix.device, generator=generator
        )
        operands = Operands(torch._cslt_compress(matrix), dense.t(), transpose_result=True)
        searcher().algorithm_for(role, bucket, matrix.dtype, matrix.shape, operands, group)


def fp8_arguments(
    compressed, dense, rows: int, alpha=None, out_dtype=None, transpose_result=False
) -> dict:
    """torch._cslt_sparse_mm's algorithm arguments for an e4m3 2:4 GEMM (compressed [rows, k] by
    dense [k, tokens]): {} (algorithm 0, the call as without a search) when the search is off or
    below the smallest bucket; else searched once per (bucket, shape, layout) on the first call,
    on this rank only (the FP8 op has no TP group to agree with), and looked up after that."""
    if not enabled():
        return {}
    bucket = speed_gate.token_bucket(dense.shape[1])
    if bucket is None:
        return {}
    shape = (rows, dense.shape[0])
    search = searcher()
    key = ("fp8", bucket, compressed.dtype, shape, dense.device, transpose_result)
    algorithm = search.table.get(key)
    if algorithm is None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return {}  # no search inside a CUDA graph capture: algorithm 0
        operands = Operands(compressed, dense, None, alpha, out_dtype, transpose_result)
        algorithm = search.algorithm_for("fp8", bucket, compressed.dtype, shape, operands)
    return {} if algorithm == DEFAULT else algorithm.arguments()


_SEARCH = None


def searcher() -> AlgorithmSearch:
    """The process's algorithm table (its choices are shared by all layers)."""
    global _SEARCH
    if _SEARCH is None:
        _SEARCH = AlgorithmSearch()
    return _SEARCH
