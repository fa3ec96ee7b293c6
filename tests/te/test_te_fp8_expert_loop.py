"""The TE FP8 expert loop's host work: plans and scalers built once per module and recipe (none on a
later micro-batch), no host sync beyond the one m_splits read TE's GroupedLinear also does; outputs
still the float64 products of the quantized operands."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fp8_reference import q64
from te_standins import TEGroupedLinearLike

from megasparse.config import SparsityConfig
from megasparse.fp8 import scaling
from megasparse.te import fp8_route
from megasparse.te.linear import sparse_te_class

pytestmark = pytest.mark.usefixtures("megatron_tp1")

# ops that read a device value on the host (a CUDA sync): .item()/.tolist() of a value, nonzero...
SYNCING_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique2", "equal", "is_nonzero")


class HostSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in SYNCING_OPS:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class Splits(torch.Tensor):
    """m_splits as a tensor that counts its host reads (`tolist`)."""

    reads = 0

    def tolist(self):
        Splits.reads += 1
        return torch.Tensor.tolist(self.as_subclass(torch.Tensor))


def _recipe(kind):
    recipe = type(kind, (), {})()
    recipe.fp8_format = type("F", (), {"name": "HYBRID"})()
    recipe.margin, recipe.amax_history_len, recipe.amax_compute_algo = 0, 4, "max"
    return recipe


def _counting(monkeypatch):
    """Counts constructions of plans and scalers on the route (the module's TE scalers included)."""
    made = []

    def counted(name, cls):
        def make(*args, **kwargs):
            made.append(name)
            return cls(*args, **kwargs)

        return make

    monkeypatch.setattr(fp8_route, "Fp8LinearPlan", counted("plan", fp8_route.Fp8LinearPlan))
    monkeypatch.setattr(fp8_route, "CurrentScaler", counted("scaler", fp8_route.CurrentScaler))
    for name in ("DelayedScaler", "CurrentScaler", "TeQuantizerScaler"):
        monkeypatch.setattr(scaling, name, counted("scaler", getattr(scaling, name)))
    return made


def _te_quantizers(layer, n):
    Float8Quantizer = type("Float8Quantizer", (), {})

    def quantizer(scale):
        q = Float8Quantizer()
        q.scale, q.amax = torch.tensor([scale]), torch.zeros(1)
        return q

    layer.fp8 = True
    layer.quantizers = {
        "scaling_fwd": [quantizer(8.0) for _ in range(3 * n)],
        "scaling_bwd": [quantizer(2.0**12) for _ in range(2 * n)],
    }


@pytest.mark.parametrize("state", ["own delayed scalers", "TE quantizers"])
def test_second_micro_batch_builds_no_plan_or_scaler_and_syncs_only_m_splits(monkeypatch, state):
    experts = 4
    layer = sparse_te_class(TEGroupedLinearLike)(experts, 64, 32, sparsity=SparsityConfig())
    if state == "TE quantizers":
        _te_quantizers(layer, experts)
    monkeypatch.setattr(fp8_route, "te_fp8_state", lambda: (True, _recipe("DelayedScaling")))
    made = _counting(monkeypatch)
    splits = [5, 0, 11, 16]  # ragged, one expert without tokens

    def micro_batch(seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(sum(splits), 64, generator=g).requires_grad_(True)
        y, _ = layer(x, torch.tensor(splits).as_subclass(Splits))
        y.backward(torch.randn(y.shape, generator=g))
        return x, y

    micro_batch(0)
    assert made.count("plan") == experts  # one plan per expert GEMM, once
    built = len(made)
    Splits.reads = 0
    with HostSyncs() as syncs:
        x, y = micro_batch(1)
    assert len(made) == built, made[built:]  # nothing new on the second micro-batch
    assert syncs.ops == [] and Splits.reads == 1
    if state == "own delayed scalers":  # the first micro-batch's amaxes scale the second one
        return
    start = 0
    for i, n in enumerate(splits):  # TE's scale (8), not this tensor's amax
        w = getattr(layer, f"weight{i}").detach() * layer.sparsity_mask(
            getattr(layer, f"weight{i}")
        )
        x_i = x.detach()[start : start + n]
        x_q = (x_i * 8.0).clamp(-448, 448).to(torch.float8_e4m3fn).double() / 8.0
        ref = x_q @ q64(w).t()
        torch.testing.assert_close(y[start : start + n].double(), ref, rtol=1e-5, atol=1e-5)
        start += n


def test_new_te_quantizers_or_recipe_rebuild_the_plans(monkeypatch):
    """TE makes new quantizer objects when the recipe changes: the plans follow them."""
    layer = sparse_te_class(TEGroupedLinearLike)(2, 64, 32, sparsity=SparsityConfig())
    _te_quantizers(layer, 2)
    monkeypatch.setattr(fp8_route, "te_fp8_state", lambda: (True, _recipe("DelayedScaling")))
    made = _counting(monkeypatch)
    x = torch.randn(12, 64)
    layer(x, [4, 8])
    layer(x, [4, 8])
    assert made.count("plan") == 2
    _te_quantizers(layer, 2)
    layer(x, [4, 8])
    assert made.count("plan") == 4
    monkeypatch.setattr(fp8_route, "te_fp8_state", lambda: (True, _recipe("Float8CurrentScaling")))
    layer(x, [4, 8])
    assert made.count("plan") == 6
