"""cuSPARSELt algorithm search on CPU: torch's cuSPARSELt binding modelled on the CPU
(cusparselt_cpu), a counting stand-in for the search, a recording stand-in for
torch._cslt_sparse_mm that can give one algorithm wrong results, gloo for NCCL. On a GPU the
gpu-marked test runs torch's own search and GEMMs."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from megasparse.core import cusparselt_search, speed_gate
from megasparse.core.backends import BACKENDS, CusparseltBackend
from megasparse.core.cusparselt_search import DEFAULT, Algorithm, AlgorithmSearch, Operands
from megasparse.core.masks import weight_mask
from megasparse.core.sparse_operand import WEIGHT
from megasparse.core.speed_gate import SMALLEST_BUCKET, SpeedGate
from megasparse.fp8 import gemm as fp8_gemm
from megasparse.testing import free_port
from cusparselt_cpu import cusparselt_on_cpu

OUT, IN, BF16 = 32, 64, torch.bfloat16
BUCKET = SMALLEST_BUCKET
DEVICE_NAME = "NVIDIA H100 80GB HBM3"


@pytest.fixture
def search_env(monkeypatch, tmp_path):
    """A fresh process: no gate, no algorithm table, the JSON in tmp_path, the search off."""
    monkeypatch.delenv(cusparselt_search.SWITCH_ENV, raising=False)
    monkeypatch.delenv(speed_gate.SWITCH_ENV, raising=False)
    monkeypatch.setenv(speed_gate.CACHE_ENV, str(tmp_path / "gate.json"))
    monkeypatch.setattr(speed_gate, "_GATE", None)
    monkeypatch.setattr(cusparselt_search, "_SEARCH", None)
    return tmp_path / "gate.json"


class CountingSearch:
    """Stands in for cuSPARSELt's search: returns `found`, counts its calls."""

    def __init__(self, found=Algorithm(5, 2, 0)):
        self.found, self.calls = found, []

    def __call__(self, compressed, dense, bias, alpha, out_dtype, transpose_result):
        self.calls.append((tuple(dense.shape), transpose_result))
        return self.found


@pytest.fixture
def cslt(monkeypatch):
    """torch's cuSPARSELt ops on the CPU; `cslt.calls` records each _cslt_sparse_mm's algorithm,
    `cslt.wrong[alg_id] = runs` makes that algorithm's result wrong on the given call numbers."""
    state = SimpleNamespace(calls=[], wrong={}, runs={})
    with cusparselt_on_cpu():
        exact = torch._cslt_sparse_mm

        def recording(*args, alg_id=0, split_k=1, split_k_mode=-1, **kwargs):
            state.calls.append((alg_id, split_k, split_k_mode))
            y = exact(*args, **kwargs)
            run = state.runs[alg_id] = state.runs.get(alg_id, 0) + 1
            if run in state.wrong.get(alg_id, ()):
                y = y.clone()
                y.view(-1)[0] += 0.5 * y.abs().max()  # one element far off: a wrong kernel
            return y

        monkeypatch.setattr(torch, "_cslt_sparse_mm", recording)
        yield state


def cpu_compressed(matrix):
    """A SparseSemiStructuredTensorCUSPARSELT of a CPU matrix (from_dense accepts CUDA only)."""
    cls = torch.sparse.SparseSemiStructuredTensorCUSPARSELT
    return cls(
        shape=matrix.shape,
        packed=torch._cslt_compress(matrix.contiguous()),
        meta=None,
        packed_t=None,
        meta_t=None,
        compressed_swizzled_bitmask=None,
        fuse_transpose_cusparselt=False,
        alg_id_cusparselt=0,
        requires_grad=False,
    )


class CpuCusparselt(CusparseltBackend):
    """The cuSPARSELt backend with its compressed operands built on the CPU."""

    def compress(self, matrix):
        return cpu_compressed(matrix)


def masked_weight(seed=0, shape=(OUT, IN), dtype=BF16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g).to(dtype)
    return w * weight_mask(w, "transposable")


def tokens_of(n, seed=1, features=IN, dtype=BF16):
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_matches_masked_reference(got, reference64):
    """A bf16 GEMM result against its float64 reference: within bf16 rounding of the result."""
    torch.testing.assert_close(got.double(), reference64, rtol=2**-7, atol=2**-7)


def gate_decides(step, backend, tokens, group=None):
    """The speed gate's decision path (sparse wins), as a backend='auto' layer reaches it."""
    if speed_gate._GATE is None:
        speed_gate._GATE = SpeedGate(timer=lambda fn, times=iter([2.0, 1.0] * 8): next(times))
    return speed_gate.sparse_roles("fc1", step, backend, tokens)


def weight_step(masked):
    return SimpleNamespace(weight=masked, transposable=True, dense=lambda: masked)


def test_off_by_default_searches_nothing_and_runs_algorithm_0(search_env, cslt):
    search = CountingSearch()
    cusparselt_search._SEARCH = AlgorithmSearch(search=search)
    backend, w = CpuCusparselt(), masked_weight()
    assert gate_decides(weight_step(w), backend, BUCKET + 100) == ("forward", "input_grad")
    del cslt.calls[:]  # the gate's own timing runs
    x, dy, bias = tokens_of(BUCKET + 100), tokens_of(BUCKET + 100, 2, OUT), tokens_of(1, 3, OUT)[0]
    y = backend.linear(x, cpu_compressed(w), bias, WEIGHT)
    dx = backend.input_grad(dy, cpu_compressed(w.t()), WEIGHT)
    assert search.calls == [] and cslt.calls == [DEFAULT, DEFAULT]
    assert cusparselt_search.fp8_arguments(None, torch.empty(IN, BUCKET), OUT) == {}
    assert_matches_masked_reference(y, x.double() @ w.double().t() + bias.double())
    assert_matches_masked_reference(dx, dy.double() @ w.double())
    assert "cusparselt algorithm" not in search_env.read_text()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_opt_in_searches_once_per_key_across_micro_batches_and_steps(
    search_env, cslt, monkeypatch, dtype
):
    monkeypatch.setenv(cusparselt_search.SWITCH_ENV, "1")
    search = CountingSearch(Algorithm(5, 2, 0))
    cusparselt_search._SEARCH = AlgorithmSearch(search=search)
    backend = CpuCusparselt()
    for step_seed in range(3):  # three optimizer steps, new masks, k=4 micro-batches each
        w = masked_weight(step_seed, dtype=dtype)
        step = weight_step(w)
        w_c, w_t_c = cpu_compressed(w), cpu_compressed(w.t())
        # ragged counts: 2 * BUCKET - 1 is no multiple of the 8 rows cuSPARSELt reads (padded)
        for micro_batch, tokens in enumerate((BUCKET, BUCKET + 8, 2 * BUCKET - 1, BUCKET + 333)):
            assert gate_decides(step, backend, tokens) == ("forward", "input_grad")
            if (step_seed, micro_batch) == (0, 0):  # warmed up: no file is read after this
                monkeypatch.setattr(SpeedGate, "_load", lambda self: pytest.fail("file read"))
            x = tokens_of(tokens, micro_batch, dtype=dtype)
            dy = tokens_of(tokens, micro_batch + 9, OUT, dtype=dtype)
            del cslt.calls[:]
            y = backend.linear(x, w_c, None, WEIGHT)
            dx = backend.input_grad(dy, w_t_c, WEIGHT)
            assert cslt.calls == [Algorithm(5, 2, 0)] * 2  # one GEMM each, the chosen algorithm
            assert_matches_masked_reference(y, x.double() @ w.double().t())
            assert_matches_masked_reference(dx, dy.double() @ w.double())
    # one search per role: forward [bucket, in]^T and input_grad [bucket, out]^T
    assert search.calls == [((IN, BUCKET), True), ((OUT, BUCKET), True)]
    # below the smallest bucket (and 0 tokens): algorithm 0 through torch's own call
    table = cusparselt_search.searcher()
    for tokens in (BUCKET - 1, 0):
        assert table.lookup("forward", tokens, dtype, (OUT, IN), torch.device("cpu")) == DEFAULT
    del cslt.calls[:]
    x = tokens_of(BUCKET - 1, dtype=dtype)
    y = backend.linear(x, w_c, None, WEIGHT)
    assert_matches_masked_reference(y, x.double() @ w.double().t())
    assert cslt.calls == [DEFAULT]


def test_only_the_roles_the_gate_runs_sparse_are_searched(search_env, cslt, monkeypatch):
    monkeypatch.setenv(cusparselt_search.SWITCH_ENV, "1")
    search = CountingSearch(Algorithm(5))
    cusparselt_search._SEARCH = AlgorithmSearch(search=search)
    times = iter([1.0, 2.0, 2.0, 1.0])  # forward: dense 1 s, sparse 2 s; input_grad: the reverse
    speed_gate._GATE = SpeedGate(timer=lambda fn: next(times))
    step = weight_step(masked_weight())
    assert speed_gate.sparse_roles("fc1", step, CpuCusparselt(), BUCKET) == ("input_grad",)
    assert search.calls == [((OUT, BUCKET), True)]


@pytest.mark.parametrize("tokens", [16384, 16384 + 7, 30000])
def test_chosen_algorithm_calls_on_meta_at_real_shapes(search_env, monkeypatch, tokens):
    """The per-call path with a chosen algorithm passes the binding's checks (fake_ops) at the
    reference FFN shapes, ragged token counts included: the compressed weight's packed tensor,
    the padded activation read as the transpose of a row-major matrix, the result transposed."""
    from megasparse.tools.perf import fake_ops

    hidden, ffn = 8192, 28672
    monkeypatch.setenv(cusparselt_search.SWITCH_ENV, "1")
    meta = torch.device("meta")
    table = cusparselt_search.searcher().table
    table[("forward", 16384, BF16, (ffn, hidden), meta, True)] = Algorithm(5, 2, 0)
    table[("input_grad", 16384, BF16, (hidden, ffn), meta, True)] = Algorithm(3)
    backend = BACKENDS["cusparselt"]
    with fake_ops.fake_gpu_ops():
        w = backend.compress(torch.empty(ffn, hidden, dtype=BF16, device=meta))
        w_t = backend.compress(torch.empty(hidden, ffn, dtype=BF16, device=meta))
        x = torch.empty(tokens, hidden, dtype=BF16, device=meta)
        dy = torch.empty(tokens, ffn, dtype=BF16, device=meta)
        bias = torch.empty(ffn, dtype=BF16, device=meta)
        before = len(fake_ops.sparse_mm_calls)
        y = backend.linear(x, w, bias, WEIGHT)
        dx = backend.input_grad(dy, w_t, WEIGHT)
    calls = fake_ops.sparse_mm_calls[before:]
    padded = tokens + (-tokens) % 8
    assert [(c["m"], c["k"], c["n"], c["transpose_result"], c["dense_layout"]) for c in calls] == [
        (ffn, hidden, padded, True, "column-major"),
        (hidden, ffn, padded, True, "column-major"),
    ]
    assert y.shape == (tokens, ffn) and dx.shape == (tokens, hidden)


def _search_key(search_env):
    records = {k: v for k, v in json.loads(search_env.read_text()).items() if "algorithm" in k}
    assert len(records) == 1
    return next(iter(records.items()))


def _operands(w, tokens=BUCKET, seed=4):
    return Operands(torch._cslt_compress(w), tokens_of(tokens, seed).t(), transpose_result=True)


def test_cached_in_the_json_and_reused_by_a_fresh_process_without_searching(search_env, cslt):
    w = masked_weight()
    first = AlgorithmSearch(SpeedGate(search_env), search=CountingSearch(Algorithm(7)))
    args = ("forward", BUCKET, BF16, (OUT, IN), _operands(w))
    assert first.algorithm_for(*args, device_name=DEVICE_NAME) == Algorithm(7)
    key, record = _search_key(search_env)
    assert DEVICE_NAME in key and "|cusparselt algorithm|forward|4096x32x64|bfloat16|" in key
    assert record["alg_id"] == 7 and record["accepted"] is True and record["found"] == [7, 1, -1]
    fresh_search = CountingSearch(Algorithm(9))
    fresh = AlgorithmSearch(SpeedGate(search_env), search=fresh_search)
    del cslt.calls[:]
    assert fresh.algorithm_for(*args, device_name=DEVICE_NAME) == Algorithm(7)
    assert fresh_search.calls == []  # not searched: read from the JSON
    assert set(cslt.calls) == {DEFAULT, Algorithm(7)}  # re-checked against algorithm 0
    assert fresh.algorithm_for(*args, device_name=DEVICE_NAME) == Algorithm(7)  # in memory now
    assert fresh_search.calls == []


@pytest.mark.parametrize("wrong_runs", [(1, 2, 3), (2,)], ids=["always", "second-run-only"])
def test_a_wrong_result_algorithm_is_rejected_and_0_kept_with_the_reason(
    search_env, cslt, wrong_runs
):
    cslt.wrong[11] = wrong_runs  # intermittent, like pytorch#155333
    search = AlgorithmSearch(SpeedGate(search_env), search=CountingSearch(Algorithm(11)))
    w = masked_weight()
    found = search.algorithm_for("forward", BUCKET, BF16, (OUT, IN), _operands(w))
    assert found == DEFAULT
    _, record = _search_key(search_env)
    assert record["found"] == [11, 1, -1] and record["alg_id"] == 0 and not record["accepted"]
    assert "differs from algorithm 0" in record["reason"]
    assert record["max_abs_diff_to_alg0"] > record["tolerance"]


def test_a_difference_of_rounding_only_is_accepted(search_env, cslt, monkeypatch):
    """A different summation order moves results by about one unit in the last place: accepted."""
    w = masked_weight()
    operands = _operands(w)
    reference = torch._cslt_sparse_mm(*operands[:2], transpose_result=True)
    one_ulp = reference.clone()
    one_ulp.view(-1)[0] = torch.nextafter(one_ulp.view(-1)[0], torch.tensor(1e9, dtype=BF16))

    def run(compressed, dense, algorithm, *rest):
        return reference if algorithm == DEFAULT else one_ulp

    search = AlgorithmSearch(SpeedGate(search_env), search=CountingSearch(Algorithm(3)), run=run)
    assert search.algorithm_for("forward", BUCKET, BF16, (OUT, IN), operands) == Algorithm(3)


def test_an_algorithm_that_raises_is_rejected(search_env):
    def run(compressed, dense, algorithm, *rest):
        if algorithm != DEFAULT:
            raise RuntimeError("CUSPARSE_STATUS_NOT_SUPPORTED")
        return compressed @ dense

    w = masked_weight().float()
    operands = Operands(w, tokens_of(BUCKET).float().t())
    search = AlgorithmSearch(SpeedGate(search_env), search=CountingSearch(Algorithm(2)), run=run)
    assert search.algorithm_for("forward", BUCKET, torch.float32, w.shape, operands) == DEFAULT
    _, record = _search_key(search_env)
    assert "raised: CUSPARSE_STATUS_NOT_SUPPORTED" in record["reason"]


def test_switch_0_turns_it_off_and_other_values_are_refused(search_env, cslt, monkeypatch):
    monkeypatch.setenv(cusparselt_search.SWITCH_ENV, "1")
    search = CountingSearch(Algorithm(5))
    cusparselt_search._SEARCH = AlgorithmSearch(search=search)
    backend, w = CpuCusparselt(), masked_weight()
    gate_decides(weight_step(w), backend, BUCKET)
    assert len(search.calls) == 2
    monkeypatch.setenv(cusparselt_search.SWITCH_ENV, "0")
    del cslt.calls[:]
    x = tokens_of(BUCKET)
    y = backend.linear(x, cpu_compressed(w), None, WEIGHT)
    assert cslt.calls == [DEFAULT]  # torch's own call, algorithm 0
    assert_matches_masked_reference(y, x.double() @ w.double().t())
    cusparselt_search.prepare_weight_roles(("forward",), 2 * BUCKET, w)
    assert len(search.calls) == 2  # off: no search either
    monkeypatch.setenv(cusparselt_search.SWITCH_ENV, "yes")
    with pytest.raises(ValueError, match="MEGASPARSE_CUSPARSELT_SEARCH must be 0 or 1"):
        cusparselt_search.enabled()


def test_torch_search_reads_mm_search_tuples_and_the_deprecated_id(monkeypatch):
    binding = SimpleNamespace(mm_search=lambda *args: (4, 2, 1, 40))
    monkeypatch.setattr(torch._C, "_cusparselt", binding, raising=False)
    operands = Operands(torch.empty(0), torch.empty(0))
    assert cusparselt_search.torch_search(*operands) == Algorithm(4, 2, 1)
    monkeypatch.setattr(torch._C, "_cusparselt", SimpleNamespace(), raising=False)
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", lambda *a, **k: 9)
    assert cusparselt_search.torch_search(*operands) == Algorithm(9, 1, -1)


def test_algorithms_encode_for_the_max_all_reduce():
    choices = [DEFAULT, Algorithm(1), Algorithm(3, 4, 0), Algorithm(36, 1, 1), Algorithm(3, 2, 1)]
    for algorithm in choices:
        assert Algorithm.decoded(algorithm.encoded()) == algorithm
    assert max(choices, key=Algorithm.encoded) == Algorithm(36, 1, 1)


def _e4m3_operands(tokens, out=OUT, k=IN, seed=5):
    from megasparse.fp8.scaling import quantize_with, scale_from_amax

    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(tokens, k, generator=g), torch.randn(out, k, generator=g)
    w = w * weight_mask(w)
    sx, sw = scale_from_amax(x.abs().amax()), scale_from_amax(w.abs().amax())
    return quantize_with(x, sx), sx.reciprocal(), quantize_with(w, sw), sw.reciprocal()


@pytest.mark.parametrize("alpha_mode", ["output", "vector"])
def test_fp8_searches_once_per_bucket_and_passes_the_algorithm(
    search_env, cslt, monkeypatch, alpha_mode
):
    """sparse_fp8_mm on cuSPARSELt's e4m3 kernel: off, the call of today; on, searched on the first
    call of a bucket (checked against algorithm 0), then looked up; results stay the float64
    product of the quantized operands up to bf16 rounding."""
    search = CountingSearch(Algorithm(6, 1, -1))
    cusparselt_search._SEARCH = AlgorithmSearch(search=search)

    def fp8_gemm_of(tokens, seed):
        x_q, x_si, w_q, w_si = _e4m3_operands(tokens, seed=seed)
        del cslt.calls[:]
        y = fp8_gemm.sparse_fp8_mm(
            x_q, x_si, fp8_gemm.compress(w_q), OUT, w_si, use_cusparselt=True, alpha_mode=alpha_mode
        )
        ref = (x_q.double() @ w_q.double().t()) * (x_si.double() * w_si.double())
        assert ((y.double() - ref).abs() <= ref.abs() * 2**-7 + 1e-6).all()
        return list(cslt.calls)

    assert fp8_gemm_of(BUCKET + 5, 1) == [DEFAULT]  # off: today's call
    monkeypatch.setenv(cusparselt_search.SWITCH_ENV, "1")
    first = fp8_gemm_of(
        BUCKET + 5, 2
    )  # searched: algorithm 0, then the check's runs, then the GEMM
    assert first[0] == DEFAULT and first[-1] == Algorithm(6) and len(search.calls) == 1
    for tokens, seed in ((BUCKET, 3), (2 * BUCKET - 16, 4)):
        assert fp8_gemm_of(tokens, seed) == [Algorithm(6)]  # looked up: no search, no check
    assert len(search.calls) == 1
    assert fp8_gemm_of(BUCKET - 16, 5) == [DEFAULT]  # below the smallest bucket
    _, record = _search_key(search_env)
    assert record["alg_id"] == 6 and record["accepted"]


def _tp_worker(rank, port, path, results, found, wrong_on_rank1):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        w = masked_weight().float()
        operands = Operands(w, tokens_of(BUCKET).float().t())

        def run(compressed, dense, algorithm, *rest):
            y = compressed @ dense
            return y + 1.0 if rank == 1 and algorithm.alg_id in wrong_on_rank1 else y

        search = AlgorithmSearch(
            SpeedGate(f"{path}.{rank}"), search=lambda *a: Algorithm(found[rank]), run=run
        )
        agreed = search.algorithm_for(
            "forward", BUCKET, torch.float32, w.shape, operands, dist.group.WORLD
        )
        with open(os.path.join(results, f"{rank}.json"), "w") as f:
            json.dump(list(agreed), f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "found, wrong_on_rank1, agreed",
    [((3, 5), (), (5, 1, -1)), ((5, 3), (5,), (0, 1, -1))],
    ids=["different-ids-agree-on-one", "rank1-rejects-rank0s-choice"],
)
def test_tensor_parallel_ranks_agree_on_one_algorithm(tmp_path, found, wrong_on_rank1, agreed):
    results = tmp_path / "results"
    results.mkdir()
    torch.multiprocessing.spawn(
        _tp_worker,
        args=(free_port(), str(tmp_path / "gate.json"), str(results), found, wrong_on_rank1),
        nprocs=2,
    )
    assert [tuple(json.loads((results / f"{r}.json").read_text())) for r in (0, 1)] == [agreed] * 2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "tokens, out, k", [(4096, 4096, 4096), (8192, 14336, 4096), (4096, 512, 256)]
)
def test_gpu_search_result_matches_algorithm_0_and_the_dense_gemm(dtype, tokens, out, k):
    backend = BACKENDS["cusparselt"]
    reason = backend.device_reason(torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    g = torch.Generator("cuda").manual_seed(0)
    w = torch.randn(out, k, device="cuda", generator=g).to(dtype)
    w = w * weight_mask(w, "transposable")
    x = torch.randn(tokens, k, device="cuda", generator=g).to(dtype)
    operands = Operands(torch._cslt_compress(w), x.t(), transpose_result=True)
    found = cusparselt_search.torch_search(*operands)
    checker = AlgorithmSearch()  # its check only
    accepted, worst, tolerance, why = checker.check(found, operands)
    reference = x.double() @ w.double().t()
    dense = (x @ w.t()).double()
    alg0 = cusparselt_search.sparse_mm(operands.compressed, x.t(), DEFAULT, transpose_result=True)
    chosen = cusparselt_search.sparse_mm(operands.compressed, x.t(), found, transpose_result=True)
    scale = reference.abs().max().item()
    assert accepted, why
    for got in (alg0, chosen):
        assert (got.double() - reference).abs().max().item() <= 4 * torch.finfo(dtype).eps * scale
        assert (got.double() - dense).abs().max().item() <= 4 * torch.finfo(dtype).eps * scale


@pytest.mark.parametrize(
    "env", [(cusparselt_search.SWITCH_ENV, "yes"), (speed_gate.SWITCH_ENV, "off")]
)
def test_bad_switch_values_fail_at_module_construction(search_env, monkeypatch, env):
    """A bad switch value names itself when the sparse module is built, not at the first GPU
    GEMM (CPU runs never reach the GEMMs that read the switches)."""
    from megasparse import SparsityConfig
    from megasparse.fp8.layer import Fp8SparseLinear

    monkeypatch.setenv(*env)
    with pytest.raises(ValueError, match=f"{env[0]} must be 0"):
        Fp8SparseLinear(64, 32, sparsity=SparsityConfig(fp8="hybrid"))


def test_search_says_where_it_does_not_run(search_env, monkeypatch):
    """backend='cusparselt' never asks the speed gate, where the search runs: one warning says
    this layer keeps algorithm 0."""
    from megasparse import SparsityConfig
    from megasparse.core.sparse_module import SparseModuleMixin
    from megasparse.core.weight_state import SparseWeightState

    monkeypatch.setenv(cusparselt_search.SWITCH_ENV, "1")
    layer = SparseModuleMixin()
    layer.sparsity = SparsityConfig(backend="cusparselt")
    weight = torch.randn(OUT, IN, dtype=BF16)
    step = SparseWeightState().step(weight, layer.sparsity, BACKENDS["dense"])
    with pytest.warns(UserWarning, match="MEGASPARSE_CUSPARSELT_SEARCH=1 searches.*algorithm 0"):
        roles = layer.gated_roles(BUCKET, step, BACKENDS["cusparselt"])
    assert roles == speed_gate.ROLES
