"""Fused FP8 cast (+ transpose) kernel: Triton (interpreted on CPU) bitwise equal to the torch
reference, to the unfused `quantize_with` math and to `pad_rows(q).t().contiguous()`; the scalers'
one-reduction amax bitwise equal to abs().amax(); the FP8 linear unchanged bit for bit."""

import pytest
import torch

from devices import TRITON_DEVICE, on_triton_device
from megasparse import kernels
from megasparse.fp8 import gemm as fp8_gemm
from megasparse.fp8 import linear as fp8_linear
from megasparse.fp8 import scaling as fp8_recipe
from megasparse.fp8.scaling import (
    CurrentScaler,
    DelayedScaler,
    Fp8Recipe,
    TeQuantizerScaler,
    amax_of,
    quantize_with,
)
from megasparse.kernels import fp8_cast_reference
from megasparse.tools.perf.recorder import OpRecorder

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
    from megasparse.core.backends import BACKENDS
    from megasparse.config import SparsityConfig
    from megasparse.core.weight_state import SparseWeightState

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


# --- the fused amax (delayed scaling): the cast's own pass records max |t| ---------------------

NAN_BITS = 0x7FC00000  # torch's NaN: the kernel's NaN amax whatever NaN t holds


def cast_on_triton_device(t, scale, dtype=E4M3, transpose=False, amax=None):
    """The kernel on the Triton device, its amax written back in place (a CPU tensor in tests)."""
    on_device = None if amax is None else amax.to(TRITON_DEVICE)
    q, q_t = kernels.fp8_cast_triton(
        t.to(TRITON_DEVICE), scale.to(TRITON_DEVICE), dtype, transpose, on_device
    )
    if amax is not None:
        amax.copy_(on_device)
    return q.cpu(), None if q_t is None else q_t.cpu()


def amax_bits(a):
    return a.reshape(()).view(torch.int32).item()


def assert_amax_of(recorded, t):
    """`recorded` is amax_of(t) bit for bit; a NaN amax is torch's NaN (amax_of keeps a NaN
    payload of t, as torch's CPU reduction makes it)."""
    expected = amax_of(t)
    if torch.isnan(expected):
        assert amax_bits(recorded) == NAN_BITS, hex(amax_bits(recorded))
    else:
        assert amax_bits(recorded) == amax_bits(expected), (recorded, expected)


def _amax_cases(rows, cols, dtype, seed):
    t = _tensor(rows, cols, dtype, seed)  # NaN (both signs), +-Inf, -0, zero row
    yield t
    yield t.nan_to_num(0.0, INF, -INF) if dtype != torch.float16 else t.nan_to_num(0.0)  # Inf
    yield t.float().nan_to_num(0.0, 0.0, 0.0).to(dtype)  # finite
    yield -torch.zeros(rows, cols, dtype=dtype)
    yield torch.zeros(rows, cols, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    for v in (NAN, -NAN, INF, -INF):  # one special value, last element or at random
        for pos in (rows * cols - 1, int(torch.randint(rows * cols, (1,), generator=g))):
            u = torch.randn(rows, cols, generator=g).to(dtype)
            u.view(-1)[pos] = v
            yield u


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_amax_is_bitwise_amax_of(dtype, transpose):
    for i, (rows, cols) in enumerate(SHAPES + [(130, 65), (3, 200)]):
        for t in _amax_cases(rows, cols, dtype, seed=i):
            scale = torch.tensor(3.7)
            amax, ref_amax = torch.zeros(1), torch.zeros(1)
            q, q_t = cast_on_triton_device(t, scale, E4M3, transpose, amax)
            ref, ref_t = fp8_cast_reference(t, scale, E4M3, transpose, ref_amax)
            assert_amax_of(amax, t)
            assert amax_bits(amax) == amax_bits(ref_amax)  # the reference records the same
            assert amax_bits(amax) == amax_bits(kernels.amax_reference(t))
            plain, plain_t = cast_on_triton_device(t, scale, E4M3, transpose)  # q unchanged
            assert_bitwise(q, plain) and assert_bitwise(q, ref)
            if transpose:
                assert_bitwise(q_t, plain_t) and assert_bitwise(q_t, ref_t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_amax_of_every_16_bit_value(dtype):
    """Every bf16 / fp16 bit pattern, a row at a time: rows of NaN payloads, of Inf, subnormals."""
    t = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    t = t.reshape(256, 256)
    for row in range(0, 256, 17):
        for block in (t[row : row + 17], t[row : row + 17].flip(1)):
            amax = torch.zeros(1)
            cast_on_triton_device(block.contiguous(), torch.tensor(1.0), E5M2, True, amax)
            assert_amax_of(amax, block)


def test_kernel_amax_max_combines_with_the_target_and_skips_empty_tensors():
    t = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    for start, expected in ((0.0, 2.0), (3.0, 3.0), (NAN, NAN)):
        amax, ref_amax = torch.tensor([start]), torch.tensor([start])
        cast_on_triton_device(t, torch.tensor(1.0), E4M3, False, amax)
        fp8_cast_reference(t, torch.tensor(1.0), E4M3, False, ref_amax)
        assert amax_bits(amax) == amax_bits(ref_amax) == amax_bits(torch.tensor(expected))
    amax = torch.tensor([5.0])
    cast_on_triton_device(torch.empty(0, 32), torch.tensor(1.0), E4M3, True, amax)
    fp8_cast_reference(torch.empty(0, 32), torch.tensor(1.0), E4M3, True, amax)
    assert amax.item() == 5.0
    for bad in (torch.zeros(2), torch.zeros(1, dtype=torch.float64)):
        with pytest.raises(ValueError, match="amax"):
            fp8_cast_reference(t, torch.tensor(1.0), E4M3, False, bad)


class _UnfusedDelayed(DelayedScaler):
    """DelayedScaler before the fused amax: amax_of(t) first, then the cast."""

    def quantize(self, t, transpose=False):
        amax = amax_of(t)
        if self.history is None or self.history.device != amax.device:
            self.history, self.seen = amax.new_zeros(self.history_len), 0
        if self.seen == 0:
            used = amax
        elif self.algo == "most_recent":
            used = self.history[(self.seen - 1) % self.history_len]
        else:
            used = self.history[: min(self.seen, self.history_len)].amax()
        scale = fp8_recipe.scale_from_amax(used, self.dtype, self.margin)
        self.history[self.seen % self.history_len] = amax
        self.seen += 1
        q = old_quantize(t, scale, self.dtype)
        return q, scale.reciprocal(), fp8_gemm.pad_rows(q).t().contiguous() if transpose else None


def _unfused_te(state, t, dtype):
    """TeQuantizerScaler before the fused amax."""
    scale = state.scale.reshape(()).float()
    state.amax.copy_(torch.maximum(state.amax, amax_of(t).reshape(state.amax.shape)))
    return old_quantize(t, scale, dtype), scale.reciprocal()


def assert_same_amaxes(fused, unfused):
    """Bit for bit, NaN as torch's NaN (amax_of may keep a NaN payload of t)."""
    nan = torch.isnan(unfused)
    assert torch.equal(torch.isnan(fused), nan)
    assert torch.equal(fused[~nan].view(torch.int32), unfused[~nan].view(torch.int32))
    assert (fused[nan].view(torch.int32) == NAN_BITS).all()


def _delayed_inputs(dtype):
    for i in range(7):
        t = _tensor(21 + i, 48, dtype, seed=i).float()
        if i in (1, 2, 5):  # finite, at other magnitudes
            t = t.nan_to_num(0.0, 0.0, 0.0) * 2.0 ** (4 * i - 10)
        elif i == 3:
            t = t.nan_to_num(0.0)  # Inf, no NaN
        yield t.to(dtype)


@pytest.mark.parametrize("kernel", ["reference", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_delayed_scalers_record_the_unfused_amax(monkeypatch, dtype, kernel):
    """DelayedScaler's history and TE's amax buffer: bitwise the unfused amax_of(t) path (NaN as
    torch's NaN); q and scale_inv bitwise the same."""
    if kernel == "triton":
        monkeypatch.setattr(
            fp8_recipe, "_CAST_KERNEL", (cast_on_triton_device, cast_on_triton_device)
        )
    for history_len, algo in ((3, "max"), (2, "most_recent"), (1024, "max")):
        for fmt in FP8:
            new, old = (
                DelayedScaler(fmt, 1, history_len, algo),
                _UnfusedDelayed(fmt, 1, history_len, algo),
            )
            for i, t in enumerate(_delayed_inputs(dtype)):
                q, si, q_t = new.quantize(t, transpose=i % 2 == 0)
                q_old, si_old, q_t_old = old.quantize(t, transpose=i % 2 == 0)
                assert_bitwise(q, q_old) and torch.equal(
                    si.view(torch.int32), si_old.view(torch.int32)
                )
                if q_t is not None:
                    assert_bitwise(q_t, q_t_old)
                assert_same_amaxes(new.history, old.history)
    for fmt in FP8:
        state, old_state = _te_state(), _te_state()
        scaler = TeQuantizerScaler(state, fmt)
        for i, t in enumerate(_delayed_inputs(dtype)):
            if i == 4:  # TE's amax reduction resets the buffer between steps
                state.amax.zero_(), old_state.amax.zero_()
            q, si, _ = scaler.quantize(t, transpose=True)
            q_old, si_old = _unfused_te(old_state, t, fmt)
            assert_bitwise(q, q_old) and torch.equal(si, si_old)
            assert_same_amaxes(state.amax, old_state.amax)


def test_delayed_scalers_read_t_once():
    """Recorded on meta tensors with the kernel's stand-in: a delayed-scaling cast (TE's quantizer;
    DelayedScaler past its first call) is one pass over t, current scaling two (amax, then cast)."""
    from types import SimpleNamespace

    from megasparse.tools.perf.meta_model import _standins

    t = torch.empty(4096, 1024, device="meta", dtype=torch.bfloat16)
    te = SimpleNamespace(scale=torch.ones(1, device="meta"), amax=torch.zeros(1, device="meta"))
    delayed = DelayedScaler(E4M3, history_len=16)
    with _standins():
        delayed.quantize(t, transpose=True)  # the first call: its own amax, then the cast
        for scaler, passes in (
            (TeQuantizerScaler(te, E4M3), 1),
            (delayed, 1),
            (CurrentScaler(), 2),
        ):
            with OpRecorder() as rec:
                scaler.quantize(t, transpose=True)
            reads = [r.op for r in rec.records if r.bytes_read >= t.numel() * t.element_size()]
            assert len(reads) == passes, (scaler, reads)
            assert "fp8_cast" in reads[-1]
