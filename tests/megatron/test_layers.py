"""Sparse Column/RowParallelLinear at TP=1 (one gloo process): numerics, drop-in contract, bad input."""

import pytest
import torch

from megasparse import SparsityConfig

from megasparse.core import warn
from megasparse.core.masks import weight_mask
from megatron_helpers import make_column, make_config, make_row
from reference import masked_linear_reference

pytestmark = pytest.mark.usefixtures("megatron_tp1")

MODES = [(m, g) for m in ("1d", "transposable") for g in ("ste", "masked", "srste")]


def _x(shape=(6, 2, 16), seed=5, dtype=torch.float64):
    return torch.randn(
        shape, generator=torch.Generator().manual_seed(seed), dtype=dtype
    ).requires_grad_(True)


@pytest.mark.parametrize("is_expert", [False, True], ids=["dense-mlp", "expert"])
@pytest.mark.parametrize("make", [make_column, make_row], ids=["column", "row"])
@pytest.mark.parametrize("mask,gradient", MODES)
def test_layer_matches_float64_reference(make, mask, gradient, is_expert):
    cfg = make_config()
    sparsity = SparsityConfig(mask=mask, gradient=gradient, srste_decay=0.05, backend="dense")
    layer = make(cfg, 16, 32, sparsity, is_expert=is_expert)
    x = _x()
    y, bias = layer(x)
    assert bias is None
    expected_mask = weight_mask(layer.weight, mask)
    assert torch.equal(layer.sparsity_mask(), expected_mask)
    ref = masked_linear_reference(x, layer.weight, layer.bias, expected_mask, gradient, 0.05)
    y.backward(ref["dy"])
    torch.testing.assert_close(y, ref["y"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, ref["dx"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, ref["dw"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, ref["db"], rtol=1e-12, atol=1e-12)


def test_frozen_weight_still_prunes_and_passes_input_grad():
    layer = make_row(make_config(), 16, 32, SparsityConfig(backend="dense"))
    layer.weight.requires_grad_(False)
    x = _x()
    y, _ = layer(x)
    ref = masked_linear_reference(x, layer.weight, layer.bias, layer.sparsity_mask())
    y.backward(ref["dy"])
    torch.testing.assert_close(y, ref["y"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, ref["dx"], rtol=1e-12, atol=1e-12)
    assert layer.weight.grad is None


def test_skip_bias_add_returns_bias_like_parent():
    cfg = make_config()
    layer = make_column(cfg, 16, 32, SparsityConfig(backend="dense"), skip_bias_add=True)
    x = _x()
    y, bias = layer(x)
    assert bias is layer.bias
    ref = masked_linear_reference(x, layer.weight, None, layer.sparsity_mask())
    torch.testing.assert_close(y, ref["y"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", [make_column, make_row], ids=["column", "row"])
def test_disabled_layer_is_bit_identical_to_parent(make):
    cfg = make_config(dtype=torch.float32)
    parent = make(cfg, 16, 32, dense=True, seed=1)
    sparse = make(cfg, 16, 32, SparsityConfig(enabled=False), seed=1)
    assert torch.equal(parent.weight, sparse.weight)
    outs = []
    for layer in (parent, sparse):
        x = _x(dtype=torch.float32)
        y, _ = layer(x)
        y.backward(torch.ones_like(y))
        outs.append((y, x.grad, layer.weight.grad, layer.bias.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    # and switching it on changes the output (the test above could not pass vacuously)
    sparse.sparsity.enabled = True
    assert not torch.equal(sparse(_x(dtype=torch.float32))[0], outs[0][0])


@pytest.mark.parametrize("make", [make_column, make_row], ids=["column", "row"])
def test_state_dict_and_sharded_state_dict_match_parent(make):
    from megatron.core import parallel_state

    cfg = make_config()
    parent, sparse = make(cfg, 16, 32, dense=True), make(cfg, 16, 32, SparsityConfig())
    held = make(cfg, 16, 32, SparsityConfig(mask_refresh_interval=4))
    sparse(_x()), held(_x())  # a held mask exists now
    sd_p = parent.state_dict()
    for layer in (
        sparse,
        held,
    ):  # torch state_dict: the parent's keys and shapes (held masks ride in _extra_state)
        sd_s = layer.state_dict()
        assert list(sd_p) == list(sd_s)
        assert all(getattr(sd_p[k], "shape", None) == getattr(sd_s[k], "shape", None) for k in sd_p)
    meta = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    sh_p = parent.sharded_state_dict("l.", metadata=meta)
    sh_s = sparse.sharded_state_dict("l.", metadata=meta)
    assert list(sh_p) == list(sh_s)
    for k, v in sh_p.items():
        if hasattr(v, "global_shape"):
            assert (v.global_shape, v.global_offset, v.key) == (
                sh_s[k].global_shape,
                sh_s[k].global_offset,
                sh_s[k].key,
            )
    # dist checkpoints of held-mask layers add the mask, sharded like the weight (a dense model ignores it)
    sh_h = held.sharded_state_dict("l.", metadata=meta)
    assert sorted(set(sh_h) - set(sh_p)) == ["l.megasparse_held_mask", "l.megasparse_refreshed_at"]
    assert sh_h["l.megasparse_held_mask"].global_shape == sh_h["l.weight"].global_shape
    # a dense checkpoint loads into the sparse layer and back
    sparse.load_state_dict(parent.state_dict())
    assert torch.equal(sparse.weight, parent.weight)
    parent.load_state_dict(held.state_dict())
    assert torch.equal(held.weight, parent.weight)


def test_gradient_accumulation_fusion_without_apex_accumulates_into_main_grad():
    cfg = make_config(dtype=torch.float32, gradient_accumulation_fusion=True)
    layer = make_column(cfg, 16, 32, SparsityConfig(gradient="masked", backend="dense"))
    assert layer.gradient_accumulation_fusion
    layer.weight.main_grad = torch.full(layer.weight.shape, 0.5)
    x = _x(dtype=torch.float32)
    y, _ = layer(x)
    ref = masked_linear_reference(x, layer.weight, layer.bias, layer.sparsity_mask(), "masked")
    y.backward(ref["dy"].float())
    torch.testing.assert_close(
        layer.weight.main_grad.double(), 0.5 + ref["dw"], rtol=1e-5, atol=1e-5
    )
    assert layer.weight.grad is None  # like Megatron without grad_added_to_main_grad
    # a dense phase of the same layer uses the torch fallback too (the parent would need apex)
    layer.sparsity.enabled = False
    layer.weight.main_grad.zero_()
    x2 = _x(dtype=torch.float32, seed=9)
    y2, _ = layer(x2)
    y2.backward(ref["dy"].float())
    dense_dw = ref["dy"].reshape(-1, 32).t() @ x2.detach().double().reshape(-1, 16)
    torch.testing.assert_close(layer.weight.main_grad.double(), dense_dw, rtol=1e-5, atol=1e-5)


def test_held_mask_refreshes_every_n_training_steps():
    cfg = make_config()
    layer = make_column(cfg, 16, 32, SparsityConfig(mask_refresh_interval=3, backend="dense"))
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    masks, fresh = [], []
    for step in range(7):
        fresh.append(weight_mask(layer.weight))
        y, _ = layer(_x(seed=step))
        masks.append(layer.sparsity_mask())
        opt.zero_grad()
        y.pow(2).sum().backward()
        opt.step()
    for step, mask in enumerate(masks):
        assert torch.equal(mask, fresh[step - step % 3]), step  # refreshed at steps 0, 3, 6
    assert not torch.equal(fresh[0], fresh[2])  # the weights moved enough that holding mattered
    # eval forwards do not count as steps; an external iteration drives the refresh instead
    layer.eval()
    layer(_x())
    assert torch.equal(layer.sparsity_mask(), fresh[6])
    layer.train()
    layer.set_sparsity_iteration(9)
    layer(_x())
    assert torch.equal(layer.sparsity_mask(), weight_mask(layer.weight))


def test_shapes_that_split_a_group_fail_at_construction():
    cfg = make_config()
    with pytest.raises(ValueError, match="input_size=18 is not a multiple of 4"):
        make_column(cfg, 18, 32, SparsityConfig())
    with pytest.raises(
        ValueError, match="transposable mask needs 4x4 tiles.*output_size a multiple of 4"
    ):
        make_column(cfg, 16, 30, SparsityConfig(mask="transposable"))
    make_column(cfg, 16, 30, SparsityConfig(mask="1d"))  # 1d only needs the input dim


def test_explicit_gpu_backend_checks_dtype_and_alignment_up_front():
    with pytest.raises(
        ValueError, match="cusparselt supports float16, bfloat16 weights, not float32"
    ):
        make_column(make_config(dtype=torch.float32), 64, 64, SparsityConfig(backend="cusparselt"))
    with pytest.raises(
        ValueError,
        match=r"cutlass needs the weight \[out, in\] per tensor-parallel rank to be a multiple of \(32, 64\)",
    ):
        make_column(make_config(dtype=torch.bfloat16), 32, 64, SparsityConfig(backend="cutlass"))
    with pytest.raises(ValueError, match=r"transposed weight \[in, out\]"):
        make_column(
            make_config(dtype=torch.bfloat16),
            64,
            32,
            SparsityConfig(backend="cutlass", mask="transposable"),
        )
    layer = make_column(
        make_config(dtype=torch.bfloat16), 64, 64, SparsityConfig(backend="cusparselt")
    )
    with pytest.raises(
        RuntimeError, match="cusparselt needs a CUDA tensor, the weight is on cpu.*backend='auto'"
    ):
        layer(_x((4, 2, 64), dtype=torch.bfloat16))


def test_auto_backend_falls_back_to_dense_with_one_warning():
    warn._warned.clear()
    cfg = make_config(dtype=torch.bfloat16)
    layers = [make_column(cfg, 64, 64, SparsityConfig(backend="auto"), seed=s) for s in range(2)]
    x = _x((4, 2, 64), dtype=torch.bfloat16)
    with pytest.warns(
        UserWarning, match="uses the dense masked GEMM .* needs a CUDA tensor"
    ) as record:
        outs = [layer(x)[0] for layer in layers]
    assert len([w for w in record if "megasparse" in str(w.message)]) == 1
    ref = masked_linear_reference(x, layers[0].weight, layers[0].bias, layers[0].sparsity_mask())
    torch.testing.assert_close(outs[0].double(), ref["y"], rtol=2e-2, atol=2e-2)


def test_nonfinite_weight_propagates_like_dense_or_errors():
    cfg = make_config()
    layer = make_column(cfg, 16, 32, SparsityConfig(backend="dense"))
    with torch.no_grad():
        layer.weight[3, 5] = float("nan")
    y, _ = layer(_x())
    assert (
        torch.isnan(y[..., 3]).all() and not torch.isnan(y[..., 4]).any()
    )  # exactly the dense behaviour
    layer.sparsity.nonfinite_weights = "error"
    with pytest.raises(
        FloatingPointError, match="1 NaN/Inf values.*resume from the last good checkpoint"
    ):
        layer(_x())


def test_layer_rejects_non_config_sparsity():
    with pytest.raises(TypeError, match="megasparse.SparsityConfig"):
        make_column(make_config(), 16, 32, {"weights": "2:4"})
