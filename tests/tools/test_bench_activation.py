"""The activation path's GPU bench, run on the CPU with a stand-in timer: what it times, the
checks it makes before timing, and the rows it writes (no speed is measured here)."""

import itertools

import pytest
import torch

from megasparse.core import compact_activation
from megasparse.tools.perf import bench_activation as act
from megasparse.tools.perf.models import Recipe
from megasparse.tools.perf.roofline import GATHER_EFFICIENCY


def stand_in_timer(values):
    """Runs each timed function once (so it must work) and reports the next of `values` in ms."""
    values = iter(values)

    def timer(fn):
        fn()
        return next(values)

    return timer


def alternating_timer():
    return stand_in_timer(itertools.cycle((1.0, 3.0)))


@pytest.mark.parametrize("tokens", [200, 0])  # ragged (not a multiple of V), and no tokens
def test_activation_gemms_times_each_kernel_beside_its_dense_gemm(tokens):
    rows = act.activation_gemms(
        64, 256, tokens, "64:2:8", "64:4:16", alternating_timer(), "cpu", torch.float32
    )
    gemms = [r for r in rows if "measured_ratio" in r]
    assert [r["kernel"].split(" (")[0] for r in gemms] == [
        "fc2 forward Y = A W2^T",
        "fc2 dgrad dA_c",
        "fc1 dgrad dX = dH W1",
        "fc2 wgrad dW2^T = A_sel^T dY",
        "fc1 wgrad dW1 = dH_sel^T X",
    ]
    # each pair timed sparse first, then dense: 3 ms / 1 ms
    assert all(r["measured_ratio"] == 3.0 for r in gemms)
    e = GATHER_EFFICIENCY["mid"]
    assert [r["projected_ratio"] for r in gemms] == pytest.approx(
        [8 / 4 * e] * 3 + [16 / 4 * e] * 2
    )
    memory = {r["kernel"]: r for r in rows if "vs_copy" in r}
    assert set(memory) == {"activation_compact", "scatter", "compact_tokens"}
    assert all(r["vs_copy"] == 3.0 for r in memory.values())


def test_activation_gemms_refuses_to_time_a_kernel_that_computes_something_else(monkeypatch):
    monkeypatch.setattr(
        compact_activation, "gather_k_matmul", lambda a_c, columns, b, p: a_c.new_zeros(200, 64)
    )
    with pytest.raises(AssertionError, match="fc2 forward .* differs from its dense product"):
        act.activation_gemms(
            64, 256, 200, "64:2:8", None, alternating_timer(), "cpu", torch.float32
        )


def test_ffn_rows_build_each_recipe_and_set_it_beside_its_projection():
    configs = []

    def mlp(sparsity):
        configs.append(sparsity)
        return torch.nn.Linear(8, 8, dtype=torch.bfloat16)

    recipes = act.bench_recipes(quick=True)
    rows = act.activation_ffn_rows(
        mlp,
        lambda module, x: lambda: module(x),
        stand_in_timer(itertools.chain([4.0], itertools.repeat(2.0))),  # dense 4 ms, recipes 2
        8,
        32,
        16,
        recipes,
        projected=lambda r: 1.5 if r.activation_wgrad else 1.2,
    )
    assert configs[0] is None and len(configs) == 1 + len(recipes)
    assert [(c.activations, c.activation_wgrad, c.mask) for c in configs[1:]] == [
        (r.activations, r.activation_wgrad, "transposable") for r in recipes
    ]
    assert [r["recipe"] for r in rows] == [r.name for r in recipes]
    assert all(r["measured_ratio"] == 2.0 for r in rows)
    assert [r["projected_ratio"] for r in rows] == [
        1.5 if r.activation_wgrad else 1.2 for r in recipes
    ]
    assert Recipe("transposable", "64:4:16", "64:4:8") in recipes
