"""GPU paths on device="meta" at real shapes: argument order, dtypes and shapes of
every cuSPARSELt call, checked on CPU with the fakes of megasparse.tools.perf.fake_ops.

device_reason refuses non-CUDA devices, so the backend objects are called directly.
"""

import pytest
import torch

from megasparse.tools.perf import fake_ops

from megasparse.fp8 import gemm as fp8_gemm
from megasparse.core.backends import BACKENDS
from megasparse.tools.perf.fake_ops import fake_gpu_ops
from megasparse.tools.perf.recorder import OpRecorder
from megasparse.core.linear_op import LinearPlan, sparse_linear
from megasparse.core.sparse_operand import mark_sparse

HIDDEN, FFN, TOKENS = 8192, 28672, 16384
BF16, E4M3, F32 = torch.bfloat16, torch.float8_e4m3fn, torch.float32


def meta(*shape, dtype=BF16, grad=False):
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)


def cslt_calls(rec):
    return [r for r in rec.records if r.op in ("_cslt_compress", "_cslt_sparse_mm")]


def test_fakes_follow_torch_2_13s_own_meta_registration():
    """_cslt_compress gives the binding's 2-D [m, ...] blob (9/16 of the columns for bf16, 10/16 for
    e4m3); _cslt_sparse_mm's output is what torch's own meta kernel, which reads m from the blob's
    size(0), gives for the same arguments."""
    from torch._meta_registrations import meta__cslt_sparse_mm

    with fake_gpu_ops():
        packed = torch._cslt_compress(meta(256, 128))
        packed_e4m3 = torch._cslt_compress(meta(256, 128, dtype=E4M3))
        assert (packed.shape, packed.dtype) == ((256, 128 * 9 // 16), BF16)
        assert (packed_e4m3.shape, packed_e4m3.dtype) == ((256, 128 * 10 // 16), E4M3)
        calls = [
            (packed, meta(128, 64), {}),
            (packed, meta(64, 128).t(), {"transpose_result": True}),
            (packed_e4m3, meta(64, 128, dtype=E4M3).t(), {"out_dtype": torch.float32}),
            (packed_e4m3, meta(64, 128, dtype=E4M3).t(), {"out_dtype": BF16, "bias": meta(256)}),
        ]
        for compressed, dense, kwargs in calls:
            ours = torch._cslt_sparse_mm(compressed, dense, **kwargs)
            torchs = meta__cslt_sparse_mm(compressed, dense, **kwargs)
            assert (ours.shape, ours.dtype) == (torchs.shape, torchs.dtype)
            assert ours.shape[1 if kwargs.get("transpose_result") else 0] == 256
        with pytest.raises(RuntimeError, match="reduction dims"):
            torch._cslt_sparse_mm(packed, meta(96, 64))  # wrong K
        with pytest.raises(RuntimeError, match="out_dtype"):
            torch._cslt_sparse_mm(packed, meta(128, 64), out_dtype=torch.float32)  # bf16: none
        with pytest.raises(RuntimeError, match="2-D"):
            torch._cslt_sparse_mm(packed.reshape(-1), meta(128, 64))  # the old 1-D blob
    # outside the block torch's own meta kernel is back, and agrees on m
    assert torch._cslt_sparse_mm(packed, meta(128, 64)).shape == (256, 64)


def test_fake_sparse_mm_refuses_the_layouts_the_binding_misreads():
    """cuSPARSELtOps.cpp describes B from is_contiguous() alone: row-major, else column-major with
    leading dimension k. Anything else is refused; 8-bit B must be column-major."""
    with fake_gpu_ops():
        packed = torch._cslt_compress(meta(256, 128))
        torch._cslt_sparse_mm(packed, meta(128, 64))  # row-major
        torch._cslt_sparse_mm(packed, meta(64, 128).t())  # column-major
        assert [c["dense_layout"] for c in fake_ops.sparse_mm_calls[-2:]] == [
            "row-major",
            "column-major",
        ]
        column_slice = meta(128, 96)[:, :64]  # row stride 96, not 64
        transposed_slice = meta(64, 160)[:, :128].t()  # column stride 160, not 128
        expanded = meta(1, 64).expand(128, 64)  # the dY of .sum().backward()
        for misread in (column_slice, transposed_slice, expanded):
            with pytest.raises(RuntimeError, match="wrong leading dimension"):
                torch._cslt_sparse_mm(packed, misread)
        packed_e4m3 = torch._cslt_compress(meta(256, 128, dtype=E4M3))
        with pytest.raises(RuntimeError, match="column-major"):
            torch._cslt_sparse_mm(packed_e4m3, meta(128, 64, dtype=E4M3), out_dtype=BF16)
        torch._cslt_sparse_mm(packed_e4m3, meta(64, 128, dtype=E4M3).t(), out_dtype=BF16)


def test_from_dense_still_checks_shape_on_meta():
    with fake_gpu_ops(), pytest.raises(RuntimeError, match="multiple of"):
        BACKENDS["cusparselt"].tensor_class().from_dense(meta(100, 128))


@pytest.mark.parametrize("tp", [1, 8])
@pytest.mark.parametrize("transposable", [False, True])
def test_cusparselt_ffn_forward_backward(tp, transposable):
    x = meta(TOKENS, HIDDEN, grad=True)
    w1, w2 = meta(FFN // tp, HIDDEN, grad=True), meta(HIDDEN, FFN // tp, grad=True)
    m1, m2 = meta(FFN // tp, HIDDEN, dtype=torch.bool), meta(HIDDEN, FFN // tp, dtype=torch.bool)
    backend = BACKENDS["cusparselt"]
    for w in (w1, w2):
        assert backend.static_reason(tuple(w.shape), BF16, transposable) is None
    plan = LinearPlan(backend=backend, transposable=transposable)
    with fake_gpu_ops(), OpRecorder() as rec:
        h = sparse_linear(x, w1, None, m1, plan)
        y = sparse_linear(torch.relu(h), w2, None, m2, plan)
        y.backward(torch.empty_like(y))
    assert (h.shape, y.shape, y.dtype) == ((TOKENS, FFN // tp), (TOKENS, HIDDEN), BF16)
    assert x.grad.shape == x.shape and w1.grad.shape == w1.shape and w2.grad.shape == w2.shape
    assert {x.grad.dtype, w1.grad.dtype, w2.grad.dtype} == {BF16}
    gemms = [r for r in cslt_calls(rec) if r.op == "_cslt_sparse_mm"]
    # fc1 fwd, fc2 fwd, then (transposable) fc2 and fc1 input gradients:
    # (weight rows, tokens, reduction)
    expected = [(FFN // tp, TOKENS, HIDDEN), (HIDDEN, TOKENS, FFN // tp)]
    if transposable:
        expected += [(FFN // tp, TOKENS, HIDDEN), (HIDDEN, TOKENS, FFN // tp)]
    assert [g.mnk for g in gemms] == expected and {g.dtype for g in gemms} == {BF16}


@pytest.mark.parametrize("x_is_a_column_slice", [False, True])
def test_cusparselt_operands_of_a_sliced_x_and_an_expanded_dy(x_is_a_column_slice):
    """dY the expanded ones of .sum().backward(), x a column slice of a wider tensor: neither is
    row- nor column-major, which the binding would read with the wrong leading dimension (the
    fakes refuse it). Every dense operand reaches cuSPARSELt in a layout the binding describes:
    torch's cusparselt_mm hands it the transpose of our contiguous x2d / dY2d."""
    leaf = meta(TOKENS, HIDDEN + 64 if x_is_a_column_slice else HIDDEN, grad=True)
    x = leaf[:, :HIDDEN]
    w, mask = meta(FFN, HIDDEN, grad=True), meta(FFN, HIDDEN, dtype=torch.bool)
    plan = LinearPlan(backend=BACKENDS["cusparselt"], transposable=True)
    before = len(fake_ops.sparse_mm_calls)
    with fake_gpu_ops():  # no OpRecorder: the fakes alone run cusparselt_mm's body
        y = sparse_linear(x, w, None, mask, plan)
        y.sum().backward()
    calls = [(c["m"], c["n"], c["k"], c["dense_layout"]) for c in fake_ops.sparse_mm_calls[before:]]
    assert calls == [
        (FFN, TOKENS, HIDDEN, "column-major"),  # forward: B = x2d^T
        (HIDDEN, TOKENS, FFN, "column-major"),  # input gradient on (W*M)^T: B = dY2d^T
    ]
    assert leaf.grad.shape == leaf.shape and w.grad.shape == w.shape


@pytest.mark.parametrize("tp", [1, 8])
def test_cusparselt_sparse_grad_output_of_a_2_4_activation(tp):
    """fc1's input gradient with dH (2:4 along ffn) as the sparse operand, compressed per call."""
    x, w1 = meta(TOKENS, HIDDEN, grad=True), meta(FFN // tp, HIDDEN, grad=True)
    plan = LinearPlan(backend=BACKENDS["cusparselt"])
    with fake_gpu_ops(), OpRecorder() as rec:
        h = sparse_linear(x, w1, None, None, plan)
        h.backward(
            mark_sparse(torch.empty_like(h), (64, 2, 4))
        )  # dH as the 2:4 activation's backward marks it
    compress = [r for r in cslt_calls(rec) if r.op == "_cslt_compress"]
    assert len(compress) == 1 and compress[0].bytes_read == TOKENS * (FFN // tp) * 2
    (mm,) = [r for r in cslt_calls(rec) if r.op == "_cslt_sparse_mm"]
    assert mm.mnk == (TOKENS, HIDDEN, FFN // tp) and x.grad.shape == x.shape


@pytest.mark.parametrize("tp", [1, 8])
def test_fp8_sparse_gemm(tp):
    x_q, w_q = meta(TOKENS, HIDDEN, dtype=E4M3), meta(FFN // tp, HIDDEN, dtype=E4M3)
    scale_inv = torch.ones((), device="meta")
    with fake_gpu_ops(), OpRecorder() as rec:
        packed = fp8_gemm.compress(w_q)
        y = fp8_gemm.sparse_fp8_mm(
            x_q, scale_inv, packed, FFN // tp, scale_inv, use_cusparselt=True
        )
    assert (y.shape, y.dtype) == ((TOKENS, FFN // tp), BF16)
    compress, mm = cslt_calls(rec)
    assert (
        compress.op == "_cslt_compress"
        and mm.mnk == (FFN // tp, TOKENS, HIDDEN)  # m: the compressed blob's size(0)
        and mm.dtype == E4M3
    )
    # 8-bit: kept values (1/2) and their metadata (1/8) of the weight's bytes = 10/16
    assert compress.bytes_written == (FFN // tp) * HIDDEN * 10 // 16


@pytest.mark.parametrize("alpha_mode", ["output", "vector"])
def test_fp8_sparse_gemm_has_no_host_sync(monkeypatch, alpha_mode):
    """By default no alpha at all (the scale is applied by the output's epilogue pass): e4m3 with
    a column-major B and bf16 out, the combination PyTorch runs; the vector alpha (one float per
    weight row) is an option. Neither reads a one-element alpha with .item()."""
    if alpha_mode != "output":
        monkeypatch.setenv("MEGASPARSE_FP8_ALPHA", alpha_mode)
    before = fake_ops.alpha_item_calls
    scale_inv = torch.ones((), device="meta")
    with fake_gpu_ops():
        packed = fp8_gemm.compress(meta(64, 128, dtype=E4M3))
        y = fp8_gemm.sparse_fp8_mm(
            meta(40, 128, dtype=E4M3), scale_inv, packed, 64, scale_inv, use_cusparselt=True
        )
    assert (y.shape, y.dtype) == ((40, 64), BF16) and y.is_contiguous()
    call = fake_ops.sparse_mm_calls[-1]
    assert fake_ops.alpha_item_calls == before
    assert (call["n"], call["dense_layout"]) == (48, "column-major")  # tokens padded to 16
    if alpha_mode == "output":
        assert (call["alpha"], call["out_dtype"], call["transpose_result"]) == (None, BF16, False)
    else:
        assert (call["alpha"], call["out_dtype"], call["transpose_result"]) == (
            ((64,), F32),  # one per weight row
            BF16,
            True,
        )


def _fp8_step(weight, mask_kind):
    from megasparse.core.masks import pack_mask
    from megasparse.core.weight_state import WeightStep

    mask = torch.empty(weight.shape, device="meta", dtype=torch.bool)
    return WeightStep(weight, pack_mask(mask), BACKENDS["dense"], mask_kind == "transposable", True)


def _assert_fp8_calls_scale_in_the_epilogue(calls):
    """e4m3 operands, no alpha, bf16 out for the scaling epilogue; B = x^T of a row-major x."""
    for c in calls:
        assert (c["dtype"], c["alpha"], c["out_dtype"], c["transpose_result"]) == (
            E4M3,
            None,
            BF16,
            False,
        )
        assert c["dense_layout"] == "column-major"


@pytest.mark.parametrize("tp", [1, 8])
@pytest.mark.parametrize("mask_kind", ["1d", "transposable"])
@pytest.mark.parametrize("tokens", [TOKENS, TOKENS - 8])  # 16k, and a count that needs padding
def test_fp8_2_4_ffn_forward_backward(tp, mask_kind, tokens):
    """The FP8 2:4 training op (megasparse.fp8.linear) on fc1 and fc2 at real shard shapes: every
    cuSPARSELt call's arguments, no host sync, the FP8 weight built once for two micro-batches."""
    from megasparse.fp8.linear import default_plan, fp8_sparse_linear_step

    w1, w2 = meta(FFN // tp, HIDDEN, grad=True), meta(HIDDEN, FFN // tp, grad=True)
    s1, s2 = _fp8_step(w1, mask_kind), _fp8_step(w2, mask_kind)
    plan = default_plan(use_cusparselt=True)
    before_sync, before_calls = fake_ops.alpha_item_calls, len(fake_ops.sparse_mm_calls)
    with fake_gpu_ops(), OpRecorder() as rec:
        for _ in range(2):  # two micro-batches of one optimizer step
            x = meta(tokens, HIDDEN, grad=True)
            h = fp8_sparse_linear_step(x, w1, None, s1, plan)
            y = fp8_sparse_linear_step(torch.relu(h), w2, None, s2, plan)
            y.backward(torch.empty_like(y))
    assert (h.shape, y.shape, y.dtype, x.grad.shape, x.grad.dtype) == (
        (tokens, FFN // tp),
        (tokens, HIDDEN),
        BF16,
        x.shape,
        BF16,
    )
    assert w1.grad.shape == w1.shape and w2.grad.shape == w2.shape
    assert fake_ops.alpha_item_calls == before_sync  # no .item()
    calls = fake_ops.sparse_mm_calls[before_calls:]
    padded = -(-tokens // 16) * 16
    # per micro-batch: fc1 fwd, fc2 fwd, then (transposable) fc2 and fc1 input gradients
    # (m = rows of the sparse operand, n = padded tokens, k = reduction)
    step_calls = [(FFN // tp, padded, HIDDEN), (HIDDEN, padded, FFN // tp)]
    if mask_kind == "transposable":
        step_calls += [(FFN // tp, padded, HIDDEN), (HIDDEN, padded, FFN // tp)]
    assert [(c["m"], c["n"], c["k"]) for c in calls] == step_calls * 2
    _assert_fp8_calls_scale_in_the_epilogue(calls)
    compress = [r for r in cslt_calls(rec) if r.op == "_cslt_compress"]
    assert len(compress) == (4 if mask_kind == "transposable" else 2)  # once per step, per operand
    assert all(r.dtype == E4M3 or r.dtype is None for r in compress)
    scaled = [r for r in rec.records if r.op == "_scaled_mm"]
    # wgrad of fc1 and fc2 per micro-batch (FP8 as TE), plus the dense FP8 dgrads for 1d masks
    assert len(scaled) == 2 * (2 if mask_kind == "transposable" else 4)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("tp", [1, 8])
def test_grouped_experts_with_uneven_and_zero_token_counts(tp, sparse):
    """SparseGroupedMLP's path on meta tensors: 8 experts, expert 1 with no tokens. Dense backend:
    the per-step states stacked once, one grouped GEMM per product (forward, and PyTorch's autograd
    for dX and dW). A sparse backend (a counting stand-in) with the gate's smallest bucket: the
    experts from 4096 tokens on run their own sparse GEMMs, the rest the grouped GEMMs."""
    from types import SimpleNamespace

    from megatron.core.activations import squared_relu

    from backend_standins import CountingSparseBackend
    from megasparse import SparsityConfig
    from megasparse.core import speed_gate
    from megasparse.core.activation_sparsity import ActivationStats
    from megasparse.megatron.grouped_gemm import (
        ExpertGemms,
        StackedWeights,
        expert_plans,
        grouped_ffn,
        sparse_activation,
    )
    from megasparse.tools.perf.meta_model import _standins
    from megasparse.core.weight_state import SparseWeightState

    counts = [4096, 0, 1000, 3000, 16, 2048, 2, 6222]
    experts, ffn = len(counts), FFN // tp
    backend = CountingSparseBackend() if sparse else BACKENDS["dense"]
    sparsity = SparsityConfig(activations="2:4", backend="auto")
    x = meta(sum(counts), HIDDEN, grad=True)
    w1 = [meta(ffn, HIDDEN, grad=True) for _ in range(experts)]
    w2 = [meta(HIDDEN, ffn, grad=True) for _ in range(experts)]
    config = SimpleNamespace(
        moe_apply_probs_on_input=False, recompute_modules=None, recompute_granularity=None
    )

    def gate(e, tokens, step):  # sparse from the smallest bucket on
        return speed_gate.ROLES if speed_gate.token_bucket(tokens) else ()

    def gemms(weights):
        steps = [SparseWeightState().step(w, sparsity, backend) for w in weights]
        plans = expert_plans(steps, [backend] * experts, counts, gate, [False] * experts)
        return ExpertGemms(weights, steps, plans, StackedWeights())

    with _standins(), OpRecorder() as rec:
        fc1, fc2 = gemms(w1), gemms(w2)
        y = grouped_ffn(
            x,
            torch.tensor(counts),
            meta(sum(counts), dtype=torch.float32),
            fc1,
            fc2,
            sparse_activation(squared_relu, sparsity),
            ActivationStats(),
            config,
        )
        y.backward(torch.empty_like(y))
    assert y.shape == x.shape == x.grad.shape and y.dtype == BF16
    assert all(w.grad.shape == w.shape for w in w1 + w2)
    grouped = [r for r in rec.records if r.op == "_grouped_mm"]
    assert len(grouped) == 6  # fc1, fc2 forward; dX and dW of each
    if sparse:
        alone = [n for n in counts if n >= speed_gate.SMALLEST_BUCKET]
        sparse_forwards = [n for role, op, n in backend.gemms if role == "forward" and op]
        assert sorted(sparse_forwards) == sorted(2 * alone)  # fc1 and fc2 of each
        assert sorted(backend.compressed) == sorted([(ffn, HIDDEN), (HIDDEN, ffn)] * len(alone))


@pytest.mark.parametrize("mask_kind", ["1d", "transposable"])
def test_te_grouped_linear_fp8_2_4_experts(mask_kind, monkeypatch):
    """Sparse TE GroupedLinear experts (megasparse.te.forward) under FP8 at h8192 / ffn28672 per expert:
    one FP8 2:4 cuSPARSELt GEMM per expert with tokens and none for the expert without, every
    call's arguments, no host sync, each expert's FP8 weight built once for two micro-batches."""
    import megasparse.te.fp8_route as te_fp8
    from megasparse import SparsityConfig
    from megasparse.fp8.scaling import Fp8Recipe
    from megasparse.te.linear import sparse_te_class
    from megasparse.tools.perf.meta_model import _standins
    from te_standins import TEGroupedLinearLike

    # sm90 stands in for meta: the route as it is there (HYBRID per-tensor recipe, cuSPARSELt)
    monkeypatch.setattr(te_fp8, "fp8_route", lambda module, unsupported=None: (Fp8Recipe(), True))
    counts = [4096, 0, 1000, 3000, 16, 2048, 2, 6222]
    sparsity = SparsityConfig(mask=mask_kind)
    cls = sparse_te_class(TEGroupedLinearLike)
    with torch.device("meta"):
        fc1 = cls(len(counts), HIDDEN, FFN, sparsity=sparsity).to(BF16)
        fc2 = cls(len(counts), FFN, HIDDEN, sparsity=sparsity).to(BF16)
    before_sync, before_calls = fake_ops.alpha_item_calls, len(fake_ops.sparse_mm_calls)
    with _standins(), OpRecorder() as rec:
        for _ in range(2):  # two micro-batches of one optimizer step
            x = meta(sum(counts), HIDDEN, grad=True)
            h, _ = fc1(x, counts)
            y, _ = fc2(torch.relu(h), counts)
            y.backward(torch.empty_like(y))
    assert (h.shape, y.shape, y.dtype, x.grad.shape) == (
        (sum(counts), FFN),
        (sum(counts), HIDDEN),
        BF16,
        x.shape,
    )
    for layer in (fc1, fc2):
        weights = [getattr(layer, name) for name in layer._sparse_weight_names()]
        assert all(w.grad.shape == w.shape for w in weights)  # expert 1 (no tokens) too
    assert fake_ops.alpha_item_calls == before_sync  # no .item()
    calls = fake_ops.sparse_mm_calls[before_calls:]
    padded = [-(-n // 16) * 16 for n in counts if n]  # no call for the expert without tokens
    # per micro-batch and expert: fc1 [FFN, HIDDEN] and fc2 [HIDDEN, FFN] forward; with
    # transposable masks the input gradients on (W*M)^T: fc2's [FFN, HIDDEN], fc1's [HIDDEN, FFN]
    per_mb = [(FFN, p, HIDDEN) for p in padded] + [(HIDDEN, p, FFN) for p in padded]
    expected = per_mb * (4 if mask_kind == "transposable" else 2)
    assert sorted((c["m"], c["n"], c["k"]) for c in calls) == sorted(expected)
    _assert_fp8_calls_scale_in_the_epilogue(calls)
    compress = [r for r in cslt_calls(rec) if r.op == "_cslt_compress"]
    with_tokens = len(padded)
    # once per step per expert with tokens, per operand (W*M, and (W*M)^T when transposable)
    assert len(compress) == 2 * with_tokens * (2 if mask_kind == "transposable" else 1)
    scaled = [r for r in rec.records if r.op == "_scaled_mm"]
    # wgrad of each expert with tokens, both layers, per micro-batch; plus dense dgrads for 1d
    assert len(scaled) == 2 * 2 * with_tokens * (1 if mask_kind == "transposable" else 2)
