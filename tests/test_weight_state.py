"""The per-optimizer-step weight state: k micro-batches per step see one mask, built once per refresh;
gradients per step equal a float64 reference for every gradient mode; config changes take effect at once."""

import pytest
import torch

from megasparse import SparsityConfig, weight_state
from megasparse.backends import DenseBackend
from megasparse.ops import weight_mask
from megatron_helpers import make_config, make_column, make_mlp

pytestmark = pytest.mark.usefixtures("megatron_tp1")

MICRO_BATCHES, STEPS, DECAY = 4, 6, 0.05


@pytest.fixture
def mask_calls(monkeypatch):
    """Every mask the state computes (a copy of the weight it pruned)."""
    calls = []
    original = weight_state.compute_mask

    def counting(weight, sparsity):
        calls.append(weight.detach().clone())
        return original(weight, sparsity)

    monkeypatch.setattr(weight_state, "compute_mask", counting)
    return calls


def _expected_grad(mode, mask, weight, xs, dys):
    """float64 reference: the step's accumulated gradient of the dense master weight."""
    grad = sum(
        dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1]) for x, dy in zip(xs, dys)
    )
    if mode == "masked":
        grad = grad * mask
    if mode == "srste":
        grad = grad + DECAY * (~mask) * weight
    return grad


@pytest.mark.parametrize("interval", [1, 3])
@pytest.mark.parametrize("mode", ["ste", "masked", "srste"])
def test_k_micro_batches_share_one_mask_and_gradient_terms_apply_once_per_step(
    mask_calls, mode, interval
):
    layer = make_column(
        make_config(),
        16,
        32,
        SparsityConfig(
            gradient=mode, srste_decay=DECAY, mask_refresh_interval=interval, backend="dense"
        ),
    )
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(0)
    mask = None
    for step in range(STEPS):
        weight = layer.weight.detach().clone()
        refresh = step % interval == 0
        mask = weight_mask(weight) if refresh else mask
        calls_before = len(mask_calls)
        opt.zero_grad()
        xs = [torch.randn(3, 2, 16, dtype=torch.float64, generator=g) for _ in range(MICRO_BATCHES)]
        dys = [
            torch.randn(3, 2, 32, dtype=torch.float64, generator=g) for _ in range(MICRO_BATCHES)
        ]
        for x, dy in zip(xs, dys):
            y, _ = layer(x)
            # every micro-batch computes with the step's mask (never two masks in one step)
            torch.testing.assert_close(
                y, x @ (weight * mask).t() + layer.bias, rtol=1e-12, atol=1e-12
            )
            y.backward(dy)
        assert len(mask_calls) - calls_before == (1 if refresh else 0), step
        expected = _expected_grad(mode, mask, weight, xs, dys)
        torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-12, atol=1e-12)
        opt.step()
    assert not torch.equal(weight_mask(layer.weight), weight_mask(mask_calls[0]))  # masks did move


class CountingBackend(DenseBackend):
    """The dense backend, counting compressions and which operand each GEMM was told is sparse."""

    def __init__(self):
        self.compressed, self.gemms = [], []

    def compress(self, matrix):
        self.compressed.append(tuple(matrix.shape))
        return matrix.clone()

    def linear(self, x2d, w, bias, sparse):
        self.gemms.append(("forward", sparse))
        return super().linear(x2d, w, bias, sparse)

    def input_grad(self, dy2d, w, sparse):
        self.gemms.append(("input_grad", sparse))
        return super().input_grad(dy2d, w, sparse)


@pytest.mark.parametrize(
    "mask,hold", [("1d", None), ("transposable", None), ("transposable", False)]
)
def test_weight_is_compressed_once_per_step_and_reused_by_every_micro_batch(
    monkeypatch, mask, hold
):
    backend = CountingBackend()
    backend.name = "counting"  # not "dense": the state treats it as a sparse GPU backend
    monkeypatch.setattr("megasparse.layers.resolve_backend", lambda *a, **k: backend)
    layer = make_column(make_config(), 16, 32, SparsityConfig(mask=mask, hold_backward_weight=hold))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for step in range(3):
        backend.compressed.clear()
        for _ in range(MICRO_BATCHES):
            y, _ = layer(torch.randn(3, 2, 16, dtype=torch.float64, requires_grad=True))
            y.sum().backward()
        forward_compressions = backend.compressed.count((32, 16))
        transposed = backend.compressed.count((16, 32))
        assert forward_compressions == 1, step
        if mask == "transposable":  # held: once per step; rebuilt: once per backward
            assert transposed == (1 if hold is None else MICRO_BATCHES), step
        else:
            assert transposed == 0  # a 1d mask's W^T is not 2:4: the dgrad GEMM stays dense
        opt.step()
    sparse_roles = {role: sparse for role, sparse in backend.gemms}
    assert sparse_roles == {
        "forward": "weight",
        "input_grad": "weight" if mask == "transposable" else None,
    }


class CusparseltSizedBackend(DenseBackend):
    """Compresses to cuSPARSELt's size for a 16-bit 2:4 matrix: numel * 9 / 16 elements (values and
    metadata; PyTorch's cuSPARSELtOps.cpp), so the state's bytes are those of the GPU backend."""

    name = "cusparselt-sized"

    def compress(self, matrix):
        return matrix.new_empty(matrix.numel() * 9 // 16)


@pytest.mark.parametrize(
    "mask,hold,bound",
    [("1d", None, 0.65), ("transposable", False, 0.65), ("transposable", None, 1.22)],
)
def test_state_memory_per_layer_relative_to_the_dense_weight(mask, hold, bound):
    """1d: compressed W*M (0.5625x) + bit-packed mask (0.0625x) <= 0.65x; transposable rebuilding W^T in
    the backward: the same; holding the compressed W^T for the step: + 0.5625x."""
    weight = torch.randn(64, 128, dtype=torch.bfloat16)
    step = weight_state.SparseWeightState().step(
        weight, SparsityConfig(mask=mask, hold_backward_weight=hold), CusparseltSizedBackend()
    )
    step.compressed()
    step.compressed_t() if mask == "transposable" else step.dense()  # what one backward builds
    held = step.held_bytes()
    weight_bytes = weight.numel() * weight.element_size()
    assert held["mask"] * 16 == weight_bytes  # one bit per 16-bit element
    assert sum(held.values()) / weight_bytes == pytest.approx(
        bound - 0.025 if bound < 1 else 1.1875
    )
    assert sum(held.values()) / weight_bytes <= bound


def test_toggling_enabled_or_mask_uses_the_current_weight_at_the_next_forward(mask_calls):
    layer = make_column(
        make_config(), 16, 32, SparsityConfig(mask_refresh_interval=100, backend="dense")
    )
    x = torch.randn(3, 16, dtype=torch.float64)
    layer(x)
    held = layer.sparsity_mask()
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight))  # the dense phase moves the weights
    layer.sparsity.enabled = False
    layer(x)
    layer.sparsity.enabled = True  # re-enabled without a schedule: the held mask must not come back
    y, _ = layer(x)
    fresh = weight_mask(layer.weight)
    assert not torch.equal(held, fresh) and torch.equal(layer.sparsity_mask(), fresh)
    torch.testing.assert_close(y, x @ (layer.weight * fresh).t() + layer.bias)
    layer.sparsity.mask = (
        "transposable"  # a new rule applies at the next forward, not at the next refresh
    )
    y, _ = layer(x)
    transposable = weight_mask(layer.weight, "transposable")
    assert torch.equal(layer.sparsity_mask(), transposable)
    torch.testing.assert_close(y, x @ (layer.weight * transposable).t() + layer.bias)
    layer.sparsity.enabled = False  # toggled twice between two forwards: still a new rule
    layer.sparsity.enabled = True
    calls = len(mask_calls)
    layer(x)
    assert len(mask_calls) == calls + 1


def test_fc1_follows_a_replaced_fc2_config():
    """fc1 reads fc2's current config: replacing fc2.sparsity turns the sparse dH path off at once."""
    cfg = make_config(ffn_hidden_size=32)
    sparse = SparsityConfig(weights=None, activations="2:4", backend="dense")
    mlp = make_mlp(cfg, 32, SparsityConfig(weights=None, backend="dense"), sparse)
    assert mlp.linear_fc1._sparse_input_now()
    mlp.linear_fc2.sparsity = SparsityConfig(weights=None, backend="dense")
    assert not mlp.linear_fc1._sparse_input_now()


def _megatron_mlp_with_optimizer(sparsity, overlap, distributed):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cfg = make_config(dtype=torch.float32, ffn_hidden_size=32, gradient_accumulation_fusion=True)
    mlp = make_mlp(cfg, 32, sparsity, sparsity)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=overlap, use_distributed_optimizer=distributed
    )
    model = DistributedDataParallel(cfg, ddp_config, mlp)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=0.05,
            weight_decay=0.0,
            clip_grad=0.0,
            bf16=False,
            fp16=False,
            use_distributed_optimizer=distributed,
        ),
        [model],
    )
    return mlp, model, optimizer


@pytest.mark.parametrize(
    "overlap,distributed", [(False, False), (True, False), (True, True), (False, True)]
)
@pytest.mark.parametrize("mode,interval", [("srste", 1), ("masked", 3)])
def test_megatron_ddp_and_optimizer_find_the_step_without_user_calls(
    mask_calls, overlap, distributed, mode, interval
):
    from megasparse.testing import cpu_megatron

    sparsity = SparsityConfig(
        gradient=mode, srste_decay=DECAY, mask_refresh_interval=interval, backend="dense"
    )
    with cpu_megatron(
        training=True
    ):  # Megatron's optimizers and DDP buffers hard-code device="cuda"
        _ddp_steps(sparsity, mask_calls, overlap, distributed, mode, interval)


def _ddp_steps(sparsity, mask_calls, overlap, distributed, mode, interval):
    mlp, model, optimizer = _megatron_mlp_with_optimizer(sparsity, overlap, distributed)
    fc1 = mlp.linear_fc1
    g = torch.Generator().manual_seed(1)
    mask = None
    for step in range(4):
        weight = fc1.weight.detach().clone().double()
        refresh = step % interval == 0
        mask = weight_mask(weight) if refresh else mask
        calls_before = len(mask_calls)
        model.zero_grad_buffer()
        optimizer.zero_grad()
        xs, dhs = [], []

        def capture(module, args, output):  # fc1's input and, in the backward, its output gradient
            xs.append(args[0].detach().double())
            output[0].register_hook(lambda grad: dhs.append(grad.detach().double()))

        handle = fc1.register_forward_hook(capture)
        for k in range(MICRO_BATCHES):
            out, bias = model(torch.randn(3, 2, 16, generator=g))
            out = (
                out if bias is None else out + bias
            )  # every parameter gets its gradient (DDP's hooks)
            if (
                k < MICRO_BATCHES - 1
            ):  # as Megatron's schedules: reduce only after the last micro-batch
                with model.no_sync():
                    out.square().sum().backward()
            else:
                out.square().sum().backward()
        handle.remove()
        model.finish_grad_sync()
        assert len(mask_calls) - calls_before == 2 * (1 if refresh else 0), (
            step
        )  # fc1 and fc2, once each
        fresh_fc1_mask = fc1.sparsity_mask()
        assert torch.equal(fresh_fc1_mask, mask), (
            step
        )  # the mask every micro-batch of the step used
        expected = _expected_grad(mode, mask, weight, xs, dhs)
        torch.testing.assert_close(fc1.weight.main_grad.double(), expected, rtol=1e-5, atol=1e-5)
        optimizer.step()
        assert not torch.equal(
            fc1.weight.detach().double(), weight
        )  # the step reached the model weights
