"""The SparseActivation mark: kept by reads, lost by every write or memory hand-out it can see."""

import pytest
import torch
from megatron.core.activations import squared_relu

from megasparse import SparsityConfig
from megasparse.core.sparse_operand import is_2_4, mark_sparse, sparse_pattern
from megatron_helpers import make_config, make_mlp

PATTERN = (64, 2, 4)


def _marked():
    values = torch.tensor([[3.0, 0.0, -2.0, 0.0, 0.0, 1.0, 0.0, 4.0]])
    return mark_sparse(values, PATTERN)


def test_reads_keep_the_mark_and_results_are_plain():
    t = _marked()
    results = [t.reshape(-1), t * 2, t.sum(), t.t(), t.detach(), t.clone()]
    _ = t.shape, t.dtype, t.numel(), t.is_inference()
    assert sparse_pattern(t) == PATTERN and is_2_4(t)
    assert not any(is_2_4(r) for r in results)  # derived tensors are never marked


WRITES = {
    "in place": lambda t: t.mul_(2),
    "setitem": lambda t: t.__setitem__((0, 1), 5.0),
    "out=": lambda t: torch.add(t, 1, out=t),
    "through a view": lambda t: t.view(-1).add_(1),
    "through detach()": lambda t: t.detach().add_(1),
    ".data in place": lambda t: t.data.add_(1),
    ".data assigned": lambda t: setattr(t, "data", torch.ones_like(t)),
    "storage copy": lambda t: t.untyped_storage().copy_(torch.ones_like(t).untyped_storage()),
    "numpy": lambda t: t.numpy().fill(1.0),
}


@pytest.mark.parametrize("write", WRITES.values(), ids=WRITES.keys())
def test_every_write_it_can_see_removes_the_mark(write):
    t = _marked()
    write(t)
    assert sparse_pattern(t) is None and not is_2_4(t)


INFERENCE_WRITES = {k: WRITES[k] for k in ("in place", "setitem", "out=", ".data in place")}


@pytest.mark.parametrize("write", INFERENCE_WRITES.values(), ids=INFERENCE_WRITES.keys())
def test_inference_tensors_are_marked_and_lose_the_mark_when_written(write):
    with torch.inference_mode():
        t = _marked()
        assert t.is_inference() and is_2_4(t)
        write(t)
        assert not is_2_4(t)
    assert not is_2_4(t)


@pytest.mark.usefixtures("megatron_tp1")
def test_fc2_sparsifies_an_activation_written_through_data():
    """A write through `.data` between the activation and fc2: fc2 sparsifies what it receives."""
    ffn = 64
    sparsity = SparsityConfig(weights=None, activations="2:4", backend="dense")
    config = make_config(hidden_size=16, ffn_hidden_size=ffn, activation_func=squared_relu)
    mlp = make_mlp(config, ffn, None, sparsity)
    fc2 = mlp.linear_fc2
    written = torch.arange(ffn, dtype=torch.float64).remainder(7) - 3  # dense, not 2:4

    def write_through_data(module, args):
        args[0].data.copy_(written.expand_as(args[0]))

    fc2.register_forward_pre_hook(write_through_data)
    x = torch.randn(6, 4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y, bias = mlp(x)
    # float64 reference: the 2 largest |a| of every 4 of the written values, ties to the lower index
    groups = written.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    for g, row in enumerate(groups.tolist()):
        for c in sorted(range(4), key=lambda c: (-abs(row[c]), c))[:2]:
            keep[g, c] = True
    a = (groups * keep).reshape(ffn)
    expected = torch.nn.functional.linear(a.expand(6, 4, ffn), fc2.weight.double()) + fc2.bias
    torch.testing.assert_close(y + bias, expected, rtol=1e-12, atol=1e-12)
