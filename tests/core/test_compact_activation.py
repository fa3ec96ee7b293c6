"""Compact V:N:M activations (M >= 8) in SparseMLP at TP=1: every FFN GEMM on the compact form,
against float64 masked references; what the backward saves; the mark's validity rules."""

import pytest
import torch
from megatron.core.activations import squared_relu

from megasparse import SparsityConfig, kernels
from megasparse.config import ActivationPattern
from megasparse.core import compact_activation
from megasparse.core.activation_sparsity import ActivationStats, squared_relu_sparsify
from megasparse.core.sparse_operand import compact_operand, sparse_pattern
from megasparse.kernels import activation_sparsify_reference
from devices import on_triton_device
from megatron_helpers import make_config, make_mlp, make_row
from reference import sparse_mlp_reference

pytestmark = pytest.mark.usefixtures("megatron_tp1")

HIDDEN, FFN = 16, 64
PATTERNS = [("64:2:8", (64, 2, 8)), ("64:4:16", (64, 4, 16)), ("16:4:8", (16, 4, 8))]


def mlp_input(tokens, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 2, HIDDEN, dtype=torch.float64, generator=g) - 0.3
    return x.to(dtype).requires_grad_(True)


def compact_mlp(activations, weights=None, dtype=torch.float64, ffn=FFN, fusion=False, **kw):
    """A Squared-ReLU SparseMLP; fusion: gradient_accumulation_fusion (main_grad 0.5 to start)."""
    sparsity = SparsityConfig(weights=weights, activations=activations, backend="dense", **kw)
    settings = dict(activation_func=squared_relu, gradient_accumulation_fusion=fusion)
    cfg = make_config(hidden_size=HIDDEN, ffn_hidden_size=ffn, dtype=dtype, **settings)
    mlp = make_mlp(cfg, ffn, sparsity, sparsity)
    for layer in (mlp.linear_fc1, mlp.linear_fc2) if fusion else ():
        layer.weight.main_grad = torch.full(layer.weight.shape, 0.5, dtype=dtype)
    return mlp


def _count_compact_gemms(monkeypatch):
    """Calls of the gather GEMM (fc2's forward, fc1's input gradient) and of compact_matmul (fc2's
    input gradient)."""
    calls = {"gather_k_matmul": 0, "compact_matmul": 0}
    for name in calls:
        original = getattr(compact_activation, name)

        def counting(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(compact_activation, name, counting)
    return calls


def masked_mlp_reference(mlp, x, dy, act_mask=None):
    """Float64 y = (relu(h)^2 * mask) (M2 W2)^T + b2, h = x (M1 W1)^T + b1, by plain autograd, and
    the weight-gradient GEMMs' operands A, dH, X, dY (2-D). act_mask None: from the reference
    sparsifier on this h."""
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    pattern = fc2.sparsity.activation_pattern
    leaf = lambda t: t.detach().double().clone().requires_grad_(True)  # noqa: E731
    x64, b1, b2 = leaf(x), leaf(fc1.bias), leaf(fc2.bias)
    w1 = leaf(fc1.weight.double() * fc1.sparsity_mask())
    w2 = leaf(fc2.weight.double() * fc2.sparsity_mask())
    h = torch.nn.functional.linear(x64, w1, b1)
    h.retain_grad()
    if act_mask is None:
        h2d = h.detach().reshape(-1, h.shape[-1])
        act_mask = activation_sparsify_reference(h2d, pattern.v, pattern.m, True, n=pattern.n)[1]
    a = torch.relu(h).square() * act_mask.reshape(h.shape)
    y = torch.nn.functional.linear(a, w2, b2)
    y.backward(dy.double())
    flat = lambda t: t.detach().reshape(-1, t.shape[-1])  # noqa: E731
    return {
        **{"y": y, "dx": x64.grad, "dw1": w1.grad, "db1": b1.grad, "dw2": w2.grad, "db2": b2.grad},
        **{"a2d": flat(a), "dh2d": flat(h.grad), "x2d": flat(x64), "dy2d": flat(dy.double())},
    }


def grads(mlp, x):
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    return {
        "dx": x.grad,
        "dw1": fc1.weight.grad,
        "db1": fc1.bias.grad,
        "dw2": fc2.weight.grad,
        "db2": fc2.bias.grad,
    }


def assert_close(got, ref, dtype, names=("y", "dx", "dw1", "db1", "dw2", "db2")):
    for name in names:
        g, r = got[name].double(), ref[name].double()
        if dtype == torch.float64:
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=name)
        else:  # bf16 rounding of every operand: compare as a relative error of the whole tensor
            scale = r.norm().clamp_min(1e-6)
            assert (g - r).norm() / scale < 3e-2, (name, ((g - r).norm() / scale).item())


@pytest.mark.parametrize("tokens", [35, 0], ids=["ragged", "no-tokens"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
@pytest.mark.parametrize("weights", [None, "2:4"])
@pytest.mark.parametrize("activations,pattern", PATTERNS)
def test_sparse_mlp_on_the_compact_form_matches_the_masked_reference(
    monkeypatch, activations, pattern, weights, dtype, tokens
):
    calls = _count_compact_gemms(monkeypatch)
    mlp = compact_mlp(activations, weights, dtype)
    preacts = []
    sparsifier = mlp.activation_func
    mlp.activation_func = lambda h: preacts.append(h.detach()) or sparsifier(h)
    x = mlp_input(tokens, dtype)
    y, bias = mlp(x)
    y = y + bias
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y.backward(dy.to(dtype))
    # the selection is the run's own (its bf16 h); the GEMMs and gradients are checked in float64
    (h,) = preacts
    v, n, m = pattern
    act_mask = activation_sparsify_reference(h.reshape(-1, FFN), v, m, True, n=n)[1]
    ref = masked_mlp_reference(mlp, x, dy, act_mask)
    assert_close({"y": y, **grads(mlp, x)}, ref, dtype)
    if tokens:  # fc2 forward and fc1 input gradient gather; fc2's input gradient is compact
        assert calls == {"gather_k_matmul": 2, "compact_matmul": 1}
    if dtype == torch.float64:  # the selection is also the one of the float64 reference MLP
        full = sparse_mlp_reference(
            x, mlp.linear_fc1.weight, mlp.linear_fc1.bias, mlp.linear_fc2.weight,
            mlp.linear_fc2.bias, mlp.linear_fc1.sparsity_mask(), mlp.linear_fc2.sparsity_mask(),
            pattern, "squared_relu", grad_output=dy,
        )  # fmt: skip
        torch.testing.assert_close(y, full["y"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("activations,pattern", PATTERNS)
def test_other_activations_on_the_compact_form_match_the_reference(activations, pattern):
    gelu = torch.nn.functional.gelu
    sparsity = SparsityConfig(weights="2:4", activations=activations, backend="dense")
    cfg = make_config(hidden_size=HIDDEN, ffn_hidden_size=FFN, activation_func=gelu)
    mlp = make_mlp(cfg, FFN, sparsity, sparsity)
    x = mlp_input(35)
    y, bias = mlp(x)
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    ref = sparse_mlp_reference(
        x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, fc1.sparsity_mask(), fc2.sparsity_mask(),
        pattern, gelu,
    )  # fmt: skip
    (y + bias).backward(ref["dy"])
    assert_close({"y": y + bias, **grads(mlp, x)}, ref, torch.float64)


def _saved_bytes(mlp, x):
    """Bytes saved for backward by one forward of `mlp` (parameters excluded): (all, without the
    FFN's input x, which every path saves for fc1's weight gradient)."""
    params = {p.data_ptr() for p in mlp.parameters()}
    seen = {}

    def pack(t):
        key = (t.data_ptr(), t.numel() * t.element_size())
        if t.data_ptr() not in params:
            seen[key] = t.data_ptr() == x.data_ptr()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = mlp(x)
    total = sum(size for (_, size) in seen)
    activation = sum(size for (_, size), is_input in seen.items() if not is_input)
    y.sum().backward()  # the saved tensors serve the backward
    return total, activation


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
@pytest.mark.parametrize("activations", ["64:2:8", "64:4:16"])
def test_backward_saves_the_compact_form_not_the_dense_activation(activations, dtype):
    ffn, tokens = 256, 64
    m = int(activations.split(":")[2])
    masked = _saved_bytes(compact_mlp("2:4", "2:4", dtype, ffn=ffn), mlp_input(tokens, dtype))
    compact = _saved_bytes(
        compact_mlp(activations, "2:4", dtype, ffn=ffn), mlp_input(tokens, dtype)
    )
    total_ratio, activation_ratio = (c / d for c, d in zip(compact, masked))
    print(f"{activations} {dtype}: saved bytes {compact} vs masked {masked}: ratio "
          f"{total_ratio:.3f} (with the FFN input), {activation_ratio:.3f} (activation)")  # fmt: skip
    assert activation_ratio <= 4 / m + 0.01
    assert total_ratio <= 4 / m + 0.05  # the FFN input (hidden 16) is small beside ffn 256


def test_dense_phase_runs_the_dense_path(monkeypatch):
    calls = _count_compact_gemms(monkeypatch)
    mlp = compact_mlp("64:2:8", "2:4", enabled=False)
    x = mlp_input(35)
    y, bias = mlp(x)
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    ones = torch.ones_like(fc1.weight, dtype=torch.bool), torch.ones_like(fc2.weight, dtype=torch.bool)  # fmt: skip
    ref = sparse_mlp_reference(
        x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, *ones, None, "squared_relu"
    )
    (y + bias).backward(ref["dy"])
    assert_close({"y": y + bias, **grads(mlp, x)}, ref, torch.float64)
    assert calls == {"gather_k_matmul": 0, "compact_matmul": 0}


def test_a_marked_tensor_changed_in_place_loses_its_compact_form():
    pattern = ActivationPattern(16, 4, 8)
    h = torch.randn(40, FFN, dtype=torch.float64)
    a, mask = squared_relu_sparsify(h, pattern, ActivationStats())
    assert mask is None and sparse_pattern(a) == pattern
    carried = compact_operand(a)
    torch.testing.assert_close(carried.dense(), a, rtol=0, atol=0)
    assert carried.values_c.shape == (40, FFN // 2) and carried.columns.dtype == torch.int16
    a.mul_(2)
    assert compact_operand(a) is None and sparse_pattern(a) is None


@pytest.mark.parametrize("activations,pattern", PATTERNS)
def test_fc2_resparsifies_an_activation_changed_in_place(monkeypatch, activations, pattern):
    calls = _count_compact_gemms(monkeypatch)
    sparsity = SparsityConfig(weights="2:4", activations=activations, backend="dense")
    fc2 = make_row(make_config(), FFN, HIDDEN, sparsity, tp_comm_buffer_name="fc2")
    g = torch.Generator().manual_seed(3)
    h = torch.randn(35, 2, FFN, dtype=torch.float64, generator=g)
    # autograd refuses in-place writes to a custom op's output: an activation outside the graph
    a, _ = squared_relu_sparsify(h, ActivationPattern(*pattern), ActivationStats())
    a.mul_(-1)  # the carried compact form is stale now
    y, _ = fc2(a)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    y.backward(dy)
    assert calls["gather_k_matmul"] == 1  # fc2 compacted the changed values again
    v, n, m = pattern
    mask = activation_sparsify_reference(h.reshape(-1, FFN), v, m, True, n=n)[1]
    w2 = (fc2.weight.detach().double() * fc2.sparsity_mask()).requires_grad_(True)
    a_ref = -torch.relu(h).square() * mask.reshape(h.shape)
    y_ref = torch.nn.functional.linear(a_ref, w2, fc2.bias)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fc2.weight.grad, w2.grad, rtol=1e-10, atol=1e-10)


_COMPACT_TRITON = (
    "activation_compact_triton",
    "gather_k_matmul_triton",
    "compact_matmul_triton",
    "squared_relu_compact_backward_triton",
)


@pytest.mark.skipif(
    not (kernels.HAVE_TRITON and all(hasattr(kernels, name) for name in _COMPACT_TRITON)),
    reason="needs Triton and the compact layout's Triton kernels in megasparse.kernels",
)
@pytest.mark.parametrize("activations,wgrad", [("64:2:8", None), ("16:4:8", "16:4:8")])
def test_sparse_mlp_on_the_triton_kernels_matches_the_reference(monkeypatch, activations, wgrad):
    """Every kernel call of the FFN on its Triton kernel (the GPU, else TRITON_INTERPRET on CPU)."""
    ran = set()

    def triton_everywhere(triton_kernel, reference, tensor):
        ran.add(triton_kernel.__name__)
        return on_triton_device(triton_kernel)

    monkeypatch.setattr(kernels, "pick", triton_everywhere)
    mlp = compact_mlp(activations, "2:4", torch.float32, activation_wgrad=wgrad)
    x = mlp_input(35, torch.float32)
    y, bias = mlp(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    (y + bias).backward(dy)
    ref = masked_mlp_reference(mlp, x, dy)
    names = ("y", "dx", "db1", "db2") if wgrad else ("y", "dx", "dw1", "db1", "dw2", "db2")
    got = {"y": y + bias, **grads(mlp, x)}
    for name in names:
        torch.testing.assert_close(got[name].double(), ref[name], rtol=1e-4, atol=1e-4, msg=name)
    assert set(_COMPACT_TRITON) <= ran
    assert ("compact_tokens_triton" in ran) == (wgrad is not None)
