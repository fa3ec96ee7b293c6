"""The bf16/fp16 2:4 route of sparse TE linears (megasparse.te.sparse_route through
megasparse.te.forward) against float64 masked-dense references, with stand-ins that keep TE's
signatures, communication, activation dtype and wgrad fusion (tests/references/te_standins.py)."""

import pytest
import torch
import torch.distributed as dist

from megasparse import SparsityConfig
from megasparse.core.backends import DenseBackend
from megasparse.core.masks import weight_mask
from megasparse.core.sparse_operand import WEIGHT
from megasparse.te.linear import sparse_te_class
from megasparse.testing import run_distributed
from reference import masked_linear_reference
from te_standins import TEGroupedLinearLike, TELayerNormLinearLike, TELinearLike

pytestmark = pytest.mark.usefixtures("megatron_tp1")
F64 = torch.float64


class CountingBackend(DenseBackend):
    """A sparse backend on CPU: the dense math, with each call and its sparse operand recorded."""

    name = "counting"

    def __init__(self):
        self.calls = []

    def compress(self, matrix):
        self.calls.append(("compress", tuple(matrix.shape), matrix.dtype))
        return matrix.clone()

    def linear(self, x2d, w, bias, sparse):
        self.calls.append(("linear", sparse, x2d.shape[0]))
        return super().linear(x2d, w, bias, sparse)

    def input_grad(self, dy2d, w, sparse):
        self.calls.append(("input_grad", sparse, dy2d.shape[0]))
        return super().input_grad(dy2d, w, sparse)

    def count(self, what):
        return sum(1 for call in self.calls if call[0] == what)


def counted(layer):
    """Give `layer` a counting backend (what backend_for resolves to on a GPU: cuSPARSELt)."""
    backend = CountingBackend()
    layer.backend_for = lambda weight: backend
    return backend


def linear(in_f=32, out_f=16, mask="1d", gradient="ste", dtype=F64, **kwargs):
    sparsity = SparsityConfig(mask=mask, gradient=gradient, srste_decay=0.1)
    return sparse_te_class(TELinearLike)(
        in_f, out_f, params_dtype=dtype, sparsity=sparsity, **kwargs
    )


@pytest.mark.parametrize("parallel_mode", [None, "column", "row"])
@pytest.mark.parametrize(
    "mask,gradient,bias,return_bias",
    [
        ("1d", "ste", True, False),
        ("transposable", "masked", True, True),
        ("1d", "srste", False, False),
        ("transposable", "ste", True, False),
    ],
)
def test_linear_route_against_float64(parallel_mode, mask, gradient, bias, return_bias):
    """Output, input / weight / bias gradients equal the float64 masked layer; the forward runs on
    the compressed W*M, the input gradient on the compressed (W*M)^T with transposable masks and
    on W*M (dense) with 1d masks."""
    torch.manual_seed(1)
    layer = linear(
        mask=mask,
        gradient=gradient,
        bias=bias,
        return_bias=return_bias,
        parallel_mode=parallel_mode,
    )
    backend = counted(layer)
    x = torch.randn(3, 5, 32, dtype=F64, requires_grad=True)
    y, returned = layer(x)
    m = weight_mask(layer.weight, mask)
    in_gemm = layer.bias if bias and not return_bias else None
    ref = masked_linear_reference(x, layer.weight, in_gemm, m, gradient, 0.1)
    y.backward(ref["dy"])
    torch.testing.assert_close(y, ref["y"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, ref["dx"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, ref["dw"], rtol=1e-12, atol=1e-12)
    if return_bias:
        assert returned is layer.bias and layer.bias.grad is None
    elif bias:
        torch.testing.assert_close(layer.bias.grad, ref["db"], rtol=1e-12, atol=1e-12)
    assert ("linear", WEIGHT, 15) in backend.calls
    dgrad_sparse = WEIGHT if mask == "transposable" else None
    assert ("input_grad", dgrad_sparse, 15) in backend.calls


@pytest.mark.parametrize("mask", ["1d", "transposable"])
def test_compress_runs_once_per_optimizer_step_across_micro_batches(mask):
    """k=4 micro-batches build W*M's compressed operands once (and (W*M)^T's with transposable
    masks); the optimizer step makes the next micro-batch build them again, from the new weight."""
    torch.manual_seed(2)
    layer = linear(mask=mask)
    backend = counted(layer)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    per_step = 2 if mask == "transposable" else 1
    for step in range(2):
        for _ in range(4):
            x = torch.randn(6, 32, dtype=F64, requires_grad=True)
            y, _ = layer(x)
            y.sum().backward()
        assert backend.count("compress") == per_step * (step + 1)
        assert backend.count("linear") == 5 * step + 4  # plus the check below
        m = weight_mask(layer.weight, mask)
        x = torch.randn(6, 32, dtype=F64)
        with torch.no_grad():
            torch.testing.assert_close(
                layer(x)[0], x @ (layer.weight * m).t() + layer.bias, rtol=1e-12, atol=1e-12
            )
        optimizer.step()
        optimizer.zero_grad()
    assert backend.count("compress") == per_step * 2


@pytest.mark.parametrize("gradient", ["ste", "masked", "srste"])
@pytest.mark.parametrize("mask", ["1d", "transposable"])
def test_wgrad_fusion_into_main_grad_over_micro_batches(gradient, mask):
    """fuse_wgrad_accumulation: after k=4 micro-batches main_grad holds the float64 sum of
    dY^T X with the gradient mode applied (srste's term once per step), the weight reports
    grad_added_to_main_grad, and it equals what TE's own fused GEMM on W*M gives."""
    torch.manual_seed(3)
    layers = []
    for route in (True, False):
        torch.manual_seed(3)
        layer = linear(mask=mask, gradient=gradient, fuse_wgrad_accumulation=True, bias=False)
        layer.weight.main_grad = torch.zeros(16, 32, dtype=torch.float32)
        layer.weight.grad_added_to_main_grad = False
        if route:
            counted(layer)
        else:  # TE's own forward: its fused GEMM on W*M (megasparse.core.linear_op.masked_weight)
            layer._sparse_now = lambda: False
            layer._get_weight_tensors = sparse_te_class(TELinearLike)._get_weight_tensors.__get__(
                layer
            )
        layers.append(layer)
    torch.manual_seed(4)
    xs = [torch.randn(5, 32, dtype=F64) for _ in range(4)]
    dys = [torch.randn(5, 16, dtype=F64) for _ in range(4)]
    for layer in layers:
        layer.is_first_microbatch = True
        for x, dy in zip(xs, dys):
            layer(x)[0].backward(dy)
        assert layer.weight.grad_added_to_main_grad is True
    mask_ = weight_mask(layers[0].weight, mask)
    expected = sum(dy.t() @ x for x, dy in zip(xs, dys))
    if gradient == "masked":
        expected = expected * mask_
    if gradient == "srste":
        expected = expected + 0.1 * (~mask_) * layers[0].weight.detach()
    for layer in layers:
        torch.testing.assert_close(layer.weight.main_grad.double(), expected, rtol=1e-6, atol=1e-6)


def test_te_overwrites_main_grad_on_the_first_micro_batch_the_route_adds_to_a_zeroed_buffer():
    """TE writes (not adds) main_grad when is_first_microbatch=True; the route always adds. Megatron
    zeroes the grad buffer before each step's first micro-batch, so both give the same main_grad."""
    torch.manual_seed(5)
    layer = linear(fuse_wgrad_accumulation=True, bias=False)
    counted(layer)
    layer.weight.main_grad = torch.zeros(16, 32, dtype=torch.float32)
    x, dy = torch.randn(5, 32, dtype=F64), torch.randn(5, 16, dtype=F64)
    layer(x)[0].backward(dy)
    torch.testing.assert_close(layer.weight.main_grad.double(), dy.t() @ x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_compute_in_their_dtype(dtype):
    """bf16/fp16 parameters and input: output and gradients in that dtype, close to float64."""
    torch.manual_seed(6)
    layer = linear(mask="transposable", dtype=dtype, in_f=64, out_f=32)
    backend = counted(layer)
    x = torch.randn(7, 64, dtype=dtype, requires_grad=True)
    y, _ = layer(x)
    assert y.dtype == dtype
    m = weight_mask(layer.weight, "transposable")
    ref = masked_linear_reference(x, layer.weight, layer.bias, m)
    y.backward(ref["dy"].to(dtype))
    torch.testing.assert_close(y.double(), ref["y"], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad.double(), ref["dx"], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(layer.weight.grad.double(), ref["dw"], rtol=2e-2, atol=5e-2)
    assert {c[2] for c in backend.calls if c[0] == "compress"} == {dtype}


def test_fp32_parameters_under_autocast_compute_with_w_m_cast_once_per_step():
    """TE's activation dtype under autocast (fp32 parameters): input, W*M and bias in bf16, bf16
    output; the cast W*M is built and compressed once per step, not per micro-batch; the fp32
    weight gets its gradient."""
    torch.manual_seed(7)
    layer = linear(mask="transposable", dtype=torch.float32, in_f=64, out_f=32)
    backend = counted(layer)
    m = weight_mask(layer.weight, "transposable")
    for _ in range(3):
        x = torch.randn(9, 64, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = layer(x)
        assert y.dtype == torch.bfloat16
        wm = (layer.weight.detach() * m).bfloat16().double()
        ref = x.detach().bfloat16().double() @ wm.t() + layer.bias.detach().bfloat16().double()
        torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2)
        y.float().sum().backward()
        assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    compresses = [c for c in backend.calls if c[0] == "compress"]
    assert [c[2] for c in compresses] == [torch.bfloat16, torch.bfloat16]  # W*M and (W*M)^T
    held = layer.sparsity_stats()["state_bytes"]  # the bf16 operands count as the step's state
    assert held["activation_dtype"] == 2 * 64 * 32 * 2
    # without the counting backend: the backend is resolved for the bf16 W*M TE computes with
    plain = linear(mask="transposable", dtype=torch.float32, in_f=64, out_f=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain(torch.randn(9, 64))  # backend='auto' on CPU: dense, once warned
    assert [key[2] for key in plain._backends] == [torch.bfloat16]


@pytest.mark.parametrize("te_class", [TELinearLike, TELayerNormLinearLike])
def test_dense_phase_is_tes_forward_exactly(te_class):
    """Nothing sparse now (disabled, or weights=None): TE's own forward runs, bit for bit, and no
    sparse backend is asked."""
    torch.manual_seed(8)
    base = te_class(32, 16, bias=True, params_dtype=F64)
    for sparsity in (SparsityConfig(enabled=False), SparsityConfig(weights=None)):
        torch.manual_seed(8)
        layer = sparse_te_class(te_class)(32, 16, bias=True, params_dtype=F64, sparsity=sparsity)
        backend = counted(layer)
        x = torch.randn(4, 32, dtype=F64, requires_grad=True)
        out, expected = layer(x), base(x)
        out, expected = (
            (out, expected) if te_class is TELayerNormLinearLike else (out[0], expected[0])
        )
        assert torch.equal(out, expected)
        assert backend.calls == []


def test_userbuffers_overlap_keeps_tes_forward_with_one_warning():
    """TE's userbuffers overlap (--tp-comm-overlap) on the module: TE's own forward (its dense
    GEMM on W*M), one warning naming the reason and the fix."""
    import warnings

    torch.manual_seed(9)
    layer = linear(mask="transposable")
    backend = counted(layer)
    layer.ub_overlap_ag_fprop = True  # what TE sets for column + sequence parallel + ub_overlap_ag
    x = torch.randn(4, 32, dtype=F64)
    with pytest.warns(UserWarning, match="ub_overlap_ag_fprop.*--tp-comm-overlap.*drop"):
        y, _ = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # said once
    te = TELinearLike(32, 16, params_dtype=F64)  # TE's forward on W*M
    with torch.no_grad():
        te.weight.copy_(layer.weight * weight_mask(layer.weight, "transposable"))
        te.bias.copy_(layer.bias)
    assert torch.equal(y, te(x)[0])
    assert backend.calls == []


def test_userbuffers_overlap_keeps_tes_forward_under_fp8_too(monkeypatch):
    """Under fp8_autocast with a per-tensor recipe, a module with TE's userbuffers overlap keeps
    TE's own (FP8) forward as well: the overlap lives inside TE's GEMM."""
    import megasparse.te.fp8_route as te_fp8

    from te_standins import current_recipe

    recipe = current_recipe()
    monkeypatch.setattr(te_fp8, "te_fp8_state", lambda: (True, recipe))
    torch.manual_seed(9)
    layer = linear(in_f=32, out_f=32, dtype=torch.float32)
    calls = []
    monkeypatch.setattr(te_fp8, "fp8_gemm", lambda *a, **k: calls.append(a))
    layer.ub_overlap_rs_dgrad = True
    x = torch.randn(4, 32)
    with pytest.warns(UserWarning, match="userbuffers.*--tp-comm-overlap"):
        y, _ = layer(x)
    assert calls == []  # no FP8 2:4 GEMM: TE's forward on W*M
    expected = x @ (layer.weight * weight_mask(layer.weight)).t() + layer.bias
    torch.testing.assert_close(y, expected.detach())


def _norm64(x, layer):
    x = x.double()
    g = layer.layer_norm_weight.double() + (1 if layer.zero_centered_gamma else 0)
    if layer.normalization == "RMSNorm":
        return x * (x.square().mean(-1, keepdim=True) + layer.eps).rsqrt() * g
    beta = layer.layer_norm_bias.double()
    return torch.nn.functional.layer_norm(x, x.shape[-1:], g, beta, layer.eps)


NORM_TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("zero_centered", [False, True])
@pytest.mark.parametrize(
    "mask,bias,return_bias,return_ln",
    [("1d", True, False, True), ("transposable", True, True, False), ("1d", False, False, False)],
)
def test_layernorm_linear_against_float64(
    normalization, zero_centered, mask, bias, return_bias, return_ln
):
    """TE's norm (megasparse.te.norm.te_normalization), then the linear on the route: outputs in
    TE's order, all gradients (norm parameters too) equal the float64 reference (to the norm's
    fp32 math, as TE's norm kernel computes)."""
    torch.manual_seed(10)
    layer = sparse_te_class(TELayerNormLinearLike)(
        32,
        16,
        eps=1e-3,
        normalization=normalization,
        zero_centered_gamma=zero_centered,
        bias=bias,
        return_bias=return_bias,
        return_layernorm_output=return_ln,
        params_dtype=F64,
        sparsity=SparsityConfig(mask=mask),
    )
    backend = counted(layer)
    x = torch.randn(2, 5, 32, dtype=F64, requires_grad=True)
    outputs = layer(x)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    y = outputs[0]
    assert len(outputs) == 1 + return_bias + return_ln
    if return_bias:
        assert outputs[1] is layer.bias
    x64 = x.detach().clone().requires_grad_(True)
    params = [layer.layer_norm_weight] + (
        [layer.layer_norm_bias] if normalization == "LayerNorm" else []
    )
    p64 = [p.detach().clone().requires_grad_(True) for p in params]
    ref_layer = type("N", (), {})()
    ref_layer.layer_norm_weight, ref_layer.eps = p64[0], 1e-3
    ref_layer.layer_norm_bias = p64[1] if len(p64) > 1 else None
    ref_layer.normalization, ref_layer.zero_centered_gamma = normalization, zero_centered
    ln64 = _norm64(x64, ref_layer)
    m = weight_mask(layer.weight, mask)
    wm = (layer.weight.detach() * m).requires_grad_(True)
    in_gemm = layer.bias.detach() if bias and not return_bias else None
    y64 = torch.nn.functional.linear(ln64, wm, in_gemm)
    torch.testing.assert_close(y, y64, **NORM_TOL)
    dy = torch.randn_like(y)
    loss = (y * dy).sum()
    loss64 = (y64 * dy).sum()
    if return_ln:
        torch.testing.assert_close(outputs[-1], ln64, **NORM_TOL)
        dln = torch.randn_like(outputs[-1])
        loss, loss64 = loss + (outputs[-1] * dln).sum(), loss64 + (ln64 * dln).sum()
    loss.backward()
    loss64.backward()
    torch.testing.assert_close(x.grad, x64.grad, **NORM_TOL)
    for p, r in zip(params, p64):
        torch.testing.assert_close(p.grad, r.grad, **NORM_TOL)
    torch.testing.assert_close(layer.weight.grad, wm.grad, **NORM_TOL)
    assert ("linear", WEIGHT, 10) in backend.calls


SPLITS = [5, 0, 11, 3]  # uneven, one expert without tokens


@pytest.mark.parametrize(
    "mask,gradient,bias,return_bias",
    [
        ("1d", "ste", True, False),
        ("transposable", "srste", False, False),
        ("1d", "masked", True, True),
    ],
)
def test_grouped_linear_per_expert_against_float64(mask, gradient, bias, return_bias):
    """One route GEMM per expert with tokens, each on its own compressed W*M and gated by its own
    token count; the expert without tokens runs no GEMM and gets a zero gradient (plus srste's
    per-step term)."""
    torch.manual_seed(11)
    layer = sparse_te_class(TEGroupedLinearLike)(
        4,
        32,
        16,
        bias=bias,
        return_bias=return_bias,
        sparsity=SparsityConfig(mask=mask, gradient=gradient, srste_decay=0.1),
    ).double()
    backend = counted(layer)
    gated = []
    gated_roles = layer.gated_roles
    layer.gated_roles = lambda tokens, *args: gated.append(tokens) or gated_roles(tokens, *args)
    x = torch.randn(sum(SPLITS), 32, dtype=F64, requires_grad=True)
    dy = torch.randn(sum(SPLITS), 16, dtype=F64)
    y, returned = layer(x, SPLITS)
    y.backward(dy)
    assert gated == SPLITS
    biases = [getattr(layer, f"bias{i}") for i in range(4)]
    if return_bias:
        assert all(r is b for r, b in zip(returned, biases))
    start = 0
    for i, n in enumerate(SPLITS):
        w = getattr(layer, f"weight{i}")
        m = weight_mask(w, mask)
        rows = slice(start, start + n)
        in_gemm = biases[i] if bias and not return_bias else None
        ref = masked_linear_reference(x[rows], w, in_gemm, m, gradient, 0.1, grad_output=dy[rows])
        torch.testing.assert_close(y[rows], ref["y"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad[rows], ref["dx"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(w.grad, ref["dw"], rtol=1e-12, atol=1e-12)
        start += n
    with_tokens = sum(1 for n in SPLITS if n)
    assert backend.count("linear") == with_tokens
    assert backend.count("compress") == with_tokens * (2 if mask == "transposable" else 1)


def test_grouped_linear_fuses_each_experts_wgrad_into_its_main_grad():
    """TE GroupedLinear with fuse_wgrad_accumulation: each expert's main_grad holds the sum over
    micro-batches of its own dY^T X (zero for the expert without tokens), flagged as added."""
    torch.manual_seed(12)
    layer = sparse_te_class(TEGroupedLinearLike)(4, 32, 16, sparsity=SparsityConfig()).double()
    layer.fuse_wgrad_accumulation = True  # TE's attribute (Megatron: gradient_accumulation_fusion)
    counted(layer)
    weights = [getattr(layer, f"weight{i}") for i in range(4)]
    for w in weights:
        w.main_grad = torch.zeros(16, 32, dtype=torch.float32)
        w.grad_added_to_main_grad = False
    expected = [torch.zeros(16, 32, dtype=F64) for _ in weights]
    for _ in range(2):
        x, dy = torch.randn(sum(SPLITS), 32, dtype=F64), torch.randn(sum(SPLITS), 16, dtype=F64)
        layer(x, SPLITS)[0].backward(dy)
        for i, (x_i, dy_i) in enumerate(zip(x.split(SPLITS), dy.split(SPLITS))):
            expected[i] += dy_i.t() @ x_i
    for w, e in zip(weights, expected):
        assert w.grad_added_to_main_grad is True
        torch.testing.assert_close(w.main_grad.double(), e, rtol=1e-6, atol=1e-6)


# --- TP=2 over gloo: the same full weights give the float64 full-weight reference -------------

HIDDEN, FFN, SEQ = 32, 64, 8


def _tp2_worker():
    import warnings

    from megatron.core import parallel_state

    rank, tp = dist.get_rank(), dist.get_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    torch.manual_seed(0)
    x_full, dy_full = torch.randn(SEQ, 2, HIDDEN, dtype=F64), torch.randn(SEQ, 2, HIDDEN, dtype=F64)
    w1, w2 = torch.randn(FFN, HIDDEN, dtype=F64), torch.randn(HIDDEN, FFN, dtype=F64)
    b1, b2 = torch.randn(FFN, dtype=F64), torch.randn(HIDDEN, dtype=F64)
    rows, seq = (
        slice(rank * FFN // tp, (rank + 1) * FFN // tp),
        slice(rank * SEQ // tp, (rank + 1) * SEQ // tp),
    )
    warned = []
    for mask in ("1d", "transposable"):
        m1, m2 = weight_mask(w1, mask), weight_mask(w2, mask)
        x64 = x_full.clone().requires_grad_(True)
        w1m, w2m = (w1 * m1).requires_grad_(True), (w2 * m2).requires_grad_(True)
        y64 = torch.nn.functional.linear(
            torch.relu(torch.nn.functional.linear(x64, w1m, b1)), w2m, b2
        )
        y64.backward(dy_full)
        for sequence_parallel in (False, True):
            for overlap in (False, True) if sequence_parallel else (False,):
                where = f"rank {rank} {mask} sp={sequence_parallel} ub={overlap}"
                kw = dict(sequence_parallel=sequence_parallel, tp_group=group, params_dtype=F64)
                sparsity = SparsityConfig(mask=mask)
                fc1 = sparse_te_class(TELinearLike)(
                    HIDDEN,
                    FFN,
                    parallel_mode="column",
                    ub_overlap_ag=overlap,
                    sparsity=sparsity,
                    **kw,
                )
                fc2 = sparse_te_class(TELinearLike)(
                    FFN, HIDDEN, parallel_mode="row", ub_overlap_rs=overlap, sparsity=sparsity, **kw
                )
                backends = [counted(fc1), counted(fc2)]
                with torch.no_grad():
                    fc1.weight.copy_(w1[rows]), fc1.bias.copy_(b1[rows])
                    fc2.weight.copy_(w2[:, rows]), fc2.bias.copy_(b2)
                x = (x_full[seq] if sequence_parallel else x_full).clone().requires_grad_(True)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    y, _ = fc2(torch.relu(fc1(x)[0]))
                y.backward(dy_full[seq] if sequence_parallel else dy_full)
                close = dict(rtol=1e-10, atol=1e-10, msg=lambda s: f"{where}: {s}")
                torch.testing.assert_close(
                    y, (y64[seq] if sequence_parallel else y64).detach(), **close
                )
                torch.testing.assert_close(
                    x.grad, x64.grad[seq] if sequence_parallel else x64.grad, **close
                )
                torch.testing.assert_close(fc1.weight.grad, w1m.grad[rows], **close)
                torch.testing.assert_close(fc2.weight.grad, w2m.grad[:, rows], **close)
                ran = [backend.count("linear") for backend in backends]
                if overlap:  # TE's forward on W*M, said in a warning
                    assert fc1.ub_overlap_ag_fprop and fc2.ub_overlap_rs_fprop, where
                    assert ran == [0, 0], where
                    warned += [w for w in caught if "--tp-comm-overlap" in str(w.message)]
                else:
                    assert ran == [1, 1], where
    assert len(warned) == 2  # once per layer kind (column, row flags), not per call


def test_tp2_column_and_row_with_sequence_parallel_and_the_overlap_fallback():
    run_distributed(_tp2_worker, world_size=2, tensor_model_parallel_size=2)


def _tp2_layernorm_worker():
    """TE LayerNormLinear (RMSNorm, column) at TP=2 with and without sequence parallelism, the
    gathered norm output returned: equal to the float64 full-weight reference."""
    from megatron.core import parallel_state

    rank, tp = dist.get_rank(), dist.get_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    torch.manual_seed(1)
    x_full, w = torch.randn(SEQ, 2, HIDDEN, dtype=F64), torch.randn(FFN, HIDDEN, dtype=F64)
    gamma, b = torch.randn(HIDDEN, dtype=F64) * 0.2 + 1, torch.randn(FFN, dtype=F64)
    dy_full = torch.randn(SEQ, 2, FFN, dtype=F64)
    rows = slice(rank * FFN // tp, (rank + 1) * FFN // tp)
    seq = slice(rank * SEQ // tp, (rank + 1) * SEQ // tp)
    m = weight_mask(w, "transposable")
    x64, g64 = x_full.clone().requires_grad_(True), gamma.clone().requires_grad_(True)
    ln64 = x64 * (x64.square().mean(-1, keepdim=True) + 1e-5).rsqrt() * g64
    y64 = torch.nn.functional.linear(ln64, w * m, b)
    y64.backward(dy_full)
    for sequence_parallel in (False, True):
        where = f"rank {rank} sp={sequence_parallel}"
        layer = sparse_te_class(TELayerNormLinearLike)(
            HIDDEN,
            FFN,
            normalization="RMSNorm",
            bias=True,
            return_layernorm_output=True,
            return_layernorm_output_gathered=True,
            sequence_parallel=sequence_parallel,
            tp_group=group,
            params_dtype=F64,
            sparsity=SparsityConfig(mask="transposable"),
        )
        backend = counted(layer)
        with torch.no_grad():
            layer.weight.copy_(w[rows]), layer.bias.copy_(b[rows])
            layer.layer_norm_weight.copy_(gamma)
        x = (x_full[seq] if sequence_parallel else x_full).clone().requires_grad_(True)
        y, ln_out = layer(x)
        y.backward(dy_full[..., rows])
        tol = dict(rtol=2e-5, atol=2e-5, msg=lambda s: f"{where}: {s}")
        torch.testing.assert_close(y, y64.detach()[..., rows], **tol)
        torch.testing.assert_close(ln_out, ln64.detach(), **tol)  # gathered: the full sequence
        torch.testing.assert_close(x.grad, x64.grad[seq] if sequence_parallel else x64.grad, **tol)
        dw = dy_full[..., rows].reshape(-1, FFN // tp).t() @ ln64.detach().reshape(-1, HIDDEN)
        torch.testing.assert_close(layer.weight.grad, dw, **tol)  # ste: dY^T ln
        dgamma = layer.layer_norm_weight.grad.clone()
        if sequence_parallel:  # Megatron all-reduces sequence-parallel norm grads over TP later
            dist.all_reduce(dgamma)
        torch.testing.assert_close(dgamma, g64.grad, **tol)
        assert backend.count("linear") == 1, where


def test_tp2_layernorm_linear_with_sequence_parallel():
    run_distributed(_tp2_layernorm_worker, world_size=2, tensor_model_parallel_size=2)


def test_route_writes_main_grad_where_the_weight_asks_for_it():
    """Megatron-FSDP marks parameters `overwrite_main_grad = True` and TE then writes dY^T X into
    main_grad with accumulate=False (TE main module/linear.py); the route writes it too, for
    every gradient mode, where a plain add would keep the buffer's old contents."""
    torch.manual_seed(5)
    for gradient in ("ste", "masked"):
        layer = linear(fuse_wgrad_accumulation=True, bias=False, gradient=gradient)
        counted(layer)
        layer.weight.overwrite_main_grad = True  # what Megatron-FSDP sets on every parameter
        layer.weight.main_grad = torch.full((16, 32), 7.0, dtype=torch.float32)
        x, dy = torch.randn(5, 32, dtype=F64), torch.randn(5, 16, dtype=F64)
        layer(x)[0].backward(dy)
        ref = dy.t() @ x
        if gradient == "masked":
            ref = ref * layer.sparsity_mask()
        torch.testing.assert_close(layer.weight.main_grad.double(), ref, rtol=1e-6, atol=1e-6)


def test_sparse_te_linear_under_megatron_fsdp_is_refused():
    layer = linear()
    setattr(layer.weight, "__fsdp_param__", True)  # what Megatron-FSDP sets
    with pytest.raises(NotImplementedError, match="Megatron-FSDP"):
        layer(torch.randn(4, 32, dtype=F64))
