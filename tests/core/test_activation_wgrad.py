"""Both-ways weight gradients (SparsityConfig.activation_wgrad): the activation-side operand of
dW2 = dY^T A and dW1 = dH^T X sparsified along tokens, against float64 references that mask the
operand with the selection rule and multiply."""

import pytest
import torch

from megasparse import SparsityConfig
from megasparse.config import ActivationPattern, parse_activation_pattern
from megasparse.core.compact_activation import BothWaysWgrad
from megasparse.kernels import activation_sparsify_reference
from megatron_helpers import make_config, make_row
from test_compact_activation import FFN, HIDDEN, assert_close, compact_mlp, grads
from test_compact_activation import masked_mlp_reference, mlp_input

pytestmark = pytest.mark.usefixtures("megatron_tp1")


def token_mask(s2d, pattern):
    """The both-ways selection of s [T, K] as a 0/1 float64 mask: the V:N:M rule on s^T (blocks of
    V neurons x M tokens, 4 tokens of largest L2 norm, N = 2: then 2 per neuron), tokens past T as
    zero columns, by the masked sparsifier's reference."""
    v, n, m = pattern
    tokens = s2d.shape[0]
    padded = torch.nn.functional.pad(s2d.t(), (0, (-tokens) % m))
    mask = activation_sparsify_reference(padded, v, m, False, n=n)[1]
    return mask[:, :tokens].t().double()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [37, 5, 0])
@pytest.mark.parametrize("wgrad", ["16:4:8", "8:2:16", "4:4:8"])
def test_both_ways_gemm_is_the_masked_operand_product(wgrad, tokens, dtype):
    pattern = parse_activation_pattern(wgrad)
    g = torch.Generator().manual_seed(tokens)
    s = torch.randn(tokens, 48, dtype=torch.float64, generator=g).relu().to(dtype)
    other = torch.randn(tokens, 24, dtype=torch.float64, generator=g).to(dtype)
    selected = s.double() * token_mask(s, pattern)  # the selection ranks the run's own values
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-2, atol=5e-2)
    # fc1: dW1 = dH_sel^T X, dH the sparse side; fc2: dW2 = dY^T A_sel, A the sparse side
    fc1_side = BothWaysWgrad(pattern, "grad_output")
    fc2_side = BothWaysWgrad(pattern, "input")
    got1, got2 = fc1_side(s, other), fc2_side(other, s)
    assert got1.dtype == dtype and got1.shape == (48, 24) and got2.shape == (24, 48)
    torch.testing.assert_close(got1.double(), selected.t() @ other.double(), **tol)
    torch.testing.assert_close(got2.double(), other.double().t() @ selected, **tol)
    fp32 = fc1_side.fp32(s, other)
    assert fp32.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(fp32.double(), selected.t() @ other.double(), **tol)


def test_both_ways_keeps_4_of_every_m_tokens_per_block_of_neurons():
    pattern = ActivationPattern(16, 4, 8)
    s = torch.randn(64, 32, dtype=torch.float64).abs() + 0.1  # no zeros: exactly 4 of 8 kept
    kept = token_mask(s, pattern)
    blocks = kept.t().reshape(2, 16, 8, 8)  # [neuron block, neuron, token group, token]
    assert (blocks.sum(-1) == 4).all()
    assert (blocks == blocks[:, :1]).all()  # the same tokens for the block's 16 neurons
    product = BothWaysWgrad(pattern, "grad_output")(s, torch.eye(64, dtype=torch.float64))
    torch.testing.assert_close(product, (s * kept).t())


@pytest.mark.parametrize("fusion", [False, True], ids=["grad", "main_grad"])
@pytest.mark.parametrize("tokens", [35, 0], ids=["ragged", "no-tokens"])
@pytest.mark.parametrize("wgrad", ["16:4:8", "8:2:16"])
@pytest.mark.parametrize("activations,weights", [("64:2:8", "2:4"), ("16:4:8", None)])
def test_sparse_mlp_both_ways_weight_gradients_select_tokens_of_a_and_dh(
    activations, weights, wgrad, tokens, fusion
):
    gradient = "masked" if weights else "ste"
    mlp = compact_mlp(
        activations, weights, fusion=fusion, activation_wgrad=wgrad, gradient=gradient
    )
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    x = mlp_input(tokens)
    y, bias = mlp(x)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (y + bias).backward(dy)
    exact = masked_mlp_reference(mlp, x, dy)
    pattern = parse_activation_pattern(wgrad)
    a2d, dh2d, x2d, dy2d = (exact[k] for k in ("a2d", "dh2d", "x2d", "dy2d"))
    ref = {
        **exact,
        "dw2": dy2d.t() @ (a2d * token_mask(a2d, pattern)),
        "dw1": (dh2d * token_mask(dh2d, pattern)).t() @ x2d,
    }
    got = {"y": y + bias, **grads(mlp, x)}
    if fusion:
        got["dw1"], got["dw2"] = fc1.weight.main_grad - 0.5, fc2.weight.main_grad - 0.5
    if weights:  # gradient="masked": the dense weight gets the masked gradient
        for name, layer in (("dw1", fc1), ("dw2", fc2)):
            ref[name] = ref[name] * layer.sparsity_mask()
            exact[name] = exact[name] * layer.sparsity_mask()
    assert_close(got, ref, torch.float64)  # dW1, dW2 both ways; y, dX and biases exact
    if tokens:  # an approximation: not the exact weight gradient
        assert not torch.allclose(got["dw1"], exact["dw1"])
        assert not torch.allclose(got["dw2"], exact["dw2"])


def test_a_hand_built_fc2_takes_both_ways_from_its_own_config():
    sparsity = SparsityConfig(
        weights=None, activations="16:4:8", activation_wgrad="8:4:16", backend="dense"
    )
    fc2 = make_row(make_config(), FFN, HIDDEN, sparsity, tp_comm_buffer_name="fc2")
    g = torch.Generator().manual_seed(4)
    a = torch.randn(35, 2, FFN, dtype=torch.float64, generator=g).relu().requires_grad_(True)
    y, _ = fc2(a)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    y.backward(dy)
    mask = activation_sparsify_reference(a.detach().reshape(-1, FFN), 16, 8, False, n=4)[1]
    a2d = a.detach().reshape(-1, FFN) * mask
    expected = dy.reshape(-1, HIDDEN).t() @ (a2d * token_mask(a2d, (8, 4, 16)))
    torch.testing.assert_close(fc2.weight.grad, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        a.grad.reshape(-1, FFN), (dy.reshape(-1, HIDDEN) @ fc2.weight.detach()) * mask
    )
