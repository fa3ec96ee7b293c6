"""Training-quality options on the sparse Megatron linears, against float64 references:
masked_decay once per step (Hu et al. ICML 2024), S-STE's fixed beta and soft-thresholded forward
(Hu et al. NeurIPS 2024; TP=2 too), the MVUE weight gradient (Chmiel et al. ICLR 2023: unbiased,
the paper's variance), the mask flip rate and its Megatron-LM logging, flags and validation."""

import argparse
import sys
import types

import pytest
import torch
import torch.distributed as dist

from megasparse import SparsityConfig
from megasparse.megatron.args import add_args, config_from_args
from megasparse.core.masks import weight_mask
from megatron_helpers import make_column, make_config, make_row
from reference import soft_threshold_reference, sste_beta_reference

MICRO_BATCHES, STEPS = 3, 4


def _micro_batches(g, in_size, out_size):
    def draw(size):
        return torch.randn(3, 2, size, dtype=torch.float64, generator=g)

    xs = [draw(in_size) for _ in range(MICRO_BATCHES)]
    dys = [draw(out_size) for _ in range(MICRO_BATCHES)]
    return xs, dys


def _dense_grad(xs, dys):
    return sum(
        dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1]) for x, dy in zip(xs, dys)
    )


# --- flags and validation --------------------------------------------------------------------


def test_flags_map_to_config_and_default_off():
    parser = add_args(argparse.ArgumentParser())
    default = config_from_args(parser.parse_args(["--sparsity-weights", "2:4"]))
    assert (default.gradient, default.wgrad_sparsity, default.track_flip_rate) == (
        "ste",
        None,
        False,
    )
    args = parser.parse_args(
        [
            "--sparsity-weights",
            "2:4",
            "--sparsity-grad",
            "masked_decay",
            "--sparsity-masked-decay-factor",
            "1e-3",
            "--sparsity-wgrad",
            "mvue",
            "--sparsity-wgrad-seed",
            "7",
            "--sparsity-flip-rate",
        ]
    )
    c = config_from_args(args)
    assert (
        c.gradient,
        c.masked_decay_factor,
        c.wgrad_sparsity,
        c.wgrad_seed,
        c.track_flip_rate,
    ) == ("masked_decay", 1e-3, "mvue", 7, True)
    sste = parser.parse_args(["--sparsity-weights", "2:4", "--sparsity-grad", "sste"])
    assert config_from_args(sste).gradient == "sste"


def test_invalid_quality_options_name_the_fix():
    with pytest.raises(ValueError, match="mask='1d'"):
        SparsityConfig(gradient="sste", mask="transposable")
    with pytest.raises(ValueError, match="mask_refresh_interval=3. Use 1"):
        SparsityConfig(gradient="sste", mask_refresh_interval=3)
    with pytest.raises(ValueError, match="wgrad_sparsity must be one of"):
        SparsityConfig(wgrad_sparsity="2:4")
    with pytest.raises(ValueError, match="masked_decay_factor must be a finite number >= 0"):
        SparsityConfig(masked_decay_factor=-1.0)
    c = SparsityConfig(mask_refresh_interval=2)
    with pytest.raises(ValueError, match="cannot hold a mask"):
        c.gradient = "sste"  # later changes are checked too
    with pytest.raises(ValueError, match="track_flip_rate must be True or False"):
        SparsityConfig(track_flip_rate=1)


# --- masked_decay: once per step -------------------------------------------------------------


@pytest.mark.usefixtures("megatron_tp1")
@pytest.mark.parametrize("fusion", [False, True])
def test_masked_decay_is_added_once_per_step_with_k_micro_batches(fusion):
    decay = 0.03
    sparsity = SparsityConfig(
        gradient="masked_decay", masked_decay_factor=decay, srste_decay=0.5, backend="dense"
    )
    cfg = make_config(gradient_accumulation_fusion=fusion)
    layer = make_column(cfg, 16, 32, sparsity)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        weight = layer.weight.detach().clone()
        mask = weight_mask(weight)
        opt.zero_grad()
        if fusion:
            layer.weight.main_grad = torch.zeros_like(layer.weight)
        xs, dys = _micro_batches(g, 16, 32)
        for x, dy in zip(xs, dys):
            layer(x)[0].backward(dy)
        grad = layer.weight.main_grad if fusion else layer.weight.grad
        expected = _dense_grad(xs, dys) + decay * (~mask).double() * weight  # not srste_decay
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12, msg=f"step {step}")
        if fusion:
            layer.weight.grad = layer.weight.main_grad.clone()
        opt.step()


# --- S-STE -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("megatron_tp1")
def test_sste_forward_is_fixed_beta_times_soft_threshold_and_gradient_is_straight_through():
    layer = make_column(make_config(), 16, 32, SparsityConfig(gradient="sste", backend="dense"))
    initial = layer.weight.detach().clone()
    beta = sste_beta_reference(initial)  # from the weight of the first sparse forward, then fixed
    opt = torch.optim.SGD(layer.parameters(), lr=0.2)
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        weight = layer.weight.detach().clone()
        forward_weight = beta * soft_threshold_reference(weight)
        opt.zero_grad()
        xs, dys = _micro_batches(g, 16, 32)
        for x, dy in zip(xs, dys):
            xr = x.clone().requires_grad_(True)
            y, _ = layer(xr)
            torch.testing.assert_close(
                y, x @ forward_weight.t() + layer.bias, rtol=1e-12, atol=1e-12
            )
            y.backward(dy)
            torch.testing.assert_close(xr.grad, dy @ forward_weight, rtol=1e-12, atol=1e-12)
        # straight-through: the dense W gets dL/d(beta S(W)) unchanged (neither masked nor scaled)
        torch.testing.assert_close(layer.weight.grad, _dense_grad(xs, dys), rtol=1e-12, atol=1e-12)
        assert float(layer.weight_state.sste_beta) == pytest.approx(beta, rel=1e-12), step
        assert torch.equal(layer.sparsity_mask(), weight_mask(weight))  # the hard mask holds S(W)
        opt.step()
    assert not torch.equal(layer.weight.detach(), initial)


@pytest.mark.usefixtures("megatron_tp1")
def test_sste_beta_is_computed_at_the_first_sparse_forward_and_saved_in_extra_state():
    sparsity = SparsityConfig(gradient="sste", backend="dense", enabled=False)
    layer = make_column(make_config(), 16, 32, sparsity)
    x = torch.randn(4, 16, dtype=torch.float64)
    layer(x)
    assert layer.weight_state.sste_beta is None  # dense phase: not yet
    with torch.no_grad():
        layer.weight.mul_(1.5).add_(0.01)  # the "warm-up" changed the weight
    layer.sparsity.enabled = True
    layer(x)
    beta = sste_beta_reference(layer.weight.detach())
    assert float(layer.weight_state.sste_beta) == pytest.approx(beta, rel=1e-12)
    state = layer.get_extra_state()
    assert float(state["megasparse_sste_beta"]) == pytest.approx(beta, rel=1e-12)
    other = make_column(
        make_config(), 16, 32, SparsityConfig(gradient="sste", backend="dense"), seed=5
    )
    other.weight_state.restore_extra_state(state, other.weight)
    with torch.no_grad():
        other.weight.copy_(layer.weight)
    # beta restored, not recomputed
    torch.testing.assert_close(other(x)[0], layer(x)[0], rtol=0, atol=0)
    # without S-STE and held masks, the extra state stays exactly the parent's
    plain = make_column(make_config(), 16, 32, SparsityConfig(backend="dense"))
    plain(x)
    assert plain.get_extra_state() is None


@pytest.mark.usefixtures("megatron_tp1")
def test_sste_beta_round_trips_through_the_layer_state_dict():
    x = torch.randn(4, 16, dtype=torch.float64)
    layer = make_column(make_config(), 16, 32, SparsityConfig(gradient="sste", backend="dense"))
    layer(x)
    with torch.no_grad():
        layer.weight.mul_(3.0)  # trained on: the fixed beta no longer matches a fresh one
    other = make_column(
        make_config(), 16, 32, SparsityConfig(gradient="sste", backend="dense"), seed=5
    )
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other(x)[0], layer(x)[0], rtol=0, atol=0)


def _sste_tp2_worker():
    rank, tp = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(3)
    w_col = torch.randn(32, 16, dtype=torch.float64, generator=g)
    w_row = torch.randn(16, 32, dtype=torch.float64, generator=g)
    x = torch.randn(5, 16, dtype=torch.float64, generator=g)
    cfg = make_config(tp=tp)
    col = make_column(cfg, 16, 32, SparsityConfig(gradient="sste", backend="dense"), bias=False)
    row = make_row(cfg, 32, 16, SparsityConfig(gradient="sste", backend="dense"), bias=False)
    rows = slice(rank * 32 // tp, (rank + 1) * 32 // tp)
    with torch.no_grad():
        col.weight.copy_(w_col[rows])
        row.weight.copy_(w_row[:, rows])
    h, _ = col(x)
    y, _ = row(h)
    beta_col, beta_row = sste_beta_reference(w_col), sste_beta_reference(w_row)
    # one beta per full tensor (summed over the TP group): the same model as at TP=1
    assert float(col.weight_state.sste_beta) == pytest.approx(beta_col, rel=1e-12), rank
    assert float(row.weight_state.sste_beta) == pytest.approx(beta_row, rel=1e-12), rank
    h_ref = x @ (beta_col * soft_threshold_reference(w_col)).t()
    y_ref = h_ref[:, :] @ (beta_row * soft_threshold_reference(w_row)).t()
    torch.testing.assert_close(h, h_ref[:, rows], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)


def test_sste_beta_is_reduced_over_the_tp_group_tp2():
    from megasparse.testing import run_distributed

    run_distributed(_sste_tp2_worker, world_size=2, tensor_model_parallel_size=2)


# --- MVUE weight gradient --------------------------------------------------------------------


@pytest.mark.usefixtures("megatron_tp1")
def test_mvue_weight_gradient_is_unbiased_and_sparse_along_tokens():
    """Mean of N draws -> dY^T X; every |z| under 5 with the empirical standard error (fixed
    seed)."""
    draws = 2000
    layer = make_column(
        make_config(), 8, 8, SparsityConfig(wgrad_sparsity="mvue", backend="dense"), bias=False
    )
    g = torch.Generator().manual_seed(4)
    x = torch.randn(10, 8, dtype=torch.float64, generator=g)  # 10 tokens: padded to 12 inside
    dy = torch.randn(10, 8, dtype=torch.float64, generator=g)
    grads = []
    for _ in range(draws):  # one step, many backwards: the step's generator keeps drawing
        layer.weight.grad = None
        layer(x)[0].backward(dy)
        grads.append(layer.weight.grad.clone())
    grads = torch.stack(grads)
    expected = dy.t() @ x
    assert not torch.allclose(grads[0], expected)  # it is a sparse estimate, not the dense GEMM
    stderr = grads.std(0) / draws**0.5
    z = (grads.mean(0) - expected) / stderr
    assert z.abs().max() < 5, z.abs().max()
    # relative error of the mean shrinks like 1/sqrt(N): within 5% here (the stated tolerance)
    assert (grads.mean(0) - expected).norm() / expected.norm() < 0.05


@pytest.mark.usefixtures("megatron_tp1")
def test_mvue_weight_gradient_variance_matches_the_paper_formula():
    """With X = I (one token per input column), dW[:, t] is MVUE(dY)[t, :]: its variance per element
    is a_i^2 (1/p_i - 1) with the MVUE's keep probabilities p (Chmiel et al. 2023, Sec. 4)."""
    from megasparse.core.mvue import mvue24_probabilities, mvue24_variance

    draws = 4000
    layer = make_column(
        make_config(), 8, 4, SparsityConfig(wgrad_sparsity="mvue", backend="dense"), bias=False
    )
    layer.weight_state.index = 0  # the same draws whichever tests ran before (seeds use the index)
    g = torch.Generator().manual_seed(5)
    dy = torch.randn(8, 4, dtype=torch.float64, generator=g)
    dy[4:8, 0] = torch.tensor([3.0, 0.1, -0.2, 0.1], dtype=torch.float64)  # the 2 a_max > S case
    x = torch.eye(8, dtype=torch.float64)
    grads = []
    for _ in range(draws):
        layer.weight.grad = None
        layer(x)[0].backward(dy)
        grads.append(layer.weight.grad.clone())
    grads = torch.stack(grads)  # [draws, out=4, in=tokens=8]
    groups = dy.t().reshape(4, 2, 4)  # per output column, groups of 4 tokens
    var = mvue24_variance(groups).reshape(4, 8)
    assert var[0, 4] == 0  # the kept-always largest has no variance
    empirical = grads.var(0)
    # each element is a/p with probability p, else 0: the sample variance's standard error follows
    # from its 4th central moment, mu4 = a^4 ((1-p)^4 / p^3 + 1 - p); allow 5 of them
    p = mvue24_probabilities(groups).reshape(4, 8).clamp_min(1e-12)
    a4 = dy.t() ** 4
    mu4 = a4 * ((1 - p) ** 4 / p**3 + (1 - p))
    standard_error = ((mu4 - var**2).clamp_min(0) / draws).sqrt()
    mean_term = var / draws  # the sample mean's own error (dominant where mu4 = var^2, at p = 1/2)
    assert ((empirical - var).abs() <= 5 * (standard_error + mean_term) + 1e-12).all()
    assert (standard_error <= 0.25 * var + 1e-12).all()  # the check is tight where it matters


@pytest.mark.usefixtures("megatron_tp1")
def test_mvue_draws_are_reproducible_per_seed_rank_weight_and_step():
    def grads(seed, index):
        sparsity = SparsityConfig(wgrad_sparsity="mvue", wgrad_seed=seed, backend="dense")
        layer = make_column(make_config(), 8, 8, sparsity, bias=False)
        layer.weight_state.index = index
        opt = torch.optim.SGD(layer.parameters(), lr=0.0)
        out = []
        g = torch.Generator().manual_seed(6)
        x = torch.randn(8, 8, dtype=torch.float64, generator=g)
        dy = torch.randn(8, 8, dtype=torch.float64, generator=g)
        for _ in range(3):
            opt.zero_grad()
            layer(x)[0].backward(dy)
            out.append(layer.weight.grad.clone())
            opt.step()
        return out

    a, b, c = grads(1, 0), grads(1, 0), grads(2, 0)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], a[1])  # a new step draws anew
    assert not torch.equal(a[0], c[0])  # another seed draws otherwise


@pytest.mark.usefixtures("megatron_tp1")
def test_mvue_is_off_in_dense_phases_and_composes_with_masked():
    sparsity = SparsityConfig(wgrad_sparsity="mvue", gradient="masked", backend="dense")
    layer = make_column(make_config(), 8, 8, sparsity, bias=False)
    x, dy = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    layer(x)[0].backward(dy)
    mask = weight_mask(layer.weight.detach())
    assert torch.all(layer.weight.grad[~mask] == 0)
    layer.sparsity.enabled = False
    layer.weight.grad = None
    layer(x)[0].backward(dy)
    torch.testing.assert_close(layer.weight.grad, dy.t() @ x, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
def test_mvue_weight_grad_sparse_operand_path_on_gpu():
    """On a sparse backend the pruned dY^T is the compressed operand; same math as the dense
    GEMM."""
    from megasparse.core.backends import BACKENDS
    from megasparse.core.mvue import mvue_weight_grad

    for name in ("cusparselt", "cutlass"):
        backend = BACKENDS[name]
        dy = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16)
        sparse = mvue_weight_grad(dy, x, torch.Generator("cuda").manual_seed(0), backend)
        dense = mvue_weight_grad(dy, x, torch.Generator("cuda").manual_seed(0), None)
        torch.testing.assert_close(sparse, dense, rtol=2e-2, atol=2e-2)


# --- flip rate -------------------------------------------------------------------------------


@pytest.mark.usefixtures("megatron_tp1")
@pytest.mark.parametrize("interval", [1, 2])
def test_flip_rate_is_the_share_of_mask_entries_changed_since_the_last_mask(interval):
    layer = make_column(
        make_config(),
        16,
        32,
        SparsityConfig(track_flip_rate=True, backend="dense", mask_refresh_interval=interval),
    )
    opt = torch.optim.SGD(layer.parameters(), lr=0.3)
    g = torch.Generator().manual_seed(7)
    previous, expected = None, None
    for step in range(5):
        weight = layer.weight.detach().clone()
        if step % interval == 0:
            mask = weight_mask(weight)
            if previous is not None:
                expected = (mask != previous).double().mean().item()
            previous = mask
        x = torch.randn(6, 16, dtype=torch.float64, generator=g)
        opt.zero_grad()
        layer(x)[0].square().sum().backward()
        stats = layer.sparsity_stats()
        if expected is None:
            assert stats["flip_rate"] is None
        else:
            assert isinstance(stats["flip_rate"], torch.Tensor) and stats["flip_rate"].dim() == 0
            assert stats["flip_rate"].item() == pytest.approx(expected, abs=1e-7), step
            assert stats["flip_step"] == step - step % interval
        kept = (weight.abs() * previous).sum() / weight.abs().sum()
        torch.testing.assert_close(stats["kept_weight_l1"], kept, rtol=1e-12, atol=1e-12)
        opt.step()
    assert expected is not None and expected > 0  # lr 0.3 flips some entries
    assert "flip_rate" not in make_column(make_config(), 16, 32, SparsityConfig()).sparsity_stats()


@pytest.mark.usefixtures("megatron_tp1")
def test_megatron_lm_hook_logs_flip_rate_to_tensorboard_and_wandb(monkeypatch):
    from megasparse import megatron_lm

    class Writer:
        def __init__(self):
            self.calls = []

        def add_scalar(self, name, value, step):
            self.calls.append((name, value, step))

        def log(self, values, step):
            self.calls.append((values, step))

    tb, wandb = Writer(), Writer()
    fake = types.ModuleType("megatron.training")
    fake.get_tensorboard_writer, fake.get_wandb_writer = (lambda: tb), (lambda: wandb)
    monkeypatch.setitem(sys.modules, "megatron.training", fake)
    monkeypatch.setitem(megatron_lm._last_logged, "iteration", None)
    model = torch.nn.Sequential()
    model.add_module(
        "fc",
        make_column(make_config(), 16, 32, SparsityConfig(track_flip_rate=True, backend="dense")),
    )
    args = add_args(argparse.ArgumentParser()).parse_args(
        ["--sparsity-weights", "2:4", "--sparsity-flip-rate"]
    )
    args.log_interval, args.train_iters = 2, 10
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for iteration in range(5):
        args.curr_iteration = iteration
        for _ in range(2):  # two micro-batches: one log per logged iteration
            megatron_lm.on_forward_step(model, args)
            model(torch.randn(4, 16, dtype=torch.float64))[0].square().sum().backward()
        opt.step()
        opt.zero_grad()
    steps = [step for _, _, step in tb.calls]
    assert sorted(set(steps)) == [0, 2, 4]
    names = {name for name, _, _ in tb.calls}
    assert {
        "megasparse/flip_rate/fc",
        "megasparse/flip_rate/mean",
        "megasparse/kept_weight_l1/fc",
    } <= names
    # one mask at iteration 0: no flips yet
    assert "megasparse/flip_rate/fc" not in {n for n, _, s in tb.calls if s == 0}
    at4 = {n: v for n, v, s in tb.calls if s == 4}
    assert 0 < at4["megasparse/flip_rate/fc"] < 1 and 0.5 < at4["megasparse/kept_weight_l1/fc"] <= 1
    assert [step for _, step in wandb.calls] == [0, 2, 4] and wandb.calls[-1][0] == at4


@pytest.mark.usefixtures("megatron_tp1")
def test_sste_beta_round_trips_through_a_dist_checkpoint(tmp_path):
    """torch_dist checkpoints carry S-STE's fixed beta (replicated), as the torch state_dict does."""
    from megatron.core import dist_checkpointing, parallel_state

    meta = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    x = torch.randn(4, 16, dtype=torch.float64)
    layer = make_column(make_config(), 16, 32, SparsityConfig(gradient="sste", backend="dense"))
    layer(x)
    with torch.no_grad():
        layer.weight.mul_(3.0)  # trained on: the fixed beta no longer matches a fresh one
    dist_checkpointing.save(layer.sharded_state_dict("l.", metadata=meta), str(tmp_path))
    other = make_column(
        make_config(), 16, 32, SparsityConfig(gradient="sste", backend="dense"), seed=5
    )
    loaded = dist_checkpointing.load(other.sharded_state_dict("l.", metadata=meta), str(tmp_path))
    other.load_state_dict({k[len("l.") :]: v for k, v in loaded.items()})
    torch.testing.assert_close(other(x)[0], layer(x)[0], rtol=0, atol=0)
