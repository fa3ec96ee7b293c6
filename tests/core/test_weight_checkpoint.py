"""Checkpoints written by an earlier megasparse load bit for bit: weights, held masks, the step
count, refreshed_at and S-STE's beta, as a torch state_dict and as a Megatron dist checkpoint.

The fixtures in tests/references/checkpoints/ were written by megasparse at commit b80d88c with
megatron-core 0.16.1 by make_checkpoints.py there (its docstring has the command). Each layer was
trained 5 steps and saved; expected.pt holds its state at the save and what it computed in the
3 steps after it, which the restored layer must compute again."""

import shutil
from pathlib import Path

import pytest
import torch

from megasparse import SparsityConfig
from megatron_helpers import make_column, make_config

pytestmark = pytest.mark.usefixtures("megatron_tp1")

FIXTURES = Path(__file__).parents[1] / "references" / "checkpoints"
LAYERS = {
    "held": SparsityConfig(mask_refresh_interval=3, backend="dense"),
    "sste": SparsityConfig(gradient="sste", backend="dense"),
}


def _expected(name):
    """(what the saving run had and computed for layer `name`, the run's inputs)."""
    expected = torch.load(FIXTURES / "expected.pt", weights_only=True)
    return expected[name], expected["xs"]


def _load(layer, name, checkpoint, tmp_path):
    if checkpoint == "state_dict":
        layer.load_state_dict(torch.load(FIXTURES / f"{name}_state_dict.pt", weights_only=False))
        return
    from megatron.core import dist_checkpointing, parallel_state

    directory = tmp_path / f"{name}_dist"  # a copy, so no load can touch the fixture
    shutil.copytree(FIXTURES / f"{name}_dist", directory)
    meta = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    loaded = dist_checkpointing.load(layer.sharded_state_dict("l.", metadata=meta), str(directory))
    layer.load_state_dict({k[len("l.") :]: v for k, v in loaded.items()})


@pytest.mark.parametrize("checkpoint", ["state_dict", "dist"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_a_checkpoint_of_the_earlier_layout_restores_the_state_bit_for_bit(
    name, checkpoint, tmp_path
):
    expected, xs = _expected(name)
    layer = make_column(make_config(), 8, 16, LAYERS[name], seed=7)  # all from the checkpoint
    _load(layer, name, checkpoint, tmp_path)
    state = layer.weight_state
    assert torch.equal(layer.weight, expected["weight"])
    assert torch.equal(layer.bias, expected["bias"])
    if expected["held_mask"] is None:
        assert state.held_mask() is None
    else:
        assert torch.equal(state.held_mask(), expected["held_mask"])
        assert (state.step_count(), state.refreshed_at) == (
            expected["step_count"],
            expected["refreshed_at"],
        )
    if expected["sste_beta"] is None:
        assert state.sste_beta is None
    else:
        assert torch.equal(state.sste_beta, expected["sste_beta"])
    # the run goes on as it did: same outputs and masks (a refresh falls at step 6), same weight
    opt = torch.optim.SGD(layer.parameters(), lr=0.3)
    for step, x in enumerate(xs[5:]):
        opt.zero_grad()
        y, _ = layer(x)
        assert torch.equal(y, expected["outputs_after"][step]), step
        assert torch.equal(layer.sparsity_mask(), expected["masks_after"][step]), step
        y.square().sum().backward()
        opt.step()
    assert torch.equal(layer.weight, expected["weight_after"])
