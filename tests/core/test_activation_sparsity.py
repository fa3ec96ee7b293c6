"""FFN activation sparsity in SparseMLP and SparseRowParallelLinear (TP=1): float64 references."""

import pytest
import torch
from megatron.core.activations import squared_relu
from megatron.core.transformer.mlp import MLP

from megasparse import SparseMLP, SparsityConfig
from megasparse.core import compact_activation
from megasparse.core.backends import DenseBackend
from megasparse.core.masks import weight_mask
from megasparse.core.sparse_operand import GRAD_OUTPUT
from megatron_helpers import make_config, make_mlp, make_row
from reference import sparse_mlp_reference

pytestmark = pytest.mark.usefixtures("megatron_tp1")

HIDDEN, FFN = 16, 64


def _config(activation=squared_relu, **kw):
    return make_config(hidden_size=HIDDEN, ffn_hidden_size=FFN, activation_func=activation, **kw)


def _x(seed=1):
    return (
        torch.randn(
            6, 4, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
        )
        - 0.3
    )


def _run_and_compare(mlp, activation, pattern):
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    x = _x().requires_grad_(True)
    y, bias = mlp(x)
    y = y + bias
    ref = sparse_mlp_reference(
        x,
        fc1.weight,
        fc1.bias,
        fc2.weight,
        fc2.bias,
        fc1.sparsity_mask(),
        fc2.sparsity_mask(),
        pattern,
        activation,
    )
    y.backward(ref["dy"])
    close = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y, ref["y"], **close)
    torch.testing.assert_close(x.grad, ref["dx"], **close)
    for name, p in (("dw1", fc1.weight), ("db1", fc1.bias), ("dw2", fc2.weight), ("db2", fc2.bias)):
        torch.testing.assert_close(p.grad, ref[name], **close, msg=name)
    return ref


@pytest.mark.parametrize("weights", [None, "2:4"])
@pytest.mark.parametrize(
    "activations,pattern", [("2:4", (64, 2, 4)), ("8:2:8", (8, 2, 8)), ("4:2:16", (4, 2, 16))]
)
def test_sparse_mlp_squared_relu_matches_reference(activations, pattern, weights):
    sparsity = SparsityConfig(weights=weights, activations=activations, backend="dense")
    mlp = make_mlp(_config(), FFN, sparsity, sparsity)
    ref = _run_and_compare(mlp, "squared_relu", pattern)
    a, mask = ref["activation"], ref["mask"]
    assert mask.float().mean().item() == pytest.approx(pattern[1] / pattern[2])
    stats = mlp.activation_stats(reset=True)
    assert stats["zero_fraction"] == pytest.approx((a == 0).double().mean().item())
    assert stats["dropped_l1_fraction"] == pytest.approx(((a * ~mask).sum() / a.sum()).item())
    assert mlp.activation_stats()["elements"] == 0  # reset


@pytest.mark.parametrize("mlp_cls", [MLP, SparseMLP], ids=["megatron-MLP", "SparseMLP"])
def test_other_activations_are_sparsified_by_fc2(mlp_cls):
    gelu = torch.nn.functional.gelu
    sparsity = SparsityConfig(weights=None, activations="2:4", backend="dense")
    mlp = make_mlp(_config(activation=gelu), FFN, None, sparsity, mlp_cls=mlp_cls)
    ref = _run_and_compare(mlp, gelu, (64, 2, 4))
    stats = mlp.linear_fc2.activation_stats()
    assert stats["zero_fraction"] == 0.0  # GeLU has no exact zeros: the stats say what 2:4 costs it
    assert stats["dropped_l1_fraction"] == pytest.approx(
        ((ref["activation"].abs() * ~ref["mask"]).sum() / ref["activation"].abs().sum()).item()
    )


def test_named_squared_relu_overrides_config_activation():
    sparsity = SparsityConfig(
        weights=None, activations="2:4", activation_function="squared_relu", backend="dense"
    )
    mlp = make_mlp(_config(activation=torch.nn.functional.gelu), FFN, None, sparsity)
    _run_and_compare(mlp, "squared_relu", (64, 2, 4))


def test_disabled_sparse_mlp_is_bit_identical_to_megatron_mlp():
    cfg = _config(dtype=torch.float32)
    sparsity = SparsityConfig(weights="2:4", activations="2:4", enabled=False)
    sparse = make_mlp(cfg, FFN, sparsity, sparsity, seed=3)
    dense = make_mlp(
        cfg, FFN, SparsityConfig(enabled=False), SparsityConfig(enabled=False), mlp_cls=MLP, seed=3
    )
    outs = []
    for mlp in (sparse, dense):
        x = _x().float().requires_grad_(True)
        y, _ = mlp(x)
        y.sum().backward()
        outs.append((y, x.grad, mlp.linear_fc1.weight.grad, mlp.linear_fc2.weight.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("activations,expect_sparse_dgrad", [("2:4", True), ("8:2:8", False)])
def test_fc1_input_grad_is_told_that_dh_is_2_4(monkeypatch, activations, expect_sparse_dgrad):
    seen = []
    original = DenseBackend.input_grad

    def recording_input_grad(self, dy2d, w, sparse):
        seen.append((dy2d.detach().clone(), sparse == GRAD_OUTPUT))
        return original(self, dy2d, w, sparse)

    monkeypatch.setattr(DenseBackend, "input_grad", recording_input_grad)
    sparsity = SparsityConfig(weights=None, activations=activations, backend="dense")
    mlp = make_mlp(_config(), FFN, SparsityConfig(weights=None, backend="dense"), sparsity)
    y, _ = mlp(_x().requires_grad_(True))
    y.sum().backward()
    if not expect_sparse_dgrad:  # V:N:M (M >= 8): dH is compact, fc1 gathers its columns instead
        assert not any(flag for _, flag in seen)
        return
    dh, flag = seen[-1]  # fc2's input grad runs first, fc1's last
    assert flag is True and dh.shape[-1] == FFN
    assert (dh.reshape(-1, FFN // 4, 4).ne(0).sum(-1) <= 2).all()  # dH really is 2:4


def test_activation_sparsity_errors_name_the_fix():
    with pytest.raises(
        ValueError,
        match="the FFN activation.*built with tp_comm_buffer_name='proj'.*or set activations=None",
    ):
        make_row(
            make_config(), 16, 16, SparsityConfig(activations="2:4"), tp_comm_buffer_name="proj"
        )
    with pytest.raises(
        ValueError, match="groups 8 FFN columns.*gives 12 per rank.*multiple of 8\\*TP=8"
    ):
        make_row(make_config(), 12, 16, SparsityConfig(weights=None, activations="64:2:8"))
    with pytest.raises(ValueError, match="SparsityConfig.activations"):
        SparsityConfig(activations="64:2:6")


def test_weight_masks_still_follow_the_weights():
    sparsity = SparsityConfig(activations="2:4", backend="dense")
    mlp = make_mlp(_config(), FFN, sparsity, sparsity)
    assert torch.equal(mlp.linear_fc2.sparsity_mask(), weight_mask(mlp.linear_fc2.weight))


@pytest.mark.parametrize("activations,m", [("2:4", 4), ("8:2:8", 8)])
@pytest.mark.parametrize(
    "activation", [squared_relu, torch.nn.functional.gelu], ids=["fused", "sparsified-by-fc2"]
)
def test_nan_in_the_ffn_activation_reaches_the_loss_and_the_pattern_stays_exact(
    monkeypatch, activations, m, activation
):
    fc2_inputs = []
    original = DenseBackend.linear

    def recording_linear(self, x2d, w, bias, sparse):
        if x2d.shape[-1] == FFN:
            fc2_inputs.append(x2d.detach().clone())
        return original(self, x2d, w, bias, sparse)

    def recording_gather(a_c, columns, b, pattern):  # a compact activation's GEMMs
        fc2_inputs.append(compact_activation.scatter(a_c, columns, pattern, FFN))
        return gather(a_c, columns, b, pattern)

    gather = compact_activation.gather_k_matmul
    monkeypatch.setattr(DenseBackend, "linear", recording_linear)
    monkeypatch.setattr(compact_activation, "gather_k_matmul", recording_gather)
    sparsity = SparsityConfig(weights=None, activations=activations, backend="dense")
    mlp = make_mlp(_config(activation=activation), FFN, None, sparsity)
    with torch.no_grad():
        mlp.linear_fc1.bias[5] = float("nan")  # FFN column 5 is NaN for every token
        mlp.linear_fc1.bias[9] = float("inf")
    x = _x().requires_grad_(True)
    y, bias = mlp(x)
    loss = (y + bias).sum()
    assert torch.isnan(loss)
    loss.backward()  # runs; the gradient carries the NaN too
    assert torch.isnan(x.grad).any()
    a = fc2_inputs[0]  # fc2's forward runs first (a compact dH's GEMM in fc1's backward after)
    assert torch.isnan(a[:, 5]).all()  # NaN ranks as +inf: kept in every row
    assert (a.ne(0).reshape(-1, FFN // m, m).sum(-1) <= 2).all()  # exactly the pattern


@pytest.mark.parametrize("activations,pattern", [("2:4", (64, 2, 4)), ("8:2:8", (8, 2, 8))])
@pytest.mark.parametrize("mlp_cls", [MLP, SparseMLP], ids=["megatron-MLP", "SparseMLP"])
def test_inference_mode_runs_and_equals_no_grad(monkeypatch, mlp_cls, activations, pattern):
    from megasparse.core import activation_sparsity

    passes = []
    kernel = activation_sparsity._kernel
    monkeypatch.setattr(
        activation_sparsity, "_kernel", lambda *a, **k: passes.append(1) or kernel(*a, **k)
    )
    sparsity = SparsityConfig(weights="2:4", activations=activations, backend="dense")
    mlp = make_mlp(_config(), FFN, sparsity, sparsity, mlp_cls=mlp_cls)
    x = _x()
    with torch.no_grad():
        expected, expected_bias = mlp(x)
    with torch.inference_mode():
        got, got_bias = mlp(x)
    assert got.is_inference()
    assert torch.equal(got, expected) and torch.equal(got_bias, expected_bias)
    assert len(passes) == 2  # one sparsifier pass per forward: fc2 trusts the mark in both modes
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    ref = sparse_mlp_reference(
        x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, fc1.sparsity_mask(), fc2.sparsity_mask(),
        pattern, "squared_relu",
    )  # fmt: skip
    torch.testing.assert_close(got + got_bias, ref["y"], rtol=1e-10, atol=1e-10)
