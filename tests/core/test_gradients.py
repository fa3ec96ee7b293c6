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
from megasparse.core.masks import weight_mask
from reference import soft_threshold_reference, sste_beta_reference


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
    assert torch.equal(s, soft_threshold_reference(w))
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
    s = soft_threshold_reference(w)
    num = sum(float(a) * float(b) for a, b in zip(w.flatten(), s.flatten()))
    den = sum(float(b) * float(b) for b in s.flatten())
    assert float(beta) == pytest.approx(num / den, rel=1e-6)  # float32 accumulation
    err = lambda b: float(((w - b * s) ** 2).sum())  # noqa: E731
    assert err(float(beta)) <= min(err(float(beta) * 1.01), err(float(beta) * 0.99))
    assert float(beta) > 1.0  # soft thresholding shrinks: the rescale enlarges


def test_sste_weight_and_straight_through_gradient():
    w = _weight().float()
    beta = sste_scale(w)
    assert torch.allclose(sste_weight(w, beta), float(beta) * soft_threshold_reference(w).float())
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


# --- the rule objects: every registry entry against its float64 reference -------------------
# A new gradient mode is tested here once it has a line in REFERENCES.

# distinct factors (a rule must read its own), exact in float32: srste forms decay * (~M) first
RULE_CONFIG = dict(srste_decay=2.0**-5, masked_decay_factor=2.0**-7, backend="dense")


def _masked_forward(w, mask):
    return w * mask


def _sste_forward(w, mask):
    return sste_beta_reference(w) * soft_threshold_reference(w)


REFERENCES = {  # mode: (forward weight, the step's gradient from the summed micro-batch gradients)
    "ste": (_masked_forward, lambda w, mask, g, cfg: g),
    "masked": (_masked_forward, lambda w, mask, g, cfg: g * mask),
    "srste": (_masked_forward, lambda w, mask, g, cfg: g + cfg.srste_decay * (~mask) * w),
    "masked_decay": (
        _masked_forward,
        lambda w, mask, g, cfg: g + cfg.masked_decay_factor * (~mask) * w,
    ),
    "sste": (_sste_forward, lambda w, mask, g, cfg: g),
}
MODES = list(GRADIENT_RULES)


def _rule_setup(mode, seed=0):
    from megasparse import SparsityConfig
    from megasparse.core.weight_state import SparseWeightState

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 16, dtype=torch.float64, generator=g)
    return w, SparsityConfig(gradient=mode, **RULE_CONFIG), SparseWeightState(), g


def test_the_registry_holds_the_configs_gradient_modes():
    from megasparse.config import GRADIENT_MODES, WGRAD_SPARSITY
    from megasparse.core.gradients import WGRAD_RULES

    assert tuple(GRADIENT_RULES) == GRADIENT_MODES
    assert tuple(WGRAD_RULES) == WGRAD_SPARSITY
    assert all(rule.name == mode for mode, rule in GRADIENT_RULES.items())
    assert set(REFERENCES) == set(GRADIENT_RULES), "give each gradient mode a float64 reference"


@pytest.mark.parametrize("mode", MODES)
def test_rule_forward_weight_matches_float64_reference(mode):
    from megasparse.core.backends import BACKENDS

    w, cfg, state, _ = _rule_setup(mode)
    step = state.step(w, cfg, BACKENDS["dense"])
    assert step.rule is GRADIENT_RULES[mode]
    forward, _ = REFERENCES[mode]
    torch.testing.assert_close(step.dense(), forward(w, weight_mask(w)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ["dense_gradient", "main_grad_term"])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("mode", MODES)
def test_rule_gradient_and_per_step_term_once_per_optimizer_step(mode, k, path):
    """k micro-batches per step, the state rebuilt mid-step: the step's gradient is the reference,
    with a per-step term added exactly once in every step."""
    from megasparse.core.backends import BACKENDS

    w, cfg, state, g = _rule_setup(mode, seed=1)
    _, reference = REFERENCES[mode]
    for iteration in range(3):
        state.set_iteration(iteration)  # a new optimizer step
        with torch.no_grad():
            w.add_(0.25 * torch.randn(w.shape, dtype=w.dtype, generator=g))
        w.main_grad = torch.zeros_like(w)
        total, parts = torch.zeros_like(w), []
        for micro_batch in range(k):
            step = state.step(w, cfg, BACKENDS["dense"])
            part = torch.randn(w.shape, dtype=w.dtype, generator=g)
            parts.append(part)
            if path == "dense_gradient":
                total += step.rule.dense_gradient(part, w, step)
            else:  # main_grad holds the accumulated straight-through gradient
                w.main_grad += part
                step.rule.main_grad_term(w, step)
                total = w.main_grad
            state.invalidate()  # operands rebuilt within the step: no second per-step term
        expected = reference(w, weight_mask(w), sum(parts), cfg)
        torch.testing.assert_close(total, expected, rtol=1e-12, atol=1e-12)
    assert GRADIENT_RULES[mode].per_step_term == (mode in ("srste", "masked_decay"))


@pytest.mark.parametrize("path", ["op", "op_main_grad", "masked_weight", "sparse_linear"])
@pytest.mark.parametrize("mode", MODES)
def test_every_rule_through_the_ops_matches_float64_reference(mode, path):
    """The linear op (with and without main_grad fusion), masked_weight and the one-call
    sparse_linear, each over a step of micro-batches, against the rule's reference."""
    from megasparse.core.backends import BACKENDS
    from megasparse.core.linear_op import (
        LinearPlan,
        masked_weight,
        sparse_linear,
        sparse_linear_step,
    )

    w, cfg, state, g = _rule_setup(mode, seed=2)
    forward, reference = REFERENCES[mode]
    mask = weight_mask(w)
    wr = w.clone().requires_grad_(True)
    fusion = path == "op_main_grad"
    if fusion:
        wr.main_grad, wr.grad_added_to_main_grad = torch.zeros_like(w), False
    plan = LinearPlan(BACKENDS["dense"], gradient_accumulation_fusion=fusion)
    k = 1 if path == "sparse_linear" else 3  # sparse_linear: a step per call
    xs = [torch.randn(5, 16, dtype=w.dtype, generator=g) for _ in range(k)]
    dys = [torch.randn(5, 8, dtype=w.dtype, generator=g) for _ in range(k)]
    for x, dy in zip(xs, dys):
        if path == "sparse_linear":
            y = sparse_linear(x, wr, None, mask, plan, cfg)
        elif path == "masked_weight":
            y = x @ masked_weight(state.step(wr, cfg, BACKENDS["dense"])).t()
        else:
            y = sparse_linear_step(x, wr, None, state.step(wr, cfg, BACKENDS["dense"]), plan)
        torch.testing.assert_close(y, x @ forward(w, mask).t(), rtol=1e-12, atol=1e-12)
        y.backward(dy)
    got = wr.main_grad if fusion else wr.grad
    expected = reference(w, mask, sum(dy.t() @ x for x, dy in zip(xs, dys)), cfg)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_a_mode_switch_within_a_step_takes_effect_without_a_second_per_step_term():
    from megasparse.core.backends import BACKENDS

    w, cfg, state, g = _rule_setup("srste", seed=3)
    step = state.step(w, cfg, BACKENDS["dense"])
    first = step.rule.dense_gradient(torch.zeros_like(w), w, step)
    mask = weight_mask(w)
    torch.testing.assert_close(first, cfg.srste_decay * (~mask) * w, rtol=0, atol=0)
    cfg.gradient = "masked_decay"
    switched = state.step(w, cfg, BACKENDS["dense"])
    assert switched.rule is GRADIENT_RULES["masked_decay"] and switched.mask_bits is step.mask_bits
    assert torch.equal(
        switched.rule.dense_gradient(torch.ones_like(w), w, switched), torch.ones_like(w)
    )
    state.set_iteration(1)  # the next step: the new mode's term with its own factor
    step = state.step(w, cfg, BACKENDS["dense"])
    got = step.rule.dense_gradient(torch.zeros_like(w), w, step)
    torch.testing.assert_close(got, cfg.masked_decay_factor * (~mask) * w, rtol=0, atol=0)


def test_the_step_selects_the_mvue_weight_gradient_once_while_pruned():
    from megasparse.core.backends import BACKENDS
    from megasparse.core.gradients import WGRAD_RULES

    w, cfg, state, _ = _rule_setup("ste")
    assert state.step(w, cfg, BACKENDS["dense"]).wgrad is WGRAD_RULES[None]
    cfg.wgrad_sparsity = "mvue"  # takes effect at the next use
    assert state.step(w, cfg, BACKENDS["dense"]).wgrad is WGRAD_RULES["mvue"]
    cfg.enabled = False  # a dense phase: the plain weight gradient
    assert state.step(w, cfg, BACKENDS["dense"]).wgrad is WGRAD_RULES[None]


def test_autograd_contexts_carry_their_saved_state_as_dataclasses():
    from megasparse.core.backends import BACKENDS
    from megasparse.core import linear_op

    w, cfg, state, g = _rule_setup("masked")
    w.requires_grad_(True)
    step = state.step(w, cfg, BACKENDS["dense"])
    y = linear_op.sparse_linear_step(
        torch.randn(3, 16, dtype=w.dtype), w, None, step, linear_op.LinearPlan()
    )
    assert isinstance(y.grad_fn.saved, linear_op._SavedForBackward)
    assert y.grad_fn.saved.step is step and not y.grad_fn.saved.has_bias
    masked = linear_op.masked_weight(step)
    assert isinstance(masked.grad_fn.saved, linear_op._MaskedSaved)
    assert masked.grad_fn.saved.steps == [step]
