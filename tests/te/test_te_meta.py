"""The bf16 2:4 route of sparse TE linears on device="meta" at real shapes (h8192 / ffn28672, 16k
tokens, the shards of TP 1 and 8): every cuSPARSELt call with its shapes and dtypes, and no weight
work after the first of k=4 micro-batches of an optimizer step (the compressed W*M and (W*M)^T are
built once per step). The GPU ops run as the fakes of megasparse.tools.perf.fake_ops."""

import pytest
import torch

from megasparse import SparsityConfig
from megasparse.core.backends import BACKENDS
from megasparse.te.linear import sparse_te_class
from megasparse.tools.perf.recorder import OpRecorder
from megasparse.tools.perf.meta_model import _standins
from te_standins import TEGroupedLinearLike, TELayerNormLinearLike, TELinearLike

HIDDEN, FFN, TOKENS, MICRO_BATCHES = 8192, 28672, 16384, 4
BF16 = torch.bfloat16
MASK_OPS = {"megasparse_perf.mask_2_4", "__rshift__", "bitwise_and", "arange"}  # build / unpack


def on_cusparselt(layer):
    """backend_for as on an sm80+ GPU (on meta, device_reason refuses: not CUDA)."""
    layer.backend_for = lambda weight: BACKENDS["cusparselt"]
    for name in layer._sparse_weight_names():
        weight = getattr(layer, name)
        # Megatron's DDP: wgrad fused into main_grad, the dummy .grad dropped after each backward
        weight.main_grad = torch.zeros(weight.shape, device="meta")
        weight.grad_added_to_main_grad = False
        weight.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    return layer


def micro_batches(run):
    """The records of each of k micro-batches of one optimizer step."""
    records = []
    with _standins():
        for _ in range(MICRO_BATCHES):
            with OpRecorder() as rec:
                run()
            records.append(rec.records)
    return records


def sparse_mms(records):
    return [(r.mnk, r.dtype) for r in records if r.op == "_cslt_sparse_mm"]


def assert_no_weight_work(records, weights):
    """No compress, no mask op and no bf16 weight-sized write (W*M rebuilt) in a micro-batch."""
    sizes = {w.numel() * w.element_size() for w in weights}
    ops = [r.op for r in records]
    assert "_cslt_compress" not in ops and not MASK_OPS & set(ops)
    rebuilt = [r.op for r in records if r.kind != "gemm" and r.bytes_written in sizes]
    assert rebuilt == []


@pytest.mark.parametrize("tp", [1, 8])
@pytest.mark.parametrize("mask", ["1d", "transposable"])
def test_te_ffn_runs_cusparselt_with_the_step_s_compressed_weights(tp, mask):
    """fc1 = TE LayerNormLinear (RMSNorm, column shard), fc2 = TE Linear (row shard): forward GEMMs
    and (transposable) input-gradient GEMMs on cuSPARSELt in bf16; 1d masks: the dense input
    gradient on the step's held W*M. W*M and (W*M)^T are compressed in micro-batch 1 only."""
    sparsity = SparsityConfig(mask=mask, hold_backward_weight=True)
    kw = dict(params_dtype=BF16, sparsity=sparsity, fuse_wgrad_accumulation=True)
    with torch.device("meta"):
        fc1 = sparse_te_class(TELayerNormLinearLike)(
            HIDDEN, FFN // tp, normalization="RMSNorm", **kw
        )
        fc2 = sparse_te_class(TELinearLike)(
            FFN // tp, HIDDEN, parallel_mode="row", bias=False, **kw
        )
    on_cusparselt(fc1), on_cusparselt(fc2)
    shapes = []

    def step():
        x = torch.empty(TOKENS, HIDDEN, device="meta", dtype=BF16, requires_grad=True)
        h = fc1(x)
        y, _ = fc2(torch.relu(h))
        y.backward(torch.empty_like(y))
        shapes.append((h.shape, h.dtype, y.shape, y.dtype, x.grad.shape, x.grad.dtype))

    records = micro_batches(step)
    assert set(shapes) == {
        ((TOKENS, FFN // tp), BF16, (TOKENS, HIDDEN), BF16, (TOKENS, HIDDEN), BF16)
    }
    # (weight rows, tokens, reduction): fc1 and fc2 forward, then fc2 and fc1 input gradients
    expected = [(FFN // tp, TOKENS, HIDDEN), (HIDDEN, TOKENS, FFN // tp)]
    if mask == "transposable":
        expected += [(FFN // tp, TOKENS, HIDDEN), (HIDDEN, TOKENS, FFN // tp)]
    for mb in records:
        assert sparse_mms(mb) == [(mnk, BF16) for mnk in expected]
        if mask == "1d":  # dY (W*M) on the held W*M: fc2's, then fc1's
            dgrads = [r.mnk for r in mb if r.op == "mm" and r.mnk[0] == TOKENS]
            assert dgrads == [(TOKENS, FFN // tp, HIDDEN), (TOKENS, HIDDEN, FFN // tp)]
    compress = [r for r in records[0] if r.op == "_cslt_compress"]
    assert len(compress) == (4 if mask == "transposable" else 2)
    for mb in records[1:]:
        assert_no_weight_work(mb, [fc1.weight, fc2.weight])


def test_te_grouped_linear_experts_run_cusparselt_each_on_its_own_compressed_weight():
    """8 TE GroupedLinear experts with uneven loads (one without tokens): one cuSPARSELt forward
    GEMM per expert with tokens, each expert's W*M compressed once per step."""
    counts = [4096, 0, 1000, 3000, 16, 2048, 2, 6222]
    sparsity = SparsityConfig(hold_backward_weight=True)
    with torch.device("meta"):
        fc1 = sparse_te_class(TEGroupedLinearLike)(len(counts), HIDDEN, FFN, sparsity=sparsity)
        fc1 = on_cusparselt(fc1.to(BF16))

    def step():
        x = torch.empty(sum(counts), HIDDEN, device="meta", dtype=BF16, requires_grad=True)
        h, _ = fc1(x, counts)
        h.backward(torch.empty_like(h))
        assert (h.shape, h.dtype, x.grad.shape) == ((sum(counts), FFN), BF16, x.shape)

    records = micro_batches(step)
    # torch pads the dense operand's rows to its cuSPARSELt minimum (semi_structured.py)
    rows = BACKENDS["cusparselt"].tensor_class()._DTYPE_SHAPE_CONSTRAINTS[BF16].dense_min_rows
    padded = [-(-n // rows) * rows for n in counts if n]
    for mb in records:
        assert sorted(sparse_mms(mb)) == sorted(((FFN, n, HIDDEN), BF16) for n in padded)
    compress = [r for r in records[0] if r.op == "_cslt_compress"]
    assert len(compress) == sum(1 for n in counts if n)
    weights = [getattr(fc1, name) for name in fc1._sparse_weight_names()]
    for mb in records[1:]:
        assert_no_weight_work(mb, weights)
