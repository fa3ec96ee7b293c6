"""masked_decay (Hu et al. ICML 2024) and S-STE (Hu et al. NeurIPS 2024) against float64 loops."""

import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from megasparse.core.gradients import (
    GRADIENT_RULES,
    MaskedDecayRule,
    SsteRule,
    masked_decay,
    soft_threshold24,
    sste_scale,
    sste_weight,
)
from megasparse.core.linear_op import weight_mask


def _loop_soft_threshold(w):
    """Per group of 4: t = 3rd largest |w|; out = sign(w) * max(|w| - t, 0). Python floats."""
    out = torch.zeros_like(w, dtype=torch.float64)
    for r in range(w.shape[0]):
        for g in range(0, w.shape[1], 4):
            vals = [float(v) for v in w[r, g : g + 4]]
            t = sorted(abs(v) for v in vals)[1]
            for j, v in enumerate(vals):
                mag = max(abs(v) - t, 0.0)
                out[r, g + j] = mag if v > 0 else -mag
    return out


def _weight():
    torch.manual_seed(0)
    w = torch.randn(8, 16, dtype=torch.float64)
    w[0, :4] = torch.tensor([1.0, -1.0, 0.5, 0.5])  # ties between 1st/2nd and 3rd/4th
    w[1, :4] = torch.tensor([2.0, 0.5, -0.5, 0.1])  # 2nd == 3rd largest: only the largest stays
    w[2, :4] = 0.0
    return w


def test_masked_decay_matches_loop_reference():
    w = _weight()
    mask = weight_mask(w)
    grad = torch.randn_like(w)
    got = masked_decay(w, mask, grad, decay=2e-4)
    for r in range(w.shape[0]):
        for c in range(w.shape[1]):
            ref = float(grad[r, c]) + (0.0 if bool(mask[r, c]) else 2e-4 * float(w[r, c]))
            assert float(got[r, c]) == pytest.approx(ref, rel=0, abs=1e-15)
    assert isinstance(GRADIENT_RULES["masked_decay"], MaskedDecayRule)


def test_masked_decay_once_per_step_is_independent_of_micro_batches():
    """The term is added to the accumulated gradient once: k micro-batches give the same term."""
    w = _weight()
    mask = weight_mask(w)
    parts = [torch.randn_like(w) for _ in range(4)]
    once = masked_decay(w, mask, sum(parts), decay=1e-3) - sum(parts)
    assert torch.allclose(once, 1e-3 * (~mask) * w, atol=1e-15)


def test_masked_decay_keeps_grad_dtype():
    w = torch.randn(4, 8)
    g = torch.randn(4, 8, dtype=torch.bfloat16)
    assert masked_decay(w, weight_mask(w), g).dtype == torch.bfloat16


def test_soft_threshold_matches_loop_reference_and_is_2_4():
    w = _weight()
    s = soft_threshold24(w)
    assert torch.equal(s, _loop_soft_threshold(w))
    assert ((s != 0).reshape(8, 4, 4).sum(-1) <= 2).all()
    assert (s[weight_mask(w).logical_not()] == 0).all()  # support inside the hard 2:4 mask
    assert s[1, :4].tolist() == [1.5, 0.0, 0.0, 0.0]


def test_soft_threshold_is_continuous_where_the_hard_mask_jumps():
    """S-STE's point: S is 2-Lipschitz (in max norm); the hard 2:4 pruning is discontinuous."""
    w = torch.tensor([[1.0, 0.3, 0.3 + 1e-7, -0.05]], dtype=torch.float64)
    w2 = torch.tensor([[1.0, 0.3 + 1e-7, 0.3, -0.05]], dtype=torch.float64)  # 2nd/3rd swap
    assert (soft_threshold24(w) - soft_threshold24(w2)).abs().max() <= 2e-7
    hard = (w * weight_mask(w) - w2 * weight_mask(w2)).abs().max()
    assert hard > 0.29
    torch.manual_seed(1)
    x = torch.randn(64, 32, dtype=torch.float64)
    d = 1e-3 * torch.randn_like(x)
    assert (soft_threshold24(x + d) - soft_threshold24(x)).abs().max() <= 2 * d.abs().max() + 1e-15


def test_sste_scale_is_the_least_squares_rescale():
    w = _weight()
    beta = sste_scale(w)
    s = _loop_soft_threshold(w)
    num = sum(float(a) * float(b) for a, b in zip(w.flatten(), s.flatten()))
    den = sum(float(b) * float(b) for b in s.flatten())
    assert float(beta) == pytest.approx(num / den, rel=1e-6)  # float32 accumulation
    err = lambda b: float(((w - b * s) ** 2).sum())  # noqa: E731
    assert err(float(beta)) <= min(err(float(beta) * 1.01), err(float(beta) * 0.99))
    assert float(beta) > 1.0  # soft thresholding shrinks: the rescale enlarges


def test_sste_weight_and_straight_through_gradient():
    w = _weight().float()
    beta = sste_scale(w)
    assert torch.allclose(sste_weight(w, beta), float(beta) * _loop_soft_threshold(w).float())
    grad = torch.randn_like(w)
    rule = GRADIENT_RULES["sste"]
    step = SimpleNamespace(weight=w, pruned=True, mask=lambda: weight_mask(w), sste_beta=beta)
    assert isinstance(rule, SsteRule) and not rule.per_step_term
    assert rule.dense_gradient(grad, w, step) is grad  # STE: the per-step term is zero
    assert torch.equal(rule.forward_weight(step), sste_weight(w, beta))


def _tp_scale_worker(rank, port, full, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        shard = full.chunk(2, dim=0)[rank]  # column-parallel: rows split, groups along `in` intact
        beta = sste_scale(shard, group=dist.group.WORLD)
        if rank == 0:
            torch.save(beta, out)
    finally:
        dist.destroy_process_group()


def test_sste_scale_over_tp_shards_equals_the_full_tensor(tmp_path):
    from megasparse.testing import free_port

    full = torch.randn(8, 32)
    out = str(tmp_path / "beta.pt")
    torch.multiprocessing.spawn(
        _tp_scale_worker, args=(free_port(), full, out), nprocs=2, join=True
    )
    assert torch.allclose(torch.load(out), sste_scale(full), rtol=1e-6)
