"""Fused FP8 cast (+ transpose) kernel: Triton (interpreted on CPU) bitwise equal to the torch
reference, to the unfused `quantize_with` math and to `pad_rows(q).t().contiguous()`; the scalers'
one-reduction amax bitwise equal to abs().amax(); the FP8 linear unchanged bit for bit."""

import pytest
import torch

from devices import TRITON_DEVICE, on_triton_device
from megasparse import fp8_gemm, fp8_linear, fp8_recipe, kernels
from megasparse.fp8_recipe import (
    CurrentScaler,
    DelayedScaler,
    Fp8Recipe,
    TeQuantizerScaler,
    amax_of,
    quantize_with,
)
from megasparse.kernels import fp8_cast_reference
from megasparse.op_recorder import OpRecorder

fp8_cast_triton = on_triton_device(kernels.fp8_cast_triton)

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8 = [E4M3, E5M2]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
INF, NAN = float("inf"), float("nan")


def old_quantize(t, scale, dtype):
    """The unfused torch passes the kernel replaces (quantize_with before the kernel)."""
    fmax = float(torch.finfo(dtype).max)
    return (t.float() * scale).clamp(-fmax, fmax).to(dtype)


def bits(q):
    return q.view(torch.uint8)


def assert_bitwise(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b)), (bits(a) != bits(b)).nonzero()[:8]


def _tensor(rows, cols, dtype, seed=0):
    """Normal values at several magnitudes, with zeros, -0, NaN (both signs), +-Inf, values
    beyond the fp8 range after scaling, fp8 subnormals, and exact halfway (tie) values."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, cols, generator=g) * torch.logspace(-6, 4, cols).exp2()
    special = [0.0, -0.0, NAN, -NAN, INF, -INF, 1e30, -1e30, 2.0**-9, 3 * 2.0**-10, 1.0625, 1.1875]
    special += [2.0**-17, -(2.0**-16) * 3, 464.0, 480.0, 57344.0, 61440.0]
    flat = t.view(-1)
    for i, v in enumerate(special):
        flat[(i * 7919) % flat.numel()] = v
    if rows > 2:
        t[2] = 0.0  # a row of zeros
    return t.to(dtype)


SHAPES = [(21, 48), (37, 80), (1, 16), (64, 64), (65, 130), (16, 7)]


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_is_bitwise_the_reference_and_the_unfused_math(dtype, fp8, transpose):
    for i, (rows, cols) in enumerate(SHAPES):
        t = _tensor(rows, cols, dtype, seed=i)
        for scale in (torch.tensor(1.0), torch.tensor([3.7]), torch.tensor(2.0**-10)):
            q, q_t = fp8_cast_triton(t, scale, fp8, transpose)
            ref, ref_t = fp8_cast_reference(t, scale, fp8, transpose)
            assert_bitwise(q, ref)
            assert_bitwise(q, old_quantize(t, scale, fp8))
            assert_bitwise(q, quantize_with(t, scale, fp8))
            if not transpose:
                assert q_t is None and ref_t is None
                continue
            assert q_t.shape == (cols, -(-rows // 16) * 16) and q_t.is_contiguous()
            assert_bitwise(q_t, ref_t)
            assert_bitwise(q_t, fp8_gemm.pad_rows(q).t().contiguous())  # what _weight_grad did


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16_bit_input_value(dtype, fp8):
    """All 65536 bf16 / fp16 bit patterns (NaNs with payloads, subnormals, Inf), at scales that
    land them on fp8 subnormals, ties and saturation."""
    t = (
        torch.arange(-(2**15), 2**15, dtype=torch.int32)
        .to(torch.int16)
        .view(dtype)
        .reshape(256, 256)
    )
    for scale in (1.0, 0.7, 2.0**-20, 2.0**20, 448.0 / 3.0):
        s = torch.tensor(scale)
        q, q_t = fp8_cast_triton(t, s, fp8, True)
        assert_bitwise(q, old_quantize(t, s, fp8))
        assert_bitwise(q_t, old_quantize(t, s, fp8).t().contiguous())


@pytest.mark.parametrize("fp8", FP8)
def test_random_float32_bit_patterns(fp8):
    """float32 inputs from random bit patterns: every exponent, NaN payloads, fp32 subnormals."""
    g = torch.Generator().manual_seed(3)
    t = torch.randint(-(2**31), 2**31, (96, 512), generator=g, dtype=torch.int64)
    t = t.to(torch.int32).view(torch.float32)
    for scale in (1.0, 2.0**-100, 2.0**100, 3.0):
        s = torch.tensor(scale)
        q, q_t = fp8_cast_triton(t, s, fp8, True)
        assert_bitwise(q, old_quantize(t, s, fp8))
        assert_bitwise(q_t, old_quantize(t, s, fp8).t().contiguous())


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0 * inf
def test_nan_keeps_its_sign_and_padding_is_zero_whatever_the_scale():
    t = torch.tensor([[NAN, -NAN, INF, -INF], [0.0, -0.0, 1.0, -1.0], [1.0, 2.0, 3.0, 4.0]])
    for fp8 in FP8:
        q, q_t = fp8_cast_triton(t, torch.tensor(INF), fp8, True)  # 0 * inf is NaN: not in padding
        assert bits(q)[0].tolist() == [
            0x7F,
            0xFF,
            0x7E if fp8 == E4M3 else 0x7B,
            0xFE if fp8 == E4M3 else 0xFB,
        ]
        assert (bits(q_t)[:, 3:] == 0).all() and q_t.shape == (4, 16)
        assert_bitwise(q, old_quantize(t, torch.tensor(INF), fp8))


def test_empty_and_bad_inputs():
    q, q_t = fp8_cast_triton(torch.empty(0, 32), torch.tensor(1.0), E4M3, True)
    assert q.shape == (0, 32) and q_t.shape == (32, 0)
    with pytest.raises(ValueError, match="2-D"):
        fp8_cast_reference(torch.ones(2, 3, 4), torch.tensor(1.0))
    with pytest.raises(ValueError, match="casts to"):
        fp8_cast_reference(torch.ones(2, 4), torch.tensor(1.0), torch.int8)


def test_scale_is_read_from_the_device_tensor():
    """The kernel takes the scale by pointer (no .item()): a changed scale tensor changes q."""
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    scale = torch.tensor(1.0, device=TRITON_DEVICE)
    first = kernels.fp8_cast_triton(t.to(TRITON_DEVICE), scale)[0].float().cpu()
    scale.fill_(2.0)
    second = kernels.fp8_cast_triton(t.to(TRITON_DEVICE), scale)[0].float().cpu()
    assert first.tolist() == [[1.0, 2.0], [3.0, 4.0]] and second.tolist() == [
        [2.0, 4.0],
        [6.0, 8.0],
    ]


# --- the amax: one reduction, bitwise abs().amax() -------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_amax_is_one_reduction_and_bitwise_abs_amax(dtype):
    g = torch.Generator().manual_seed(0)
    cases = [[], [NAN], [-NAN], [INF], [-INF], [NAN, INF], [-INF, NAN], [-0.0], [1e30, -1e30]]
    for special in cases:
        for pos in (0, 5, 1000, 4095):
            t = torch.randn(64, 64, generator=g).to(dtype)
            for i, v in enumerate(special):
                t.view(-1)[(pos + 7 * i) % 4096] = v
            old = t.abs().amax().float()
            new = amax_of(t)
            assert new.dtype == torch.float32
            assert torch.equal(old.view(torch.int32), new.view(torch.int32)), (special, old, new)
    zeros = -torch.zeros(8, 8, dtype=dtype)
    assert torch.equal(
        amax_of(zeros).view(torch.int32), zeros.abs().amax().float().view(torch.int32)
    )
    meta = torch.empty(4096, 1024, device="meta", dtype=dtype)
    with OpRecorder() as rec:
        amax_of(meta)
    (op,) = [r for r in rec.records if r.bytes_read > 4]  # one pass over t, no |t| intermediate
    assert op.op == "linalg_vector_norm" and op.bytes_read == meta.numel() * meta.element_size()
    assert sum(r.bytes for r in rec.records) <= op.bytes_read + 16  # and the float32 scalar


# --- the scalers: quantize(t, transpose) beside scaler(t) ------------------------------------


def _te_state():
    from types import SimpleNamespace

    return SimpleNamespace(scale=torch.tensor([4.0]), amax=torch.tensor([0.0]))


def _scalers():
    return [
        lambda: CurrentScaler(E4M3),
        lambda: CurrentScaler(E5M2, margin=1, pow2=True),
        lambda: DelayedScaler(E4M3, history_len=3),
        lambda: TeQuantizerScaler(_te_state(), E5M2),
    ]


@pytest.mark.parametrize("make", _scalers())
def test_scaler_quantize_gives_the_call_and_the_padded_transpose(make):
    a, b = make(), make()
    for i in range(3):  # delayed scaling: the same history either way
        t = _tensor(21, 48, torch.bfloat16, seed=i).nan_to_num(0.0, 100.0, -100.0)
        q, si = a(t)
        q2, si2, q_t = b.quantize(t, transpose=True)
        assert_bitwise(q, q2) and torch.equal(si, si2)
        assert_bitwise(q_t, fp8_gemm.pad_rows(q).t().contiguous())
        assert b.quantize(t)[2] is None


# --- the FP8 linear: the same results, x^T cast at forward time -----------------------------


class _PlainScaler:
    """A scaler with only the call signature: fp8_linear transposes its output itself (the old
    `pad_rows(q).t().contiguous()` path)."""

    def __init__(self, scaler):
        self.scaler, self.calls = scaler, 0

    def __call__(self, t):
        self.calls += 1
        return self.scaler(t)


def _run(plan, w_seed=11, fused_kernel=False, monkeypatch=None):
    from megasparse.backends import BACKENDS
    from megasparse.config import SparsityConfig
    from megasparse.weight_state import SparseWeightState

    g = torch.Generator().manual_seed(w_seed)
    w = torch.randn(64, 128, generator=g).requires_grad_(True)
    x = torch.randn(3, 7, 128, generator=g).requires_grad_(True)  # 21 tokens: padded to 32
    dy = torch.randn(3, 7, 64, generator=g).to(torch.bfloat16)
    cfg = SparsityConfig(mask=plan.mask_kind, gradient="ste")
    step = SparseWeightState().step(w, cfg, BACKENDS["dense"])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fp8_linear.fp8_sparse_linear_step(x, w, None, step, plan.plan)
    y.backward(dy)
    return y, x.grad, w.grad, saved


class _Case:
    def __init__(self, mask_kind, recipe, wrap=False):
        plan = fp8_linear.default_plan(recipe)
        if wrap:
            plan = fp8_linear.Fp8LinearPlan(
                _PlainScaler(plan.x_scaler),
                _PlainScaler(plan.grad_scaler),
                plan.dgrad_scaler and _PlainScaler(plan.dgrad_scaler),
                plan.use_cusparselt,
                plan.fp8_wgrad,
            )
        self.mask_kind, self.plan = mask_kind, plan


@pytest.mark.parametrize("kernel", ["reference", "triton"])
@pytest.mark.parametrize("mask_kind", ["1d", "transposable"])
@pytest.mark.parametrize("grad_dtype", [E5M2, E4M3])
def test_fp8_linear_is_unchanged_bit_for_bit(monkeypatch, mask_kind, grad_dtype, kernel):
    """Scalers with the fused cast (the Triton kernel, interpreted here, or its reference) give
    y, dX and dW bitwise equal to the old path: plain-call scalers and pad_rows(q).t() copies."""
    recipe = Fp8Recipe(grad_dtype=grad_dtype)
    old = _run(_Case(mask_kind, recipe, wrap=True))
    if kernel == "triton":  # the CPU path runs the interpreted kernel
        monkeypatch.setattr(fp8_recipe, "_CAST_KERNEL", (fp8_cast_triton, fp8_cast_triton))
    new = _run(_Case(mask_kind, recipe))
    for a, b in zip(old[:3], new[:3]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    # the forward saves x^T [in, tokens padded to 16] in e4m3 for the wgrad
    assert any(t.dtype == E4M3 and t.shape == (128, 32) for t in new[3])
    assert not any(t.dtype == E4M3 and t.shape == (21, 128) for t in new[3])


def test_one_cast_of_dy_serves_both_gemms_when_they_take_e4m3():
    """E4M3 gradients with transposable masks: dgrad and wgrad share one cast of dY (it was cast
    twice, recording its amax twice in a delayed history)."""
    recipe = Fp8Recipe(grad_dtype=E4M3)
    case = _Case("transposable", recipe, wrap=True)
    _run(case)
    assert case.plan.grad_scaler.calls == 1 and case.plan.x_scaler.calls == 1
    hybrid = _Case("transposable", Fp8Recipe(grad_dtype=E5M2), wrap=True)
    _run(hybrid)  # HYBRID: e4m3 dY for cuSPARSELt's dgrad, e5m2 dY for the wgrad
    assert hybrid.plan.grad_scaler.calls == 1 and hybrid.plan.dgrad_scaler.calls == 1


def test_high_precision_wgrad_saves_x_and_casts_no_transpose(monkeypatch):
    calls = []
    real = fp8_recipe.fp8_cast
    monkeypatch.setattr(
        fp8_recipe,
        "fp8_cast",
        lambda t, s, d=E4M3, transpose=False: calls.append(transpose) or real(t, s, d, transpose),
    )
    case = _Case("1d", Fp8Recipe(fp8_wgrad=False))
    y, dx, dw, saved = _run(case)
    assert calls and not any(calls)
    assert any(t.dtype == torch.float32 and t.shape == (21, 128) for t in saved)


# --- on a GPU: the kernel itself, and the dispatch -----------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_kernel_is_bitwise_torchs_cuda_cast(dtype, fp8):
    for rows, cols in [(16384, 8192), (21, 48), (4097, 1024)]:
        t = _tensor(rows, cols, dtype).cuda()
        scale = torch.tensor(3.7, device="cuda")
        q, q_t = kernels.fp8_cast_triton(t, scale, fp8, True)
        assert_bitwise(q, old_quantize(t, scale, fp8))  # torch's CUDA cast kernels
        assert_bitwise(q_t, fp8_gemm.pad_rows(q).t().contiguous())
        assert_bitwise(quantize_with(t, scale, fp8), q)  # quantize_with dispatches to the kernel
        assert torch.equal(amax_of(t).view(torch.int32), t.abs().amax().float().view(torch.int32))
