"""GPU-only paths: Triton mask kernels on CUDA and the cuSPARSELt / CUTLASS backends against dense.

Marked `gpu`: skipped without CUDA. Tolerances are those of bf16/fp16 GEMMs with fp32 accumulation.
"""

import pytest
import torch

from megasparse import SparsityConfig
from megasparse.core.backends import BACKENDS, resolve_backend
from megasparse.kernels import (
    mask_1d_reference,
    mask_1d_triton,
    mask_transposable_reference,
    mask_transposable_triton,
)
from megasparse.core.linear_op import LinearPlan, sparse_linear
from megasparse.core.masks import weight_mask
from reference import masked_linear_reference

pytestmark = pytest.mark.gpu


def _skip_cutlass_off_sm8x(backend):
    if backend == "cutlass" and torch.cuda.get_device_capability()[0] != 8:
        pytest.skip(
            "PyTorch's CUTLASS 2:4 kernels are sm8x only (megasparse refuses them elsewhere)"
        )


def test_cutlass_is_refused_off_sm8x_and_auto_falls_back_for_fp32():
    w = torch.randn(256, 512, device="cuda")
    if torch.cuda.get_device_capability()[0] != 8:
        with pytest.raises(RuntimeError, match="sm8x only"):
            resolve_backend("cutlass", w.bfloat16(), transposable=False)
    with pytest.warns(UserWarning, match="dense masked GEMM"):
        assert resolve_backend("auto", w, transposable=False).name == "dense"  # fp32: no 2:4 kernel


def test_zero_token_expert_on_the_sparse_backend(megatron_tp1):
    from megatron_helpers import make_column, make_config

    layer = make_column(
        make_config(dtype=torch.bfloat16), 512, 256, SparsityConfig(mask="transposable")
    ).cuda()
    x = torch.zeros(0, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y, _ = layer(x)
    y.sum().backward()
    assert y.shape == (0, 256) and x.grad.shape == (0, 512)


def test_wgrad_fusion_accumulates_into_main_grad_on_cuda():
    """The fused addmm(out_dtype=float32, out=main_grad) path equals the fp32 reference."""
    x = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w.main_grad = torch.ones(256, 128, device="cuda")
    w.grad_added_to_main_grad = False
    dy = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    plan = LinearPlan(BACKENDS["dense"], gradient_accumulation_fusion=True)
    sparse_linear(x, w, None, weight_mask(w), plan).backward(dy)
    expected = 1 + dy.float().t() @ x.float()
    torch.testing.assert_close(w.main_grad, expected, rtol=1e-3, atol=1e-2)
    assert w.grad_added_to_main_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_masks_on_cuda_match_reference(dtype):
    w = torch.randn(1024, 2048, device="cuda").to(dtype)
    assert torch.equal(mask_1d_triton(w), mask_1d_reference(w))
    assert torch.equal(mask_transposable_triton(w), mask_transposable_reference(w))


@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
@pytest.mark.parametrize("mask_kind", ["1d", "transposable"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [256, 200])
def test_cuda_backend_matches_dense_reference(backend, mask_kind, dtype, tokens):
    _skip_cutlass_off_sm8x(backend)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, 512, device="cuda", generator=g).to(dtype)
    w = torch.randn(256, 512, device="cuda", generator=g).to(dtype)
    b = torch.randn(256, device="cuda", generator=g).to(dtype)
    mask = weight_mask(w, mask_kind)
    chosen = resolve_backend(backend, w, mask_kind == "transposable")
    assert chosen is BACKENDS[backend]
    xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, b))
    y = sparse_linear(xr, wr, br, mask, LinearPlan(chosen, mask_kind == "transposable"))
    ref = masked_linear_reference(x.cpu(), w.cpu(), b.cpu(), mask.cpu())
    y.backward(ref["dy"].to("cuda", dtype))
    tol = dict(rtol=3e-2, atol=3e-1)
    torch.testing.assert_close(y.double().cpu(), ref["y"], **tol)
    torch.testing.assert_close(xr.grad.double().cpu(), ref["dx"], **tol)
    torch.testing.assert_close(wr.grad.double().cpu(), ref["dw"], rtol=3e-2, atol=1.0)
    torch.testing.assert_close(br.grad.double().cpu(), ref["db"], **tol)


@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_sparse_backend_reads_a_sliced_x_and_an_expanded_dy_right(backend):
    """x a column slice of a wider tensor and dY the expanded ones of .sum().backward() (neither
    row- nor column-major): the same result as the float64 masked linear."""
    _skip_cutlass_off_sm8x(backend)
    g = torch.Generator(device="cuda").manual_seed(1)
    wide = torch.randn(200, 576, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randn(256, 512, device="cuda", generator=g).to(torch.bfloat16)
    mask = weight_mask(w, "transposable")
    x = wide.clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    plan = LinearPlan(resolve_backend(backend, w, True), True)
    y = sparse_linear(x[:, :512], wr, None, mask, plan)
    y.sum().backward()
    wm = (w * mask).double()
    torch.testing.assert_close(y.double(), wide[:, :512].double() @ wm.t(), rtol=3e-2, atol=3e-1)
    dx = torch.ones(200, 256, device="cuda", dtype=torch.float64) @ wm
    torch.testing.assert_close(x.grad[:, :512].double(), dx, rtol=3e-2, atol=3e-1)
    assert (x.grad[:, 512:] == 0).all()


def test_auto_picks_a_sparse_backend_on_sm80_plus():
    w = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs sm80+")
    assert resolve_backend("auto", w, transposable=True).name in ("cusparselt", "cutlass")


def test_layer_on_cuda_matches_reference(megatron_tp1):
    from megatron_helpers import make_column, make_config

    layer = make_column(
        make_config(dtype=torch.bfloat16), 512, 256, SparsityConfig(mask="transposable")
    ).cuda()
    x = torch.randn(16, 8, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y, _ = layer(x)
    ref = masked_linear_reference(
        x.cpu(), layer.weight.cpu(), layer.bias.cpu(), layer.sparsity_mask().cpu()
    )
    torch.testing.assert_close(y.double().cpu(), ref["y"], rtol=3e-2, atol=3e-1)


@pytest.mark.parametrize("pattern", [(64, 2, 4), (64, 2, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_activation_kernel_on_cuda_matches_reference_exactly(pattern, dtype):
    from megasparse.kernels import activation_sparsify_reference, activation_sparsify_triton

    x = torch.randn(1000, 1024, device="cuda").to(dtype)
    got = activation_sparsify_triton(x, *pattern, True)
    ref = activation_sparsify_reference(x, *pattern, True)
    for a, b in zip(got[:3], ref[:3]):
        assert torch.equal(a, b)
    torch.testing.assert_close(got[3], ref[3], rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_sparse_activation_operands_on_cuda_match_dense(backend):
    """2:4 activation as the forward operand of a dense-weight fc2, and a 2:4 dH in fc1's input gradient."""
    from megasparse.kernels import activation_sparsify_triton
    from megasparse.core.sparse_operand import ACTIVATION, GRAD_OUTPUT

    _skip_cutlass_off_sm8x(backend)
    g = torch.Generator(device="cuda").manual_seed(0)
    pre = torch.randn(512, 1024, device="cuda", generator=g, dtype=torch.bfloat16)
    a, mask, _, _ = activation_sparsify_triton(pre, 64, 4, True)
    w2 = torch.randn(256, 1024, device="cuda", generator=g, dtype=torch.bfloat16)
    chosen = BACKENDS[backend]
    y = chosen.linear(a, w2, None, ACTIVATION)
    torch.testing.assert_close(y.double(), a.double() @ w2.double().t(), rtol=3e-2, atol=3e-1)
    w1 = torch.randn(1024, 256, device="cuda", generator=g, dtype=torch.bfloat16)
    dh = torch.where(mask, torch.randn_like(a), 0)
    dx = chosen.input_grad(dh, w1, GRAD_OUTPUT)
    torch.testing.assert_close(dx.double(), dh.double() @ w1.double(), rtol=3e-2, atol=3e-1)


def test_sparse_te_grouped_mlp_with_transformer_engine(megatron_tp1):
    """The real TE grouped linears (needs CUDA and Transformer Engine): sparse forward equals the masked reference."""
    pytest.importorskip("transformer_engine", reason="Transformer Engine is not installed")
    from megatron.core.activations import squared_relu
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelGroupedLinear,
        TERowParallelGroupedLinear,
    )
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe import experts as mcore_experts
    from megatron_helpers import make_config

    from megasparse import SparseTEGroupedMLP

    submodules_cls = (
        getattr(mcore_experts, "GroupedMLPSubmodules", None) or mcore_experts.MLPSubmodules
    )
    cfg = make_config(
        dtype=torch.bfloat16,
        hidden_size=256,
        ffn_hidden_size=512,
        moe_ffn_hidden_size=512,
        num_moe_experts=4,
        activation_func=squared_relu,
        add_bias_linear=False,
        bf16=True,
    )
    experts = SparseTEGroupedMLP(
        4,
        cfg,
        submodules_cls(
            linear_fc1=TEColumnParallelGroupedLinear, linear_fc2=TERowParallelGroupedLinear
        ),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        sparsity=SparsityConfig(activations="2:4"),
    ).cuda()
    tokens = torch.tensor([64, 0, 32, 96])
    x = torch.randn(int(tokens.sum()), 256, device="cuda", dtype=torch.bfloat16)
    probs = torch.rand(x.shape[0], device="cuda", dtype=torch.bfloat16)
    y, _ = experts(x, tokens, probs)
    start = 0
    for e, n in enumerate(tokens.tolist()):
        w1 = getattr(experts.linear_fc1, f"weight{e}")
        w2 = getattr(experts.linear_fc2, f"weight{e}")
        ref = sparse_mlp_reference_cpu(x[start : start + n], w1, w2, probs[start : start + n])
        torch.testing.assert_close(y[start : start + n].double().cpu(), ref, rtol=5e-2, atol=5e-1)
        start += n


def sparse_mlp_reference_cpu(x, w1, w2, probs):
    from reference import sparse_mlp_reference

    m1, m2 = weight_mask(w1.float().cpu()), weight_mask(w2.float().cpu())
    return sparse_mlp_reference(
        x.cpu(),
        w1.cpu(),
        None,
        w2.cpu(),
        None,
        m1,
        m2,
        (64, 2, 4),
        "squared_relu",
        probs=probs.cpu(),
    )["y"]


@pytest.mark.parametrize("mask", ["1d", "transposable"])
def test_local_fp8_layer_on_cuda_matches_its_cpu_emulation(megatron_tp1, mask):
    """The local FP8 path on a GPU (cuSPARSELt FP8 2:4 on sm90, dense FP8 GEMMs elsewhere) gives
    the CPU emulation's output and gradients: same quantized operands, fp32 accumulation."""
    from megatron_helpers import make_column, make_config

    sparsity = SparsityConfig(mask=mask, fp8="hybrid")
    layer = make_column(make_config(dtype=torch.bfloat16), 512, 256, sparsity)
    x = torch.randn(16, 8, 512, dtype=torch.bfloat16)
    dy = torch.randn(16, 8, 256, dtype=torch.bfloat16)
    results = []
    for device in ("cpu", "cuda"):
        layer = layer.to(device)
        layer.weight.grad = None
        xd = x.to(device).requires_grad_(True)
        y, _ = layer(xd)
        y.backward(dy.to(device))
        results.append([t.float().cpu() for t in (y, xd.grad, layer.weight.grad)])
    for cpu, cuda in zip(*results):
        torch.testing.assert_close(cuda, cpu, rtol=2**-7, atol=1e-3)


def test_speed_gate_times_the_real_backend_once_per_bucket(megatron_tp1, tmp_path, monkeypatch):
    """backend='auto' on a GPU: the gate times cuSPARSELt against dense with CUDA events once per
    token bucket (two counts of one bucket: one decision), leaves the global RNG alone, and the
    layer's output and input gradient equal the float64 masked reference whichever way it chose."""
    from megasparse.core import speed_gate
    from megatron_helpers import make_column, make_config

    monkeypatch.setenv(speed_gate.CACHE_ENV, str(tmp_path / "gate.json"))
    monkeypatch.delenv(speed_gate.SWITCH_ENV, raising=False)
    monkeypatch.setattr(speed_gate, "_GATE", None)
    timings = []
    real_timer = speed_gate.cuda_event_timer

    def counting_timer(fn):
        timings.append(fn)
        return real_timer(fn)

    speed_gate.gate().timer = counting_timer
    cfg = SparsityConfig(mask="transposable", backend="auto")
    layer = make_column(make_config(dtype=torch.bfloat16), 1024, 2048, cfg).cuda()
    w = (layer.weight.float() * layer.sparsity_mask()).double()
    for tokens in (4096, 5000):  # one bucket
        rng = torch.cuda.get_rng_state()
        x = torch.randn(tokens, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16)
        rng_after_inputs = torch.cuda.get_rng_state()
        y, _ = layer(x)
        assert torch.equal(torch.cuda.get_rng_state(), rng_after_inputs) and not torch.equal(
            rng, rng_after_inputs
        )
        y.backward(dy)
        y_ref = x.detach().double() @ w.t() + layer.bias.double()
        torch.testing.assert_close(y.double(), y_ref, rtol=2**-7, atol=1e-2)
        torch.testing.assert_close(x.grad.double(), dy.double() @ w, rtol=2**-7, atol=1e-2)
    assert len(timings) == 4  # forward and input gradient, dense and sparse, once
