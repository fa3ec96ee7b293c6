"""FP8 (e4m3) 2:4 GEMM: CPU emulation with torch float8 and torch._scaled_mm against float64 references."""

from types import SimpleNamespace

import pytest
import torch

from megasparse.fp8 import (
    E4M3_MAX,
    AmaxTracker,
    Fp8Scaling,
    Fp8SparseLinear,
    fp8_gemm,
    quantize,
    scale_for,
    sparse_fp8_weight,
)
from megasparse.ops import weight_mask


def _w(shape=(64, 128), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_scale_and_saturating_quantize():
    assert scale_for(torch.tensor(0.0)).item() == 1.0
    assert scale_for(torch.tensor(2.0), margin=1).item() == E4M3_MAX / 2 / 2
    q = quantize(torch.tensor([1e6, -1e6, 0.5]), torch.tensor(1.0))
    assert q.float().tolist() == [E4M3_MAX, -E4M3_MAX, 0.5]


@pytest.mark.parametrize("order", ["prune-then-quantize", "quantize-then-prune"])
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
    assert m_qp[0, :4].tolist() == [False, True, True, False]  # tie at the quantized value: lower index
    assert m_qp[0, 4:].tolist() == m_pq[0, 4:].tolist()


def test_gemm_emulation_is_the_scaled_fp32_product():
    x, w = _w((48, 128), 1), _w((64, 128), 2)
    sx, sw = scale_for(x.abs().max()), scale_for(w.abs().max())
    x_q, w_q = quantize(x, sx), quantize(w * weight_mask(w), sw)
    y = fp8_gemm(x_q, sx, w_q, sw)
    assert y.dtype == torch.bfloat16
    ref = (x_q.double() / sx.double()) @ (w_q.double() / sw.double()).t()
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2)  # bf16 output rounding


@pytest.mark.parametrize("order", ["prune-then-quantize", "quantize-then-prune"])
def test_fp8_sparse_linear_against_float64_reference(order):
    x = _w((4, 12, 128), 3).requires_grad_(True)
    w = _w((64, 128), 4).requires_grad_(True)
    layer = Fp8SparseLinear(mask_kind="1d", order=order)
    y = layer(x, w)
    mask = weight_mask(w) if order == "prune-then-quantize" else sparse_fp8_weight(w, None, "1d", order)[2]
    ref = x.detach().double() @ (w.detach().double() * mask).t()
    rel = (y.double() - ref).norm() / ref.norm()
    assert rel < 0.05  # FP8 tolerance (e4m3 operands, fp32 accumulation)
    dy = torch.randn_like(ref)
    y.backward(dy.to(y.dtype))
    torch.testing.assert_close(w.grad.double(), dy.reshape(-1, 64).t() @ x.detach().double().reshape(-1, 128),
                               rtol=2e-2, atol=2e-1)  # ste weight gradient (dy rounded to bf16)
    dx_ref = dy @ (w.detach().double() * mask)
    assert ((x.grad.double() - dx_ref).norm() / dx_ref.norm()) < 0.05


def test_delayed_scaling_uses_past_amaxes():
    tracker = AmaxTracker(Fp8Scaling(amax_history_len=3, amax_compute_algo="max"))
    s1 = tracker.scale(torch.tensor([2.0]))  # first step: its own amax
    s2 = tracker.scale(torch.tensor([8.0]))  # uses history max (2), not 8
    s3 = tracker.scale(torch.tensor([1.0]))  # history max (8)
    assert [s.item() for s in (s1, s2, s3)] == [E4M3_MAX / 2, E4M3_MAX / 2, E4M3_MAX / 8]
    recent = AmaxTracker(Fp8Scaling(amax_history_len=4, amax_compute_algo="most_recent"))
    recent.scale(torch.tensor([8.0]))
    recent.scale(torch.tensor([4.0]))
    assert recent.scale(torch.tensor([1.0])).item() == E4M3_MAX / 4


def test_scaling_from_a_te_like_recipe():
    delayed = Fp8Scaling.from_recipe(SimpleNamespace(margin=1, amax_history_len=16, amax_compute_algo="most_recent"))
    assert (delayed.margin, delayed.amax_history_len, delayed.amax_compute_algo) == (1, 16, "most_recent")
    current = Fp8Scaling.from_recipe(SimpleNamespace(fp8_format="HYBRID"))
    assert current.amax_history_len == 1
    with pytest.raises(ValueError, match="FP8 order"):
        Fp8SparseLinear(order="both")


@pytest.mark.gpu
def test_cusparselt_fp8_matches_emulation():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs sm89+")
    x, w = _w((256, 512), 5).cuda(), _w((256, 512), 6).cuda()
    sx, sw = scale_for(x.abs().max()), scale_for(w.abs().max())
    x_q, w_q = quantize(x, sx), quantize(w * weight_mask(w), sw)
    sparse = fp8_gemm(x_q, sx, w_q, sw, sparse=True)
    dense = fp8_gemm(x_q, sx, w_q, sw, sparse=False)
    torch.testing.assert_close(sparse.float(), dense.float(), rtol=1e-2, atol=1e-1)


def test_numerics_tool_on_a_checkpoint(tmp_path, capsys):
    import json

    from megasparse.tools.fp8_numerics import main, report

    state = {"model": {"decoder.layers.0.mlp.linear_fc1.weight": _w((64, 32), 7),
                       "decoder.layers.0.mlp.linear_fc2.weight": _w((32, 64), 8) * 10,
                       "embedding.word_embeddings.weight": _w((100, 32), 9),
                       "decoder.layers.0.mlp.linear_fc1.bias": torch.zeros(64)}}
    rows = report(state)
    assert sorted(rows) == ["decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.0.mlp.linear_fc2.weight"]
    fc1 = rows["decoder.layers.0.mlp.linear_fc1.weight"]
    assert 0.70 < fc1["kept"] < 0.78  # Gaussian 1d 2:4
    assert 0 < fc1["fp8_err"] < 0.05 and 0 < fc1["prune-then-quantize_err"] < 0.05
    assert fc1["prune-then-quantize_total"] > 5 * fc1["fp8_err"]  # dominated by pruning, not by FP8
    # scale invariance of per-tensor scaling: a 10x weight has the same relative error
    torch.testing.assert_close(rows["decoder.layers.0.mlp.linear_fc2.weight"]["fp8_err"],
                               report({"w.weight": _w((32, 64), 8)})["w.weight"]["fp8_err"], rtol=1e-3, atol=1e-6)
    path, out = tmp_path / "ckpt.pt", tmp_path / "numbers.json"
    torch.save(state, path)
    main(["--checkpoint", str(path), "--json", str(out)])
    assert "P>Q err" in capsys.readouterr().out
    assert json.loads(out.read_text()).keys() == rows.keys()
