"""The per-optimizer-step weight state: k micro-batches per step see one mask, built once per refresh;
gradients per step equal a float64 reference for every gradient mode; config changes take effect at once;
writes outside the optimizer, other models' optimizers, checkpoints and CUDA graphs never leave a
layer computing with a weight that is not the current one."""

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import megasparse
from megasparse import SparsityConfig
from megasparse.core import warn
from megasparse.core import weight_state
from megasparse.core.backends import DenseBackend
from megasparse.core.masks import follows_pattern, pack_mask
from megasparse.core.masks import weight_mask
from backend_standins import CountingSparseBackend
from megatron_helpers import make_config, make_column, make_mlp, make_row

pytestmark = pytest.mark.usefixtures("megatron_tp1")

MICRO_BATCHES, STEPS, DECAY = 4, 6, 0.05


@pytest.fixture
def mask_calls(monkeypatch):
    """Every mask the state computes (a copy of the weight it pruned)."""
    calls = []
    original = weight_state.compute_mask

    def counting(weight, sparsity, mask_source=None):
        calls.append(weight.detach().clone())
        return original(weight, sparsity, mask_source)

    monkeypatch.setattr(weight_state, "compute_mask", counting)
    return calls


def _expected_grad(mode, mask, weight, xs, dys, decay=DECAY):
    """float64 reference: the step's accumulated gradient of the dense master weight."""
    grad = sum(
        dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1]) for x, dy in zip(xs, dys)
    )
    if mode == "masked":
        grad = grad * mask
    if mode in ("srste", "masked_decay"):  # both: decay * (1 - M) * W once per step
        grad = grad + decay * (~mask) * weight
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


@pytest.mark.parametrize(
    "mask,hold", [("1d", None), ("transposable", None), ("transposable", False)]
)
def test_weight_is_compressed_once_per_step_and_reused_by_every_micro_batch(
    monkeypatch, mask, hold
):
    backend = CountingSparseBackend()  # not "dense": the state treats it as a sparse GPU backend
    monkeypatch.setattr("megasparse.core.sparse_module.resolve_backend", lambda *a, **k: backend)
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
    sparse_roles = {role: sparse for role, sparse, _ in backend.gemms}
    assert sparse_roles == {
        "forward": "weight",
        "input_grad": "weight" if mask == "transposable" else None,
    }


@pytest.mark.parametrize(
    "mask,hold", [("1d", None), ("1d", False), ("transposable", None), ("transposable", False)]
)
def test_roles_the_speed_gate_runs_dense_build_w_times_m_once_per_step(monkeypatch, mask, hold):
    """backend='auto' under the speed gate's dense decision (fewer tokens than its smallest
    bucket): the dense GEMMs run on one W*M per step, not one per forward and backward."""
    from megasparse.core import speed_gate
    from megasparse.core.weight_state import WeightStep

    backend = CountingSparseBackend()
    monkeypatch.setattr("megasparse.core.sparse_module.resolve_backend", lambda *a, **k: backend)
    monkeypatch.setattr(speed_gate, "applies", lambda requested, backend, weight: True)
    builds = []
    masked = WeightStep._masked
    monkeypatch.setattr(WeightStep, "_masked", lambda step: builds.append(1) or masked(step))
    sparsity = SparsityConfig(backend="auto", mask=mask, hold_backward_weight=hold)
    layer = make_column(make_config(), 16, 32, sparsity)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    for step in range(3):
        builds.clear()
        w = (layer.weight * weight_mask(layer.weight, mask)).detach()
        for x, dy in zip(*_micro_batches(g)):
            x = x.requires_grad_(True)
            y, _ = layer(x)
            y.backward(dy)
            torch.testing.assert_close(y.detach(), x.detach() @ w.t() + layer.bias.detach())
            torch.testing.assert_close(x.grad, dy @ w)
        assert len(builds) == 1, step
        opt.step()
    assert backend.compressed == [] and {sparse for _, sparse, _ in backend.gemms} == {None}


@pytest.mark.parametrize("hold", [None, True, False])
def test_1d_mask_holds_w_times_m_for_the_dgrad_unless_told_to_rebuild(monkeypatch, hold):
    """A 1d mask on a sparse backend: the dense dgrad runs on W*M. Held (the default): W*M is built
    (mask unpacked and multiplied) once per optimizer step, by the forward's compression, and every
    micro-batch's backward reuses it; hold_backward_weight=False rebuilds it in each backward."""
    from megasparse.core.weight_state import WeightStep

    backend = CountingSparseBackend()  # not "dense", which holds W*M
    monkeypatch.setattr("megasparse.core.sparse_module.resolve_backend", lambda *a, **k: backend)
    builds, unpacks = [], []
    masked, unpack = WeightStep._masked, weight_state.unpack_mask
    monkeypatch.setattr(WeightStep, "_masked", lambda step: builds.append(1) or masked(step))
    monkeypatch.setattr(weight_state, "unpack_mask", lambda *a: unpacks.append(1) or unpack(*a))
    layer = make_column(make_config(), 16, 32, SparsityConfig(hold_backward_weight=hold))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(5)
    weight_bytes = layer.weight.numel() * layer.weight.element_size()
    for step in range(3):
        builds.clear(), unpacks.clear()
        w = (layer.weight * weight_mask(layer.weight)).detach()  # float64 reference W*M
        for x, dy in zip(*_micro_batches(g)):
            x = x.requires_grad_(True)
            y, _ = layer(x)
            y.backward(dy)
            torch.testing.assert_close(x.grad, dy @ w, rtol=1e-12, atol=1e-12)
        # the forward's compression, then (rebuilding) one more per backward
        assert len(builds) == len(unpacks) == (1 + MICRO_BATCHES if hold is False else 1), step
        held = layer.sparsity_stats()["state_bytes"]
        # held: one weight-sized tensor for the step
        assert held.get("dense") == (None if hold is False else weight_bytes)
        opt.step()
    assert {sparse for role, sparse, _ in backend.gemms if role == "input_grad"} == {None}


class CusparseltSizedBackend(DenseBackend):
    """Compresses to cuSPARSELt's size for a 16-bit 2:4 matrix: numel * 9 / 16 elements (values and
    metadata; PyTorch's cuSPARSELtOps.cpp), so the state's bytes are those of the GPU backend."""

    name = "cusparselt-sized"

    def compress(self, matrix):
        return matrix.new_empty(matrix.numel() * 9 // 16)


@pytest.mark.parametrize(
    "mask,hold,share",
    [
        ("1d", False, 0.625),
        ("transposable", False, 0.625),
        ("transposable", None, 1.1875),
        ("1d", None, 1.625),
    ],
)
def test_state_memory_per_layer_relative_to_the_dense_weight(mask, hold, share):
    """Rebuilding the dgrad operand in each backward: compressed W*M (0.5625x) + bit-packed mask
    (0.0625x); holding it for the step (the default) adds the compressed W^T (transposable,
    +0.5625x) or W*M itself (1d, +1.0x)."""
    weight = torch.randn(64, 128, dtype=torch.bfloat16)
    step = weight_state.SparseWeightState().step(
        weight, SparsityConfig(mask=mask, hold_backward_weight=hold), CusparseltSizedBackend()
    )
    step.compressed()
    step.compressed_t() if mask == "transposable" else step.dense()  # what one backward builds
    held = step.held_bytes()
    weight_bytes = weight.numel() * weight.element_size()
    assert held["mask"] * 16 == weight_bytes  # one bit per 16-bit element
    assert sum(held.values()) / weight_bytes == pytest.approx(share)


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


def _megatron_mlp_with_optimizer(sparsity, overlap, distributed, bf16=False):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    dtype = torch.bfloat16 if bf16 else torch.float32
    cfg = make_config(dtype=dtype, ffn_hidden_size=32, gradient_accumulation_fusion=True, bf16=bf16)
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
            bf16=bf16,
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


def _another_models_optimizer():
    """A step of another model's optimizer: `foreign_step()` (not a step of the MLP's weights)."""
    foreign = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.SGD([foreign], lr=0.1)

    def foreign_step():
        foreign.grad = torch.ones(4)
        optimizer.step()

    return foreign_step


def _ddp_steps(sparsity, mask_calls, overlap, distributed, mode, interval):
    mlp, model, optimizer = _megatron_mlp_with_optimizer(sparsity, overlap, distributed)
    foreign_step = _another_models_optimizer()
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
            if step > 0:  # once Megatron's optimizer is known (it has stepped)
                foreign_step()  # not a step of the MLP's weights: no extra srste term, no refresh
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


# --- writes outside the optimizer: train()/eval(), weights_changed, verify mode -----------------


def _masked_ref(x, weight, bias, mask):
    """float64 x (W*M)^T + b."""
    return x.double() @ (weight.detach().double() * mask).t() + bias.detach().double()


@pytest.mark.parametrize("interval", [1, 3])
def test_ema_validation_swapping_weights_through_data_computes_with_the_current_weight(interval):
    """NeMo's EMA pattern: eval(), swap the EMA weights in through .data, validate, swap back,
    train(). The validation forward computes with the EMA weight and the next training step with
    the trained one (a held mask stays held: only W*M is rebuilt)."""
    layer = make_column(
        make_config(), 16, 32, SparsityConfig(mask_refresh_interval=interval, backend="dense")
    )
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    ema = layer.weight.detach().clone()
    x = torch.randn(3, 16, dtype=torch.float64)
    for _ in range(2):
        opt.zero_grad()
        layer(x)[0].square().sum().backward()
        opt.step()
        ema.mul_(0.5).add_(0.5 * layer.weight.detach())
    y_train, _ = layer(x)
    held, trained = layer.sparsity_mask(), layer.weight.detach().clone()
    layer.eval()
    layer.weight.data.copy_(ema)
    y_val, _ = layer(x)
    mask = weight_mask(ema) if interval == 1 else held
    torch.testing.assert_close(y_val, _masked_ref(x, ema, layer.bias, mask), rtol=0, atol=1e-12)
    layer.weight.data.copy_(trained)
    layer.train()
    y_next, _ = layer(x)
    assert torch.equal(y_next, y_train)


def _train_with_ema_validation(validate: bool, steps: int = 8):
    """A held-mask layer trained with SGD; optionally, after every optimizer step, EMA validation
    through .data (eval, swap in, forward, swap back, train). Returns the training masks and the
    final weight."""
    layer = make_column(make_config(), 16, 32, SparsityConfig(mask_refresh_interval=3))
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    ema = layer.weight.detach().clone() + 0.3 * torch.randn_like(layer.weight)
    x = torch.randn(3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    masks = []
    for _ in range(steps):
        opt.zero_grad()
        layer(x)[0].square().sum().backward()
        masks.append(layer.sparsity_mask())
        opt.step()
        if validate:  # the first forward after the step: at refresh steps it computes the mask
            trained = layer.weight.detach().clone()
            layer.eval()
            layer.weight.data.copy_(ema)
            layer(x)
            layer.weight.data.copy_(trained)
            layer.train()
    return masks, layer.weight.detach().clone()


def test_ema_validation_at_a_refresh_step_does_not_hand_its_mask_to_training():
    """Validation can be the first forward after a refresh step, so the held mask it computes
    comes from the EMA weights; back in training the mask is computed again from the trained
    weight: training equals the same run without validation, bit for bit."""
    masks, weight = _train_with_ema_validation(validate=True)
    ref_masks, ref_weight = _train_with_ema_validation(validate=False)
    assert [torch.equal(a, b) for a, b in zip(masks, ref_masks)] == [True] * len(masks)
    assert torch.equal(weight, ref_weight)


class _TwoLayers(torch.nn.Module):
    def __init__(self, sparsity):
        super().__init__()
        self.up = make_column(make_config(), 16, 32, sparsity)
        self.down = make_row(make_config(), 32, 16, sparsity, seed=1)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)[0]))[0]

    def reference(self, x):
        masks = [weight_mask(layer.weight) for layer in (self.up, self.down)]
        h = torch.relu(_masked_ref(x, self.up.weight, self.up.bias, masks[0]))
        return _masked_ref(h, self.down.weight, self.down.bias, masks[1])


def test_weights_changed_after_a_hand_written_update_through_data():
    model = _TwoLayers(SparsityConfig(backend="dense"))
    x = torch.randn(3, 16, dtype=torch.float64)
    for _ in range(3):
        y = model(x)
        torch.testing.assert_close(y, model.reference(x), rtol=0, atol=1e-12)
        model.zero_grad()
        y.square().sum().backward()
        for p in model.parameters():  # a hand-written SGD step: no optimizer, no version bump
            p.data -= 0.5 * p.grad
        megasparse.weights_changed(model)


def test_verify_mode_names_a_write_that_bypasses_the_version_counter(monkeypatch):
    monkeypatch.setenv("MEGASPARSE_VERIFY_STATE", "1")
    layer = make_column(make_config(), 16, 32, SparsityConfig(backend="dense"))
    x = torch.randn(3, 16, dtype=torch.float64)
    layer(x)
    layer(x)  # the same step, the same weight: no error
    layer.weight.data.mul_(2.0)
    with pytest.raises(
        RuntimeError,
        match=r"MEGASPARSE_VERIFY_STATE=1.*p\.data\.copy_\(ema\).*weights_changed\(model\).*no_grad",
    ):
        layer(x)
    megasparse.weights_changed(layer)
    y, _ = layer(x)
    ref = _masked_ref(x, layer.weight, layer.bias, weight_mask(layer.weight))
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    with torch.no_grad():
        layer.weight.mul_(0.5)  # in place under no_grad: the version counter sees it
    y, _ = layer(x)
    ref = _masked_ref(x, layer.weight, layer.bias, weight_mask(layer.weight))
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("verify", [False, True])
def test_a_reused_step_adds_no_weight_compare_or_host_sync_outside_verify_mode(monkeypatch, verify):
    if verify:
        monkeypatch.setenv("MEGASPARSE_VERIFY_STATE", "1")
    layer = make_column(make_config(), 16, 32, SparsityConfig(backend="dense"))
    x = torch.randn(3, 16, dtype=torch.float64)
    layer(x)  # builds the step
    with _RecordOps() as recorded:
        layer(x)  # reuses it
    checks = {"equal", "_local_scalar_dense", "clone"} & recorded.ops
    assert checks == ({"equal"} if verify else set())


# --- checkpoints: the step count, restored held masks ------------------------------------------


def _train(layer, xs, lr=0.3):
    """SGD steps, one per input; the mask each step computed with."""
    opt = torch.optim.SGD(layer.parameters(), lr=lr)
    masks = []
    for x in xs:
        opt.zero_grad()
        y, _ = layer(x)
        masks.append(layer.sparsity_mask())
        y.square().sum().backward()
        opt.step()
    return masks


def _save_and_load(source, target, checkpoint, tmp_path):
    if checkpoint == "state_dict":
        target.load_state_dict(source.state_dict())
        return
    from megatron.core import dist_checkpointing, parallel_state

    meta = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    dist_checkpointing.save(source.sharded_state_dict("l.", metadata=meta), str(tmp_path))
    loaded = dist_checkpointing.load(target.sharded_state_dict("l.", metadata=meta), str(tmp_path))
    target.load_state_dict({k[len("l.") :]: v for k, v in loaded.items()})


@pytest.mark.parametrize("checkpoint", ["state_dict", "dist"])
def test_run_resumed_in_the_middle_of_a_refresh_interval_equals_the_uninterrupted_run(
    checkpoint, tmp_path
):
    """Interval 3, optimizer-driven steps, saved after 5 steps: masks and weights bit for bit."""
    sparsity = SparsityConfig(mask_refresh_interval=3, backend="dense")
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 16, dtype=torch.float64, generator=g) for _ in range(10)]
    uninterrupted = make_column(make_config(), 16, 32, sparsity)
    expected = _train(uninterrupted, xs)
    first = make_column(make_config(), 16, 32, sparsity)
    masks = _train(first, xs[:5])
    resumed = make_column(make_config(), 16, 32, sparsity, seed=7)  # all from the checkpoint
    _save_and_load(first, resumed, checkpoint, tmp_path)
    masks += _train(resumed, xs[5:])
    for iteration, (got, want) in enumerate(zip(masks, expected)):
        assert torch.equal(got, want), iteration
    assert torch.equal(resumed.weight, uninterrupted.weight)
    assert not torch.equal(expected[5], expected[6])  # refreshed at 6: where a resume could slip


def _without_step_count(layer, checkpoint, monkeypatch):
    """Make `layer` save checkpoints as megasparse did before it saved the step count."""
    if checkpoint == "state_dict":
        original = layer.get_extra_state

        def old_extra_state():
            state = original()
            state.pop("megasparse_step_count")
            return state

        monkeypatch.setattr(layer, "get_extra_state", old_extra_state)
    else:
        original = weight_state.SparseWeightState.sharded_entries

        def old_entries(self, weight, sparsity):
            entries = original(self, weight, sparsity)
            entries["megasparse_refreshed_at"] = entries["megasparse_refreshed_at"][:1].clone()
            return entries

        monkeypatch.setattr(weight_state.SparseWeightState, "sharded_entries", old_entries)


@pytest.mark.parametrize("checkpoint", ["state_dict", "dist"])
def test_checkpoint_without_a_step_count_loads_as_before_with_one_warning(
    checkpoint, tmp_path, monkeypatch
):
    monkeypatch.setattr(warn, "_warned", set())
    sparsity = SparsityConfig(mask_refresh_interval=3, backend="dense")
    xs = [torch.randn(4, 16, dtype=torch.float64) for _ in range(5)]
    saved = make_column(make_config(), 16, 32, sparsity)
    masks = _train(saved, xs)
    _without_step_count(saved, checkpoint, monkeypatch)
    loaded = make_column(make_config(), 16, 32, sparsity, seed=7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _save_and_load(saved, loaded, checkpoint, tmp_path)
        loaded.load_state_dict(loaded.state_dict())  # a second load: no second warning
    assert len([w for w in caught if "no step count" in str(w.message)]) == 1
    state = loaded.weight_state
    assert (state.refreshed_at, state.steps) == (3, 3)  # as before: resumes at the refresh step
    assert torch.equal(state.held_mask(), masks[3]) and torch.equal(loaded.weight, saved.weight)


@pytest.mark.parametrize("checkpoint", ["state_dict", "dist"])
@pytest.mark.parametrize("saved_mask", ["1d mask", "all True"])
def test_a_restored_held_mask_that_is_not_2_4_under_the_layers_rule_is_recomputed(
    checkpoint, saved_mask, tmp_path, monkeypatch
):
    monkeypatch.setattr(warn, "_warned", set())
    x = torch.randn(4, 16, dtype=torch.float64)
    saved = make_column(make_config(), 16, 32, SparsityConfig(mask_refresh_interval=3))
    saved(x)
    if saved_mask == "all True":
        saved.weight_state.held_mask_bits = pack_mask(torch.ones(32, 16, dtype=torch.bool))
    kind = "transposable" if saved_mask == "1d mask" else "1d"
    assert not follows_pattern(saved.weight_state.held_mask(), kind)
    loaded = make_column(
        make_config(), 16, 32, SparsityConfig(mask=kind, mask_refresh_interval=3), seed=7
    )
    _save_and_load(saved, loaded, checkpoint, tmp_path)
    with pytest.warns(UserWarning, match=f"not 2:4 under the layer's rule mask='{kind}'"):
        y, _ = loaded(x)
    mask = weight_mask(loaded.weight, kind)
    assert torch.equal(loaded.sparsity_mask(), mask)
    torch.testing.assert_close(y, _masked_ref(x, loaded.weight, loaded.bias, mask))


# --- the mask rule's key ----------------------------------------------------------------------


def test_a_new_config_at_a_freed_configs_address_is_a_new_mask_rule():
    layer = make_column(
        make_config(), 16, 32, SparsityConfig(mask_refresh_interval=100, backend="dense")
    )
    x = torch.randn(3, 16, dtype=torch.float64)
    layer(x)  # a held 1d mask
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight))
    layer.weight_state.invalidate()  # e.g. a checkpoint load: the step goes, the held mask stays
    freed = id(layer.sparsity)
    layer.sparsity = None  # the old config is freed
    candidates = []
    for _ in range(1000):  # CPython hands the freed address to the next object of that size
        candidates.append(
            SparsityConfig(mask="transposable", mask_refresh_interval=100, backend="dense")
        )
        if id(candidates[-1]) == freed:
            break
    assert id(candidates[-1]) == freed  # the collision this test is about
    layer.sparsity = candidates[-1]
    y, _ = layer(x)
    mask = weight_mask(layer.weight, "transposable")
    assert torch.equal(layer.sparsity_mask(), mask)
    torch.testing.assert_close(y, _masked_ref(x, layer.weight, layer.bias, mask))


# --- other optimizers: only the weight's own optimizer steps its state ------------------------


def _micro_batches(g, k=MICRO_BATCHES):
    xs = [torch.randn(3, 16, dtype=torch.float64, generator=g) for _ in range(k)]
    return xs, [torch.randn(3, 32, dtype=torch.float64, generator=g) for _ in range(k)]


def _other_model_steps(other, other_opt, g):
    """Another model's whole optimizer step (forward, backward, step)."""
    other_opt.zero_grad()
    other(torch.randn(3, 16, dtype=torch.float64, generator=g))[0].sum().backward()
    other_opt.step()


@pytest.mark.parametrize("mode", ["srste", "masked_decay"])
def test_another_optimizer_stepping_between_micro_batches_is_not_a_step_of_this_weight(mode):
    """Per-step terms once per step and held masks counting only the weight's own steps, while
    another model's optimizer steps, the module switches mode and weights_changed is called
    between micro-batches."""
    decay = 2.0**-4  # one float32 value: the product multiplies the bool mask by it first
    sparsity = SparsityConfig(
        gradient=mode,
        srste_decay=decay,
        masked_decay_factor=decay,
        mask_refresh_interval=3,
        backend="dense",
    )
    layer = make_column(make_config(), 16, 32, sparsity)
    other = make_column(make_config(), 16, 32, SparsityConfig(backend="dense"), seed=1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(2)
    mask = None
    for step in range(STEPS):
        weight = layer.weight.detach().clone()
        mask = weight_mask(weight) if step % 3 == 0 else mask
        opt.zero_grad()
        xs, dys = _micro_batches(g)
        for k, (x, dy) in enumerate(zip(xs, dys)):
            y, _ = layer(x)
            torch.testing.assert_close(y, _masked_ref(x, weight, layer.bias, mask))
            y.backward(dy)
            if step > 0:  # (the first step makes the optimizer known: see the next test)
                _other_model_steps(other, other_opt, g)
            if k == 1:
                layer.eval(), layer.train()
                megasparse.weights_changed(layer)
        expected = _expected_grad(mode, mask, weight, xs, dys, decay)
        torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-12, atol=1e-12)
        opt.step()
    assert layer.weight_state.steps == STEPS - 1


def test_interleaving_before_the_weights_optimizer_first_stepped_is_reported():
    sparsity = SparsityConfig(
        gradient="srste", srste_decay=DECAY, mask_refresh_interval=3, backend="dense"
    )
    layer = make_column(make_config(), 16, 32, sparsity)
    other = make_column(make_config(), 16, 32, SparsityConfig(backend="dense"), seed=1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(4)
    xs, dys = _micro_batches(g, 2)
    layer(xs[0])[0].backward(dys[0])
    _other_model_steps(other, other_opt, g)  # counted: the layer's optimizer is not known yet
    layer(xs[1])[0].backward(dys[1])
    opt.step()
    with pytest.warns(UserWarning, match="srste term may have been added more than once"):
        layer(xs[0])
    assert layer.weight_state.steps == 1  # the other optimizer's step is taken back


def test_interleaving_for_a_weight_no_optimizer_holds_warns(monkeypatch):
    """An optimizer that keeps its own main copy (as a precision-aware optimizer does): every step
    counts as the weight's boundary, and an interleaving optimizer gets a clear warning."""
    monkeypatch.setattr(warn, "_warned", set())
    sparsity = SparsityConfig(gradient="srste", srste_decay=DECAY, backend="dense")
    layer = make_column(make_config(), 16, 32, sparsity)
    main = layer.weight.detach().clone().requires_grad_(True)
    main_opt = torch.optim.SGD([main], lr=0.5)
    other = make_column(make_config(), 16, 32, SparsityConfig(backend="dense"), seed=1)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(5)

    def step(interleave):
        xs, dys = _micro_batches(g, 2)
        layer.zero_grad()
        layer(xs[0])[0].backward(dys[0])
        if interleave:
            _other_model_steps(other, other_opt, g)
        layer(xs[1])[0].backward(dys[1])
        main.grad = layer.weight.grad.clone()
        main_opt.step()
        layer.weight.data.copy_(main)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(False), step(False)
        _other_model_steps(other, other_opt, g)  # between steps: not an interleaving
        step(False)
    with pytest.warns(UserWarning, match="no optimizer that has stepped holds a sparse weight"):
        step(True)


def test_a_weight_no_optimizer_holds_is_looked_up_again_only_when_the_optimizers_change(
    monkeypatch,
):
    """Megatron's distributed optimizer on a rank without the weight's shard: every optimizer step
    is the weight's boundary, without scanning the optimizers' param groups at every step."""
    from megasparse.core import step_clock

    lookups = []
    held_by = step_clock._ids_held_by
    monkeypatch.setattr(step_clock, "_ids_held_by", lambda opt: lookups.append(opt) or held_by(opt))
    layer = make_column(make_config(), 16, 32, SparsityConfig(backend="dense"))
    other = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    x = torch.randn(3, 16, dtype=torch.float64)
    layer(x)
    for step in range(1, 11):
        other(torch.randn(2, 4)).sum().backward()
        opt.step()
        layer(x)
        assert layer.weight_state.steps == step  # every step counts while no optimizer holds it
    assert len(lookups) == 1
    opt.add_param_group({"params": [layer.weight]})  # now the weight has an owner
    layer(x)[0].sum().backward()
    opt.step()
    layer(x)
    assert len(lookups) == 2 and layer.weight_state._watch.owned


# --- CUDA graphs ------------------------------------------------------------------------------


def test_cuda_graph_capture_of_a_sparse_layer_is_refused(monkeypatch):
    layer = make_column(make_config(), 16, 32, SparsityConfig(backend="dense"))
    x = torch.randn(3, 16, dtype=torch.float64)
    layer(x)  # warm-up outside the capture, as Megatron's CUDA graphs do
    monkeypatch.setattr(weight_state, "_graph_capture_underway", lambda weight: True)
    with pytest.raises(RuntimeError, match="CUDA graph capture.*stale weight.*out of the captured"):
        layer(x)
    dense = make_column(make_config(), 16, 32, SparsityConfig(weights=None, backend="dense"))
    dense(x)  # nothing sparse in any phase: the parent's forward may be captured


def _dense_phase_modules():
    """Sparse modules of every kind, each with the inputs of one forward."""
    from megatron.core.activations import squared_relu

    from megasparse import SparseGroupedMLP, SparseTEGroupedMLP
    from megasparse.te.linear import sparse_te_class
    from expert_builders import make_expert_inputs, make_experts, make_te_experts
    from te_standins import FakeTELinear

    x = torch.randn(2, 3, 16, dtype=torch.float64)
    weights = SparsityConfig(backend="dense")
    mlp_config = make_config(ffn_hidden_size=32, activation_func=squared_relu)
    activations_only = SparsityConfig(weights=None, activations="2:4", backend="dense")
    expert_x, probs, tokens = make_expert_inputs(torch.float64)
    expert_inputs = (expert_x, tokens, probs)
    return {
        "column": (make_column(make_config(), 16, 32, weights), (x,)),
        "row": (make_row(make_config(), 16, 32, weights), (x,)),
        "mlp with activation sparsity only": (
            make_mlp(mlp_config, 32, None, activations_only),
            (x,),
        ),
        "te linear": (
            sparse_te_class(FakeTELinear)(16, 32, config=make_config(), sparsity=weights),
            (x,),
        ),
        "grouped experts": (make_experts(SparseGroupedMLP, weights), expert_inputs),
        "te grouped experts": (
            make_te_experts(SparseTEGroupedMLP, weights, torch.float64),
            expert_inputs,
        ),
    }


@pytest.mark.parametrize(
    "kind",
    [
        "column",
        "row",
        "mlp with activation sparsity only",
        "te linear",
        "grouped experts",
        "te grouped experts",
    ],
)
def test_cuda_graph_capture_in_a_dense_phase_is_refused(monkeypatch, kind):
    """Megatron captures after a few warm-up steps, maybe within SparsitySchedule's dense warm-up:
    replays run no Python, so they would stay dense once the schedule turns sparsity on."""
    from megasparse import SparsitySchedule

    module, inputs = _dense_phase_modules()[kind]
    schedule = SparsitySchedule(dense_warmup_iters=2, train_iters=10)
    assert schedule.apply(module, 0) == "dense-warmup"
    module(*inputs)  # warm-up outside the capture
    monkeypatch.setattr(weight_state, "_graph_capture_underway", lambda tensor: True)
    with pytest.raises(RuntimeError, match="CUDA graph capture.*dense phase.*out of the captured"):
        module(*inputs)


@pytest.mark.gpu
def test_cuda_graph_capture_of_a_sparse_layer_is_refused_on_the_gpu():
    layer = make_column(
        make_config(dtype=torch.bfloat16), 64, 64, SparsityConfig(backend="dense")
    ).cuda()
    x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        layer(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="CUDA graph capture"):
        with torch.cuda.graph(graph):
            layer(x)


def test_megatron_mixed_precision_main_copies_tie_the_step_to_the_weights_optimizer():
    """bf16 weights under Megatron's mixed-precision optimizer (its inner optimizer steps fp32 main
    copies): another optimizer stepping between micro-batches changes nothing, bit for bit."""
    from megasparse.testing import cpu_megatron

    sparsity = SparsityConfig(gradient="srste", srste_decay=DECAY, backend="dense")
    runs = []
    with cpu_megatron(training=True):
        for interleave in (False, True):
            mlp, model, optimizer = _megatron_mlp_with_optimizer(sparsity, False, False, bf16=True)
            assert mlp.linear_fc1.weight.main_param is not None  # the fp32 main copy
            foreign_step = _another_models_optimizer()
            g = torch.Generator().manual_seed(6)
            grads = []
            for step in range(3):
                model.zero_grad_buffer()
                optimizer.zero_grad()
                for _ in range(MICRO_BATCHES):
                    x = torch.randn(3, 2, 16, generator=g).bfloat16()
                    out, bias = model(x)
                    (out if bias is None else out + bias).float().square().sum().backward()
                    if interleave and step > 0:
                        foreign_step()
                model.finish_grad_sync()
                grads.append(mlp.linear_fc1.weight.main_grad.clone())
                optimizer.step()
            runs.append((grads, mlp.linear_fc1.weight.detach().clone()))
    (grads, weight), (grads_interleaved, weight_interleaved) = runs
    for step, (a, b) in enumerate(zip(grads, grads_interleaved)):
        assert torch.equal(a, b), step
    assert torch.equal(weight, weight_interleaved)


def test_megatron_fsdp_parameters_are_refused_with_the_fix():
    """Megatron-FSDP marks its parameters `__fsdp_param__` and hands out main_grad buckets per
    backward; a sparse weight under it is refused by name, with the supported alternative."""
    weight = torch.nn.Parameter(torch.randn(8, 16))
    setattr(weight, "__fsdp_param__", True)
    with pytest.raises(NotImplementedError, match="Megatron-FSDP.*Use Megatron's DDP"):
        weight_state.SparseWeightState().step(weight, SparsityConfig(), DenseBackend())
