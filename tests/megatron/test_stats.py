"""megasparse.stats: per-module kept |W| share, state and weight bytes, flip rate, against float64
computations from the weights and their masks; the model-wide means, this step's flip rate and the
activation sums that the Megatron-LM writers and the demo read."""

import pytest
import torch

import megasparse
from megasparse import SparsityConfig
from megasparse.core.masks import weight_mask
from megatron_helpers import make_column, make_config, make_row

STEPS = 5


def _model(interval):
    sparsity = SparsityConfig(track_flip_rate=True, backend="dense", mask_refresh_interval=interval)
    model = torch.nn.Sequential()
    model.add_module("fc1", make_column(make_config(), 16, 32, sparsity))
    model.add_module("fc2", make_row(make_config(), 32, 16, sparsity))
    model.add_module("plain", torch.nn.Linear(16, 16, dtype=torch.float64))
    model.add_module(  # a sparse module that prunes no weight: no entry
        "dense_phase_layer", make_column(make_config(), 16, 16, SparsityConfig(weights=None))
    )
    return model


def _forward(model, x):
    h = model.fc1(x)[0]
    return model.fc2(h)[0] + model.plain(x) + model.dense_phase_layer(x)[0]


@pytest.mark.usefixtures("megatron_tp1")
@pytest.mark.parametrize("interval", [1, 2])
def test_stats_match_the_weights_and_masks_in_float64(interval):
    model = _model(interval)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    g = torch.Generator().manual_seed(3)
    masks, flips = {}, {}
    for step in range(STEPS):
        weights = {name: getattr(model, name).weight.detach().clone() for name in ("fc1", "fc2")}
        computed_now = step % interval == 0
        step_flips = []
        for name, w in weights.items():
            if computed_now:
                mask = weight_mask(w)
                if name in masks:
                    flips[name] = (mask != masks[name]).double().mean().item()
                step_flips.append(flips[name] if name in masks else 0.0)  # the first: none
                masks[name] = mask
            else:
                step_flips.append(0.0)  # a held mask flips nothing
        opt.zero_grad()
        _forward(
            model, torch.randn(6, 16, dtype=torch.float64, generator=g)
        ).square().sum().backward()

        stats = megasparse.stats(model)
        assert sorted(stats) == ["fc1", "fc2"]
        for name, w in weights.items():
            entry, layer = stats[name], getattr(model, name)
            kept = (w.abs() * masks[name]).sum() / w.abs().sum()
            torch.testing.assert_close(entry["kept_weight_l1"], kept, rtol=1e-12, atol=1e-12)
            assert entry["weight_bytes"] == w.numel() * 8
            assert entry["state_bytes"] == layer.weight_state.held_bytes()
            if name not in flips:
                assert entry["flip_rate"] is None
            else:
                assert entry["flip_rate"].item() == pytest.approx(flips[name], abs=1e-7)
                assert entry["flip_step"] == step - step % interval
            assert set(entry) == set(layer.sparsity_stats())
        expected_kept = sum(
            float((w.abs() * masks[n]).sum() / w.abs().sum()) for n, w in weights.items()
        )
        assert stats.mean("kept_weight_l1").item() == pytest.approx(expected_kept / 2, abs=1e-7)
        if flips:
            assert stats.mean("flip_rate").item() == pytest.approx(
                sum(flips.values()) / len(flips), abs=1e-7
            )
        now = stats.step_flip_rate()
        assert now.item() == pytest.approx(sum(step_flips) / len(step_flips), abs=1e-7)
        if not flips:
            assert stats.mean("flip_rate") is None
        opt.step()
    assert flips and max(flips.values()) > 0  # lr 0.3 flips some entries


@pytest.mark.usefixtures("megatron_tp1")
@pytest.mark.parametrize("interval", [1, 2])
def test_reading_stats_between_steps_builds_no_step(interval):
    """Megatron-LM's writer reads the stats before the forward, while the distributed optimizer
    may still be gathering the weights: the read neither crosses the step boundary nor computes or
    holds a mask; kept |W| is that of the mask the last forward computed with."""
    model = _model(interval)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    x = torch.randn(6, 16, dtype=torch.float64)
    for _ in range(2):
        opt.zero_grad()
        _forward(model, x).square().sum().backward()
        opt.step()
    states = [model.fc1.weight_state, model.fc2.weight_state]
    before = [(s.steps, s._step, s.flip_step, s.held_mask_bits, s.refreshed_at) for s in states]
    last_masks = [s._step.mask() for s in states]
    stats = megasparse.stats(model)
    for name, state, mask in zip(("fc1", "fc2"), states, last_masks):
        w = getattr(model, name).weight.detach()
        kept = (w.abs() * mask).sum() / w.abs().sum()
        torch.testing.assert_close(stats[name]["kept_weight_l1"], kept, rtol=1e-12, atol=1e-12)
    after = [(s.steps, s._step, s.flip_step, s.held_mask_bits, s.refreshed_at) for s in states]
    assert all(a[0] == b[0] and a[1] is b[1] and a[2] == b[2] for a, b in zip(after, before))
    assert all(a[3] is b[3] and a[4] == b[4] for a, b in zip(after, before))


@pytest.mark.usefixtures("megatron_tp1")
def test_stats_of_a_dense_phase_and_of_chunks():
    model = _model(1)
    _forward(model, torch.randn(4, 16, dtype=torch.float64))
    chunks = megasparse.stats([model, model.fc1])
    assert sorted(chunks) == ["0.fc1", "0.fc2", "1."]
    for layer in (model.fc1, model.fc2):
        layer.sparsity.enabled = False
    stats = megasparse.stats(model)
    assert stats.step_flip_rate() is None  # nothing pruned now
    for name in ("fc1", "fc2"):  # the dense phase keeps every weight
        assert stats[name]["kept_weight_l1"].item() == 1.0
    assert stats.activation_sums() is None


@pytest.mark.usefixtures("megatron_tp1")
def test_activation_sums_add_the_fc2_counters():
    from megatron.core.activations import squared_relu

    from megatron_helpers import make_mlp

    sparsity = SparsityConfig(weights=None, activations="2:4", backend="dense")
    config = make_config(ffn_hidden_size=32, activation_func=squared_relu)
    model = torch.nn.Sequential(
        make_mlp(config, 32, sparsity, sparsity), make_mlp(config, 32, sparsity, sparsity)
    )
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    for mlp in model:
        mlp(x)
    sums = megasparse.stats(model).activation_sums()
    expected = (
        model[0].linear_fc2.activation_counter.sums + model[1].linear_fc2.activation_counter.sums
    )
    assert sums.dtype == torch.float64
    torch.testing.assert_close(sums, expected, rtol=0, atol=0)
    zeros, total, dropped, numel = sums.tolist()
    assert numel == 2 * x.numel() // 16 * 32 and zeros >= numel / 2 and 0 < dropped < total
    assert megasparse.stats(model) == {}  # no layer prunes weights


def test_te_grouped_linear_stats_cover_every_expert_weight():
    from expert_builders import make_expert_inputs, make_te_experts

    from megasparse import SparseTEGroupedMLP

    sparsity = SparsityConfig(track_flip_rate=True, backend="dense")
    experts = make_te_experts(SparseTEGroupedMLP, sparsity, torch.float64)
    x, probs, tokens = make_expert_inputs(torch.float64)
    opt = torch.optim.SGD(experts.parameters(), lr=0.3)
    previous = None
    for step in range(3):
        linear = experts.linear_fc1
        weights = [w.detach().clone() for w in experts._weights(linear)]
        masks = [weight_mask(w) for w in weights]
        opt.zero_grad()
        experts(x, tokens, probs)[0].square().sum().backward()
        stats = megasparse.stats(experts)
        assert sorted(stats) == ["linear_fc1", "linear_fc2"]
        entry = stats["linear_fc1"]
        kept = sum((w.abs() * m).sum() for w, m in zip(weights, masks))
        total = sum(w.abs().sum() for w in weights)
        torch.testing.assert_close(entry["kept_weight_l1"], kept / total, rtol=1e-12, atol=1e-12)
        assert entry["weight_bytes"] == sum(w.numel() * 8 for w in weights)
        if previous is None:
            assert entry["flip_rate"] is None
        else:
            changed = sum(float((m != p).sum()) for m, p in zip(masks, previous))
            expected = changed / sum(w.numel() for w in weights)
            assert entry["flip_rate"].item() == pytest.approx(expected, abs=1e-7)
        for w, m in zip(experts._weights(linear), masks):
            assert torch.equal(experts.sparsity_mask(w), m)
        previous = masks
        opt.step()
    assert "sparsity=(weights=2:4" in repr(experts).split("(linear_fc1)")[0]
