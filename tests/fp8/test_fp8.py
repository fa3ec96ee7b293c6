"""FP8 (e4m3) 2:4 GEMM: CPU emulation with torch float8 and torch._scaled_mm against float64 references."""

from types import SimpleNamespace

import pytest
import torch

from megasparse.config import Fp8Order, SparsityConfig
from megasparse.core.backends import BACKENDS
from megasparse.core.masks import weight_mask
from megasparse.core.weight_state import SparseWeightState
from megasparse.fp8 import gemm as gemm_ops
from megasparse.fp8 import linear as fp8_linear
from megasparse.fp8.scaling import (
    E4M3,
    E5M2,
    FP8_MAX,
    CurrentScaler,
    DelayedScaler,
    Fp8Recipe,
    TeQuantizerScaler,
    quantize_with,
    quantized_weight,
    scale_from_amax,
)
from megasparse.fp8.study import Fp8NumericsStudy, sparse_fp8_weight
from fp8_reference import q64

E4M3_MAX = FP8_MAX[E4M3]


def _w(shape=(64, 128), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_scale_and_saturating_quantize():
    assert scale_from_amax(torch.tensor(0.0)).item() == 1.0
    assert scale_from_amax(torch.tensor(2.0), margin=1).item() == E4M3_MAX / 2 / 2
    q = quantize_with(torch.tensor([1e6, -1e6, 0.5]), torch.tensor(1.0))
    assert q.float().tolist() == [E4M3_MAX, -E4M3_MAX, 0.5]


@pytest.mark.parametrize("order", list(Fp8Order))
@pytest.mark.parametrize("mask_kind", ["1d", "transposable"])
def test_fp8_weight_is_2_4_and_close_to_the_masked_weight(order, mask_kind):
    w = _w()
    w_q, scale, mask = sparse_fp8_weight(w, None, mask_kind, order)
    assert w_q.dtype == torch.float8_e4m3fn
    nonzero = w_q.float().ne(0).reshape(-1, 4).sum(1)
    assert (nonzero <= 2).all() and (mask.reshape(-1, 4).sum(1) == 2).all()
    deq = w_q.float() / scale
    ref = (w * mask).double()
    rel = ((deq.double() - ref).abs() / ref.abs().clamp_min(1e-12))[mask & (ref.abs() > 1e-2)]
    assert rel.max() <= 2**-4 + 1e-6  # e4m3: 3 mantissa bits, round to nearest


def test_orders_differ_where_quantization_creates_ties():
    # 1.00, 1.01, 1.02 land on one e4m3 value (the row's scale puts them near 112, where the grid
    # step is 8): quantize-then-prune sees a three-way tie and keeps the lower indices
    w = torch.tensor([[0.1, 1.01, 1.00, 1.02, 1.0, 2.0, 3.0, 4.0]])
    _, _, m_pq = sparse_fp8_weight(w, None, "1d", "prune-then-quantize")
    _, _, m_qp = sparse_fp8_weight(w, None, "1d", "quantize-then-prune")
    assert m_pq[0, :4].tolist() == [False, True, False, True]  # 1.01 and 1.02: the true two largest
    assert m_qp[0, :4].tolist() == [
        False,
        True,
        True,
        False,
    ]  # tie at the quantized value: lower index
    assert m_qp[0, 4:].tolist() == m_pq[0, 4:].tolist()


def test_gemm_emulation_is_the_scaled_fp32_product():
    x, w = _w((48, 128), 1), _w((64, 128), 2)
    sx, sw = scale_from_amax(x.abs().max()), scale_from_amax(w.abs().max())
    x_q, w_q = quantize_with(x, sx), quantize_with(w * weight_mask(w), sw)
    y = gemm_ops.dense_fp8_mm(x_q, sx.reciprocal(), w_q, sw.reciprocal())
    assert y.dtype == torch.bfloat16
    ref = (x_q.double() / sx.double()) @ (w_q.double() / sw.double()).t()
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2)  # bf16 output rounding


@pytest.mark.parametrize("order", list(Fp8Order))
def test_numerics_study_against_float64_reference(order):
    x = _w((4, 12, 128), 3).requires_grad_(True)
    w = _w((64, 128), 4).requires_grad_(True)
    layer = Fp8NumericsStudy(mask_kind="1d", order=order)
    y = layer(x, w)
    mask = (
        weight_mask(w)
        if order == "prune-then-quantize"
        else sparse_fp8_weight(w, None, "1d", order)[2]
    )
    ref = x.detach().double() @ (w.detach().double() * mask).t()
    rel = (y.double() - ref).norm() / ref.norm()
    assert rel < 0.05  # FP8 tolerance (e4m3 operands, fp32 accumulation)
    dy = torch.randn_like(ref)
    y.backward(dy.to(y.dtype))
    torch.testing.assert_close(
        w.grad.double(),
        dy.reshape(-1, 64).t() @ x.detach().double().reshape(-1, 128),
        rtol=2e-2,
        atol=2e-1,
    )  # ste weight gradient (dy rounded to bf16)
    dx_ref = dy @ (w.detach().double() * mask)
    assert ((x.grad.double() - dx_ref).norm() / dx_ref.norm()) < 0.05


def _delayed(history_len, algo):
    return Fp8Recipe(amax_history_len=history_len, amax_compute_algo=algo, delayed=True)


@pytest.mark.parametrize("order", list(Fp8Order))
def test_numerics_study_runs_the_training_op(order):
    """The study's forward is the FP8 training op's, bit for bit (the same e4m3 operands and GEMM
    under current scaling), through the one autograd Function of megasparse.fp8.linear."""
    w, x = _w((64, 128), 14).requires_grad_(True), _w((21, 128), 15)
    y = Fp8NumericsStudy(order=order)(x, w)
    cfg = SparsityConfig(fp8="hybrid", fp8_order=order)
    step = SparseWeightState(mask_source=quantized_weight).step(w, cfg, BACKENDS["dense"])
    plan = fp8_linear.default_plan(order=order)
    assert torch.equal(y, fp8_linear.fp8_sparse_linear_step(x, w, None, step, plan))
    assert type(y.grad_fn).__name__ == "_Fp8SparseLinearBackward"


@pytest.mark.parametrize(
    "order,weight_casts", [("prune-then-quantize", 1), ("quantize-then-prune", 2)]
)
def test_numerics_study_casts_the_weight_once_per_call(monkeypatch, order, weight_casts):
    """W*M is cast to e4m3 once per call, by the op's FP8 weight (quantize-then-prune also casts W,
    which its mask is taken of); the forward still equals the float64 product of the operands."""
    from megasparse.fp8 import scaling

    casts, original = [], scaling.fp8_cast
    monkeypatch.setattr(
        scaling,
        "fp8_cast",
        lambda t, *a, **k: (casts.append(tuple(t.shape)), original(t, *a, **k))[1],
    )
    w, x = _w((64, 128), 16), _w((21, 128), 17)
    y = Fp8NumericsStudy(order=order)(x, w)
    assert casts.count((64, 128)) == weight_casts
    w_q, w_scale, _ = sparse_fp8_weight(w, None, "1d", order)
    ref = q64(x) @ (w_q.double() / w_scale.double()).t()
    torch.testing.assert_close(y.double(), ref, rtol=2**-7, atol=1e-6)  # bf16 output rounding


def test_numerics_study_with_sste_runs_the_straight_through_gradient():
    """The study's forward weight is the FP8 2:4 weight whatever the mode; under sste it keeps
    S-STE's straight-through gradient, the same as ste's."""
    w, x = _w((64, 128), 16), _w((21, 128), 17)
    results = []
    for gradient in ("sste", "ste"):
        weight = w.clone().requires_grad_(True)
        y = Fp8NumericsStudy(gradient=gradient)(x, weight)
        y.square().sum().backward()
        results.append((y.detach(), weight.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_delayed_scaling_uses_past_amaxes():
    scaler = _delayed(3, "max").own_scaler(E4M3)
    s1 = scaler.scale(torch.tensor([2.0]))  # first step: its own amax
    s2 = scaler.scale(torch.tensor([8.0]))  # uses history max (2), not 8
    s3 = scaler.scale(torch.tensor([1.0]))  # history max (8)
    assert [s.item() for s in (s1, s2, s3)] == [E4M3_MAX / 2, E4M3_MAX / 2, E4M3_MAX / 8]
    recent = _delayed(4, "most_recent").own_scaler(E4M3)
    recent.scale(torch.tensor([8.0]))
    recent.scale(torch.tensor([4.0]))
    assert recent.scale(torch.tensor([1.0])).item() == E4M3_MAX / 4
    # `scale` and `quantize` keep one history: the scale quantize uses next is the same
    twin = _delayed(3, "max").own_scaler(E4M3)
    for a in (2.0, 8.0):
        twin(torch.tensor([a]))
    assert twin.scale(torch.tensor([1.0])).item() == s3.item()


def test_numerics_study_scaling_from_a_te_like_recipe():
    DelayedScaling = type("DelayedScaling", (), {})
    te_delayed = DelayedScaling()
    te_delayed.margin, te_delayed.amax_history_len = 1, 16
    te_delayed.amax_compute_algo = "most_recent"
    study = Fp8NumericsStudy(Fp8Recipe.from_te(te_delayed))
    for scaler in (study.x_scaler, study.w_scaler):  # one history per operand
        assert isinstance(scaler, DelayedScaler)
        assert (scaler.margin, scaler.history_len, scaler.algo) == (1, 16, "most_recent")
    assert study.x_scaler is not study.w_scaler
    current = Fp8NumericsStudy(Fp8Recipe.from_te(type("Float8CurrentScaling", (), {})()))
    assert isinstance(current.w_scaler, CurrentScaler)
    assert isinstance(Fp8NumericsStudy().x_scaler, CurrentScaler)  # default: current scaling
    with pytest.raises(ValueError, match="FP8 order"):
        Fp8NumericsStudy(order="both")


@pytest.mark.gpu
def test_cusparselt_fp8_matches_emulation():
    if gemm_ops.fp8_cusparselt_reason(torch.device("cuda")) is not None:
        pytest.skip(gemm_ops.fp8_cusparselt_reason(torch.device("cuda")))
    x, w = _w((256, 512), 5).cuda(), _w((256, 512), 6).cuda()
    sx, sw = scale_from_amax(x.abs().max()), scale_from_amax(w.abs().max())
    x_q, w_q = quantize_with(x, sx), quantize_with(w * weight_mask(w), sw)
    x_si, w_si = sx.reciprocal(), sw.reciprocal()
    sparse = gemm_ops.sparse_fp8_mm(
        x_q, x_si, gemm_ops.compress(w_q), 256, w_si, use_cusparselt=True
    )
    dense = gemm_ops.dense_fp8_mm(x_q, x_si, w_q, w_si)
    torch.testing.assert_close(sparse.float(), dense.float(), rtol=1e-2, atol=1e-1)


def test_numerics_tool_on_a_checkpoint(tmp_path, capsys):
    import json

    from megasparse.tools.fp8_numerics import main, report

    state = {
        "model": {
            "decoder.layers.0.mlp.linear_fc1.weight": _w((64, 32), 7),
            "decoder.layers.0.mlp.linear_fc2.weight": _w((32, 64), 8) * 10,
            "embedding.word_embeddings.weight": _w((100, 32), 9),
            "decoder.layers.0.mlp.linear_fc1.bias": torch.zeros(64),
        }
    }
    rows = report(state)
    assert sorted(rows) == [
        "decoder.layers.0.mlp.linear_fc1.weight",
        "decoder.layers.0.mlp.linear_fc2.weight",
    ]
    fc1 = rows["decoder.layers.0.mlp.linear_fc1.weight"]
    assert 0.70 < fc1["kept"] < 0.78  # Gaussian 1d 2:4
    assert 0 < fc1["fp8_err"] < 0.05 and 0 < fc1["prune-then-quantize_err"] < 0.05
    assert fc1["prune-then-quantize_total"] > 5 * fc1["fp8_err"]  # dominated by pruning, not by FP8
    # scale invariance of per-tensor scaling: a 10x weight has the same relative error
    torch.testing.assert_close(
        rows["decoder.layers.0.mlp.linear_fc2.weight"]["fp8_err"],
        report({"w.weight": _w((32, 64), 8)})["w.weight"]["fp8_err"],
        rtol=1e-3,
        atol=1e-6,
    )
    path, out = tmp_path / "ckpt.pt", tmp_path / "numbers.json"
    torch.save(state, path)
    main(["--checkpoint", str(path), "--json", str(out)])
    assert "P>Q err" in capsys.readouterr().out
    assert json.loads(out.read_text()).keys() == rows.keys()


# --- the FP8 2:4 training path (megasparse.fp8.gemm, scaling, linear) ----------------------------


@pytest.mark.parametrize(
    "capability,version,ok,why",
    [
        ((9, 0), 602, True, None),
        ((8, 9), 602, False, "xfailIfSM89"),
        ((10, 0), 602, False, "sm8x/sm9x only"),
        ((8, 0), 602, False, "sm90"),
        ((9, 0), 601, False, "0.6.2"),
    ],
)
def test_fp8_cusparselt_capability(monkeypatch, capability, version, ok, why):
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cusparselt, "version", lambda: version)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    reason = gemm_ops.fp8_cusparselt_reason(torch.device("cuda", 0))
    assert (reason is None) == ok and gemm_ops.fp8_cusparselt_ok(torch.device("cuda", 0)) == ok
    assert ok or why in reason
    assert "CUDA" in gemm_ops.fp8_cusparselt_reason(torch.device("cpu"))


def _quantized_operands(tokens, out, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(tokens, k, generator=g), torch.randn(out, k, generator=g)
    w = w * weight_mask(w)
    sx, sw = scale_from_amax(x.abs().amax()), scale_from_amax(w.abs().amax())
    return quantize_with(x, sx), sx.reciprocal(), quantize_with(w, sw), sw.reciprocal()


def _fp32_gemm_error_bound(a_q, b_q, a_scale_inv, b_scale_inv):
    """The largest |error| of a float32 GEMM a_q @ b_q.t() times the two per-tensor scales, in any
    summation order: gamma_(k+2) * sum_k |a||b| * scales, gamma_n = n u / (1 - n u), u = 2^-24
    (the FP8 products are exact in fp32; the scales add at most two roundings per term; Higham,
    "Accuracy and Stability of Numerical Algorithms", section 3.1). Host-independent, so a test
    stays valid for any BLAS kernel, thread count or ISA."""
    n_u = (a_q.shape[1] + 2) * 2.0**-24
    scale = (a_scale_inv.double() * b_scale_inv.double()).abs()
    return n_u / (1 - n_u) * (a_q.double().abs() @ b_q.double().abs().t()) * scale


def _within_one_rounding(y, exact, fp32_bound):
    """y is an fp32 result within fp32_bound of exact, rounded once to y's dtype (nearest)."""
    u = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}[y.dtype]
    return ((y.double() - exact).abs() <= fp32_bound + u * (exact.abs() + fp32_bound)).all()


@pytest.mark.parametrize("tokens", [48, 21])  # 21: padded to 32 and unpadded
def test_emulated_sparse_fp8_mm_is_the_gpu_math(tokens):
    """The emulation = fp32 accumulation of the e4m3 products, times x_si * w_si, rounded once:
    checked against float64 of the same quantized operands (only bf16 output rounding remains)."""
    x_q, x_si, w_q, w_si = _quantized_operands(tokens, 64, 128)
    y = gemm_ops.sparse_fp8_mm(x_q, x_si, w_q, 64, w_si, torch.bfloat16, use_cusparselt=False)
    ref = (x_q.double() @ w_q.double().t()) * (x_si.double() * w_si.double())
    bound = _fp32_gemm_error_bound(x_q, w_q, x_si, w_si)
    assert y.shape == (tokens, 64) and y.dtype == torch.bfloat16
    assert _within_one_rounding(y, ref, bound)
    # only where the fp32 sum and the exact one straddle a bf16 rounding midpoint can they differ
    assert (y != ref.to(torch.bfloat16)).float().mean() < 0.05
    y32 = gemm_ops.sparse_fp8_mm(x_q, x_si, w_q, 64, w_si, torch.float32)
    assert _within_one_rounding(y32, ref, bound)  # fp32 accumulation


def test_alpha_vector_and_padding():
    a = gemm_ops.alpha_vector(torch.tensor(0.5), torch.tensor([0.25]), 7)
    assert a.shape == (7,) and a.dtype == torch.float32 and a.is_contiguous() and (a == 0.125).all()
    t = torch.ones(21, 4)
    p = gemm_ops.pad_rows(t)
    assert p.shape == (32, 4) and p[21:].abs().sum() == 0 and gemm_ops.pad_rows(p) is p


@pytest.mark.parametrize("tokens", [48, 21])  # 21: padded to 32, unpadded by the epilogue
@pytest.mark.parametrize("with_bias", [False, True])
def test_cusparselt_fp8_gemm_scales_outside_the_gemm(tokens, with_bias):
    """The cuSPARSELt path (the binding modelled on CPU, tests/references/cusparselt_cpu.py) passes no alpha:
    e4m3 with a column-major B and a bf16 result, the combination PyTorch runs; the scale and the
    bias are one epilogue pass, so the result is the float64 product of the quantized operands up
    to two bf16 roundings (the GEMM's, the epilogue's). No one-element alpha (.item()) anywhere."""
    from cusparselt_cpu import cusparselt_on_cpu
    from megasparse.tools.perf import fake_ops

    x_q, x_si, w_q, w_si = _quantized_operands(tokens, 64, 128, seed=5)
    bias = torch.randn(64, generator=torch.Generator().manual_seed(6)) if with_bias else None
    syncs = fake_ops.alpha_item_calls
    with cusparselt_on_cpu():
        y = gemm_ops.sparse_fp8_mm(
            x_q, x_si, gemm_ops.compress(w_q), 64, w_si, torch.bfloat16, True, bias
        )
    call = fake_ops.sparse_mm_calls[-1]
    assert (call["alpha"], call["out_dtype"], call["transpose_result"]) == (
        None,
        torch.bfloat16,
        False,
    )
    assert call["dense_layout"] == "column-major" and fake_ops.alpha_item_calls == syncs
    product = (x_q.double() @ w_q.double().t()) * (x_si.double() * w_si.double())
    ref = product + bias.double() if with_bias else product
    assert y.shape == (tokens, 64) and y.dtype == torch.bfloat16 and y.is_contiguous()
    u = 2.0**-8  # bf16 unit roundoff: the GEMM rounds the product, the epilogue the sum
    assert ((y.double() - ref).abs() <= u * ref.abs() + u * (1 + u) * product.abs() + 1e-6).all()
    # and not within one rounding of an fp32 result everywhere: the GEMM's own rounding is there
    assert ((y.double() - ref).abs() > u * ref.abs() / 2 + 1e-6).any()


@pytest.mark.parametrize("acc_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp8_epilogue_reads_the_scale_in_fp32(acc_dtype, with_bias):
    """The epilogue's elementwise op has fp32 as its common dtype, so no device loads the fp32
    scale rounded to the 16-bit acc's dtype (CUDA's TensorIterator casts every input to the common
    dtype; the CPU kernel happens to read a 0-dim scale in full, so only the dtype rule shows it).
    The result is the float64 scaled sum rounded once."""
    from torch._prims_common import ELEMENTWISE_TYPE_PROMOTION_KIND, elementwise_dtypes
    from torch.utils._python_dispatch import TorchDispatchMode

    g = torch.Generator().manual_seed(3)
    acc = (torch.randn(24, 32, generator=g) * 40).to(acc_dtype)
    scale = torch.tensor(1 + 2.0**-10 + 2.0**-13)  # not a 16-bit float: rounding would show
    bias = torch.randn(32, generator=g).to(acc_dtype) if with_bias else None
    common = []

    class CommonDtype(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mul, torch.ops.aten.addcmul):
                inputs = [a for a in args if isinstance(a, torch.Tensor)]
                kind = ELEMENTWISE_TYPE_PROMOTION_KIND.DEFAULT
                common.append(elementwise_dtypes(*inputs, type_promotion_kind=kind)[1])
            return func(*args, **(kwargs or {}))

    with CommonDtype():
        y = gemm_ops.scale_epilogue(acc, scale, bias, torch.bfloat16)
    assert common == [torch.float32]
    ref = acc.double() * scale.double() + (0 if bias is None else bias.double())
    u = 2.0**-8  # one bf16 rounding
    assert y.dtype == torch.bfloat16 and ((y.double() - ref).abs() <= u * ref.abs()).all()


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_cusparselt_fp8_vector_alpha_is_an_option(monkeypatch, how):
    """alpha_mode="vector" (or MEGASPARSE_FP8_ALPHA=vector): the scale as one float32 per weight
    row, bf16 straight out of the GEMM; the same float64 product up to bf16 rounding."""
    from cusparselt_cpu import cusparselt_on_cpu
    from megasparse.tools.perf import fake_ops

    x_q, x_si, w_q, w_si = _quantized_operands(21, 64, 128, seed=7)
    mode = "vector" if how == "argument" else None
    if how == "environment":
        monkeypatch.setenv("MEGASPARSE_FP8_ALPHA", "vector")
    with cusparselt_on_cpu():
        packed = gemm_ops.compress(w_q)
        y = gemm_ops.sparse_fp8_mm(
            x_q, x_si, packed, 64, w_si, use_cusparselt=True, alpha_mode=mode
        )
    call = fake_ops.sparse_mm_calls[-1]
    assert (call["alpha"], call["out_dtype"], call["transpose_result"]) == (
        ((64,), torch.float32),
        torch.bfloat16,
        True,
    )
    ref = (x_q.double() @ w_q.double().t()) * (x_si.double() * w_si.double())
    assert ((y.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-6).all()
    monkeypatch.setenv("MEGASPARSE_FP8_ALPHA", "scalar")
    with pytest.raises(ValueError, match="MEGASPARSE_FP8_ALPHA"):
        gemm_ops.sparse_fp8_mm(x_q, x_si, w_q, 64, w_si, use_cusparselt=True)


def test_recipe_from_te_like_objects():
    Fmt = type("Format", (), {})
    hybrid, e4m3 = Fmt(), Fmt()
    hybrid.name, e4m3.name = "HYBRID", "E4M3"
    DelayedScaling = type("DelayedScaling", (), {})
    d = DelayedScaling()
    d.fp8_format, d.margin, d.amax_history_len, d.amax_compute_algo = hybrid, 1, 16, "most_recent"
    d.override_linear_precision = SimpleNamespace(fprop=False, dgrad=False, wgrad=True)
    r = Fp8Recipe.from_te(d)
    got = (r.grad_dtype, r.margin, r.amax_history_len, r.amax_compute_algo, r.fp8_wgrad, r.delayed)
    assert got == (E5M2, 1, 16, "most_recent", False, True)
    assert isinstance(r.own_scaler(fp8_gemm_dtype := torch.float8_e4m3fn), DelayedScaler)
    c = type("Float8CurrentScaling", (), {})()
    c.fp8_format, c.fp8_quant_fwd_inp = e4m3, SimpleNamespace(power_2_scale=True)
    rc = Fp8Recipe.from_te(c)
    assert rc.grad_dtype == fp8_gemm_dtype and rc.pow2_scales
    assert isinstance(rc.own_scaler(E5M2), CurrentScaler)
    assert Fp8Recipe.from_te(type("MXFP8BlockScaling", (), {})()) is None


def test_scalers_follow_te_math_on_device():
    t = torch.tensor([[3.0, -6.0], [0.5, 1.0]])
    q, si = CurrentScaler(torch.float8_e4m3fn, margin=1)(t)
    assert si.item() == pytest.approx(6.0 * 2 / E4M3_MAX, rel=1e-6)
    assert q.dtype == torch.float8_e4m3fn
    q5, si5 = CurrentScaler(E5M2, pow2=True)(t)
    assert q5.dtype == E5M2 and torch.log2(si5).item().is_integer()  # power-of-2 scale
    delayed = DelayedScaler(history_len=2, algo="max")
    sis = [delayed(torch.tensor([a]))[1].item() * E4M3_MAX for a in (2.0, 8.0, 1.0, 1.0)]
    assert sis == pytest.approx([2.0, 2.0, 8.0, 8.0], rel=1e-6)  # the window holds 2 past amaxes
    assert isinstance(delayed.history, torch.Tensor)  # the history stays a (device) tensor
    te_q = SimpleNamespace(scale=torch.tensor([4.0]), amax=torch.tensor([1.5]))
    q, si = TeQuantizerScaler(te_q)(torch.tensor([[2.0, -3.0]]))
    assert si.item() == 0.25 and q.float().tolist() == [[8.0, -12.0]] and te_q.amax.item() == 3.0


def _fp8_layer_step(w, mask_kind):
    cfg = SparsityConfig(mask=mask_kind, gradient="ste")
    return SparseWeightState().step(w, cfg, BACKENDS["dense"])


@pytest.mark.parametrize("mask_kind", ["1d", "transposable"])
@pytest.mark.parametrize("grad_dtype", [E5M2, torch.float8_e4m3fn])  # HYBRID, E4M3 formats
def test_fp8_linear_against_float64_of_quantized_operands(mask_kind, grad_dtype):
    """Forward, input gradient and weight gradient equal float64 products of exactly the operands
    the op quantizes (scales from amaxes, W*M pruned first), up to bf16/fp32 output rounding."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(64, 128, generator=g).requires_grad_(True)
    x = torch.randn(3, 7, 128, generator=g).requires_grad_(True)  # 21 tokens: padded
    dy = torch.randn(3, 7, 64, generator=g).to(torch.bfloat16)
    step = _fp8_layer_step(w, mask_kind)
    plan = fp8_linear.default_plan(Fp8Recipe(grad_dtype=grad_dtype))
    y = fp8_linear.fp8_sparse_linear_step(x, w, None, step, plan)
    y.backward(dy)

    wm = w.detach() * step.mask()
    x2, dy2 = x.detach().reshape(-1, 128), dy.reshape(-1, 64).float()
    y_ref = q64(x2) @ q64(wm).t()
    dgrad_dtype = torch.float8_e4m3fn if mask_kind == "transposable" else grad_dtype
    dx_ref = q64(dy2, dgrad_dtype) @ q64(wm)
    dw_ref = q64(dy2, grad_dtype).t() @ q64(x2)
    two_roundings = 2**-7 + 2**-16  # the GEMM's bf16 result, then the epilogue's
    torch.testing.assert_close(y.double().reshape(-1, 64), y_ref, rtol=two_roundings, atol=1e-5)
    dx = x.grad.double().reshape(-1, 128)
    torch.testing.assert_close(dx, dx_ref, rtol=two_roundings, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), dw_ref, rtol=1e-5, atol=1e-4)  # fp32 output
    # and the whole op is close to the exact masked linear (FP8 error only)
    exact = x2.double() @ wm.double().t()
    assert ((y.double().reshape(-1, 64) - exact).norm() / exact.norm()) < 0.06


@pytest.mark.parametrize("mask_kind", ["1d", "transposable"])
def test_fp8_linear_on_cusparselt_against_float64_of_quantized_operands(mask_kind):
    """The FP8 2:4 op with cuSPARSELt's GEMMs (the binding modelled on CPU): the forward with a
    bias and, for transposable masks, the input gradient on (W*M)^T run with no alpha, and equal
    float64 products of exactly the operands the op quantizes, up to two bf16 roundings."""
    from cusparselt_cpu import cusparselt_on_cpu
    from megasparse.tools.perf import fake_ops

    g = torch.Generator().manual_seed(13)
    w = torch.randn(64, 128, generator=g).requires_grad_(True)
    b = torch.randn(64, generator=g).requires_grad_(True)
    x = torch.randn(3, 7, 128, generator=g).requires_grad_(True)  # 21 tokens: padded
    dy = torch.randn(3, 7, 64, generator=g).to(torch.bfloat16)
    step = _fp8_layer_step(w, mask_kind)
    plan = fp8_linear.default_plan(use_cusparselt=True)
    before, syncs = len(fake_ops.sparse_mm_calls), fake_ops.alpha_item_calls
    with cusparselt_on_cpu():
        y = fp8_linear.fp8_sparse_linear_step(x, w, b, step, plan)
        y.backward(dy)
    calls = fake_ops.sparse_mm_calls[before:]
    assert len(calls) == (2 if mask_kind == "transposable" else 1)
    assert all(c["alpha"] is None and c["out_dtype"] == torch.bfloat16 for c in calls)
    assert fake_ops.alpha_item_calls == syncs

    wm = w.detach() * step.mask()
    x2, dy2 = x.detach().reshape(-1, 128), dy.reshape(-1, 64).float()
    product = q64(x2) @ q64(wm).t()
    y_ref = product + b.detach().double()
    dgrad_dtype = torch.float8_e4m3fn if mask_kind == "transposable" else E5M2
    dx_ref = q64(dy2, dgrad_dtype) @ q64(wm)
    u = 2.0**-8  # bf16: the GEMM rounds the product, the epilogue rounds product + bias

    def within_two_roundings(got, ref, product):
        return ((got - ref).abs() <= u * ref.abs() + u * (1 + u) * product.abs() + 1e-5).all()

    assert within_two_roundings(y.double().reshape(-1, 64), y_ref, product)
    assert within_two_roundings(x.grad.double().reshape(-1, 128), dx_ref, dx_ref)
    torch.testing.assert_close(b.grad.double(), dy2.double().sum(0), rtol=2**-8, atol=1e-5)


def test_fp8_weight_built_once_per_step_and_gradient_modes(monkeypatch):
    builds = []
    original = fp8_linear.Fp8Weight.__init__
    monkeypatch.setattr(
        fp8_linear.Fp8Weight, "__init__", lambda self, *a: (builds.append(1), original(self, *a))[1]
    )
    w = torch.randn(32, 64, requires_grad=True)
    state, cfg = SparseWeightState(), SparsityConfig(gradient="masked")
    plan = fp8_linear.default_plan()  # the gradient mode comes with the step (cfg)
    for _ in range(3):  # three micro-batches: one FP8 weight
        step = state.step(w, cfg, BACKENDS["dense"])
        fp8_linear.fp8_sparse_linear_step(torch.randn(16, 64), w, None, step, plan).sum().backward()
    assert len(builds) == 1
    assert (w.grad[~step.mask()] == 0).all() and w.grad[step.mask()].abs().sum() > 0  # masked mode
    fp8_w = fp8_linear.fp8_weight(step, False)  # the cached one: no new build
    held = sum(t.numel() * t.element_size() for t in fp8_w.held_tensors())
    assert len(builds) == 1 and step.held_bytes()["fp8_weight"] == held
    with torch.no_grad():
        w.add_(1.0)  # an optimizer step changes the weight: a new FP8 weight
    step = state.step(w, cfg, BACKENDS["dense"])
    fp8_linear.fp8_sparse_linear_step(torch.randn(16, 64), w, None, step, plan)
    assert len(builds) == 2


def test_fp8_linear_main_grad_fusion():
    w = torch.randn(32, 64, requires_grad=True)
    w.main_grad = torch.zeros(32, 64)
    w.grad_added_to_main_grad = False
    plan = fp8_linear.default_plan(gradient_accumulation_fusion=True)
    step = _fp8_layer_step(w, "1d")
    x = torch.randn(16, 64)
    fp8_linear.fp8_sparse_linear_step(x, w, None, step, plan).sum().backward()
    assert w.grad_added_to_main_grad and w.main_grad.abs().sum() > 0
    ref = torch.ones(16, 32).double().t() @ x.double()
    assert ((w.main_grad.double() - ref).norm() / ref.norm()) < 0.06


def test_fp8_linear_writes_main_grad_where_the_weight_asks_for_it():
    """Megatron-FSDP marks parameters `overwrite_main_grad` (its buffer is not zeroed per step):
    the gradient replaces main_grad, it is not added to what was there."""
    torch.manual_seed(2)
    w = torch.randn(32, 64, requires_grad=True)
    x = torch.randn(16, 64)
    grads = []
    for overwrite in (False, True):
        w.main_grad = torch.full((32, 64), 7.0)
        w.overwrite_main_grad = overwrite
        plan = fp8_linear.default_plan(gradient_accumulation_fusion=True)
        fp8_linear.fp8_sparse_linear_step(
            x, w, None, _fp8_layer_step(w, "1d"), plan
        ).sum().backward()
        grads.append(w.main_grad.clone())
    torch.testing.assert_close(grads[0] - 7.0, grads[1])  # the same gradient, not added to 7
    ref = torch.ones(16, 32).double().t() @ x.double()
    assert ((grads[1].double() - ref).norm() / ref.norm()) < 0.06


@pytest.mark.gpu
@pytest.mark.parametrize("alpha", ["vector", "output"])
def test_cusparselt_fp8_linear_matches_emulation(monkeypatch, alpha):
    if gemm_ops.fp8_cusparselt_reason(torch.device("cuda")) is not None:
        pytest.skip(gemm_ops.fp8_cusparselt_reason(torch.device("cuda")))
    monkeypatch.setenv("MEGASPARSE_FP8_ALPHA", alpha)
    x_q, x_si, w_q, w_si = (t.cuda() for t in _quantized_operands(200, 256, 512, seed=3))
    y = gemm_ops.sparse_fp8_mm(x_q, x_si, gemm_ops.compress(w_q), 256, w_si, use_cusparselt=True)
    ref = gemm_ops.sparse_fp8_mm(x_q.cpu(), x_si.cpu(), w_q.cpu(), 256, w_si.cpu())
    # "output" rounds twice to bf16 (GEMM, epilogue), the emulation once; sums in another order
    torch.testing.assert_close(y.cpu().float(), ref.float(), rtol=2**-6, atol=1e-3)


@pytest.mark.parametrize("order", list(Fp8Order))
def test_numerics_tool_reports_the_training_paths_weight_error(order):
    """fp8_numerics' error of each order is the error of the e4m3 weight fp8_linear trains with."""
    from megasparse.tools.fp8_numerics import layer_report

    w = _w((64, 128), 12)
    cfg = SparsityConfig(gradient="ste", fp8="hybrid", fp8_order=order)
    state = SparseWeightState(mask_source=quantized_weight)  # as the FP8 layers build it
    step = state.step(w, cfg, BACKENDS["dense"])
    wq = fp8_linear.fp8_weight(step, use_cusparselt=False, order=order)
    pruned = (w * step.mask()).double()
    err = ((wq.forward.double() * wq.scale_inv.double() - pruned).norm() / pruned.norm()).item()
    assert layer_report(w)[f"{order}_err"] == pytest.approx(err, rel=1e-6)  # fp32 1/scale
    w_q, _, mask = sparse_fp8_weight(w, None, "1d", order)  # what the tool quantizes
    assert torch.equal(w_q.float(), wq.forward.float()) and torch.equal(mask, step.mask())


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_cpu_scaled_mm_is_torchs_scaled_mm(out_dtype, b_dtype):
    """The fast CPU emulation computes what PyTorch's own _scaled_mm computes (fp32 accumulation
    of exact e4m3/e5m2 products, one scale, one rounding): equal up to accumulation order.

    Both are checked against float64 of the same operands with the fp32 error bound of any
    summation order, not against each other: torch's CPU _scaled_mm scales the inputs before an
    fp32 GEMM whose order depends on the host (MKL's kernel for the ISA and thread count, oneDNN
    on AMX hosts), so the two fp32 sums can straddle a bf16 rounding midpoint and round one bf16
    ulp (up to 2^-7 relative) apart on one host and not on another."""
    g = torch.Generator().manual_seed(21)
    a = torch.randn(32, 64, generator=g)
    b = torch.randn(48, 64, generator=g)
    sa, sb = scale_from_amax(a.abs().amax()), scale_from_amax(b.abs().amax(), b_dtype)
    a_q, b_q = quantize_with(a, sa), quantize_with(b, sb, b_dtype)
    ours = gemm_ops.scaled_mm(a_q, b_q.t(), sa.reciprocal(), sb.reciprocal(), out_dtype)
    torchs = torch._scaled_mm(
        a_q, b_q.t(), scale_a=sa.reciprocal(), scale_b=sb.reciprocal(), out_dtype=out_dtype
    )
    assert ours.dtype == torchs.dtype == out_dtype
    exact = (a_q.double() @ b_q.double().t()) * (
        sa.reciprocal().double() * sb.reciprocal().double()
    )
    bound = _fp32_gemm_error_bound(a_q, b_q, sa.reciprocal(), sb.reciprocal())
    assert _within_one_rounding(ours, exact, bound) and _within_one_rounding(torchs, exact, bound)
