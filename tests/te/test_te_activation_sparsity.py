"""SparseMLP with sparse TE linears (Megatron's TE spec: TELayerNormColumnParallelLinear fc1,
TERowParallelLinear fc2; stand-ins with the wrappers' constructors over TE's classes) and an
activation-sparse FFN, against the float64 reference of the local spec's SparseMLP math
(tests/references/speed_path_reference.py after TE's LayerNorm): 2:4 and V:N:M activations, dense
and 2:4 weights, both-ways weight gradients, forward and every gradient; the bf16 route runs both
GEMMs; a dense phase is TE's own forward; FP8, userbuffers, gated FFNs, FFN shards that cut a group
and an fc2 that is not an MLP's are refused with the fix."""

import dataclasses
from unittest import mock

import pytest
import torch
from megatron.core.activations import squared_relu
from megatron.core.transformer.mlp import MLPSubmodules

from megasparse import SparseMLP, SparsityConfig
from megasparse.config import parse_activation_pattern
from megasparse.kernels import mask_1d_reference
from megasparse.megatron.compat import linear_entry
from megasparse.te import sparse_route
from megasparse.te.linear import sparse_te_class
from megasparse.te.norm import te_normalization
from megatron_helpers import make_config
from speed_path_reference import speed_path_mlp_reference
from te_mlp_standins import TELayerNormColumnParallelLinear, TERowParallelLinear

pytestmark = pytest.mark.usefixtures("megatron_tp1")

SEQ, BATCH, HIDDEN, FFN = 21, 2, 16, 64  # 42 tokens: a short last block of V=64 and of M=16

SparseFc1 = sparse_te_class(TELayerNormColumnParallelLinear)
SparseFc2 = sparse_te_class(TERowParallelLinear)


def _config(dtype=torch.float64, ffn=FFN, tp=1, **overrides):
    overrides.setdefault("activation_func", squared_relu)
    overrides.setdefault("add_bias_linear", True)
    return make_config(tp=tp, dtype=dtype, hidden_size=HIDDEN, ffn_hidden_size=ffn, **overrides)


def _sparsity(activations="2:4", weights="2:4", wgrad=None):
    return SparsityConfig(
        weights=weights, activations=activations, activation_wgrad=wgrad, backend="dense"
    )


def _te_mlp(sparsity, cfg=None, fc2_cls=SparseFc2, seed=0):
    """SparseMLP as sparsify_spec builds it from Megatron's TE spec: fc1 weights only, fc2 all."""
    torch.manual_seed(seed)
    cfg = cfg or _config()
    weights_only = dataclasses.replace(sparsity, activations=None, activation_wgrad=None)
    submodules = MLPSubmodules(
        linear_fc1=linear_entry(SparseFc1, weights_only),
        linear_fc2=linear_entry(fc2_cls, sparsity),
    )
    return SparseMLP(cfg, submodules, ffn_hidden_size=cfg.ffn_hidden_size)


def _hand_built_fc2(sparsity, comm_name):
    """A sparse TERowParallelLinear built outside an MLP (its input not sparsified upstream)."""
    return SparseFc2(
        FFN,
        HIDDEN,
        config=_config(),
        init_method=torch.nn.init.normal_,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=True,
        is_expert=False,
        tp_comm_buffer_name=comm_name,
        sparsity=sparsity,
    )


def _reference(mlp, x, dy, sparsity, weights=None, shards=1):
    """The float64 reference of the FFN after TE's norm (megasparse.te.norm, as TE's LayerNormLinear
    computes it: fp32 math, tested on its own): the local spec's SparseMLP math on the norm's output,
    and the input and norm-parameter gradients through that norm. weights: full (w1, b1, w2, b2),
    else the module's; shards: the ffn shards that select on their own (tensor-parallel ranks)."""
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    x64 = x.detach().double().requires_grad_(True)
    norm = (fc1.layer_norm_weight, fc1.layer_norm_bias)
    ln = te_normalization(fc1, x64)
    w1, b1, w2, b2 = weights or (fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    w1, w2 = w1.detach().double(), w2.detach().double()
    pruned = sparsity.weights is not None
    m1 = mask_1d_reference(w1) if pruned else torch.ones_like(w1)
    m2 = mask_1d_reference(w2) if pruned else torch.ones_like(w2)
    ref = speed_path_mlp_reference(
        ln.detach(),
        w1,
        b1,
        w2,
        b2,
        m1,
        m2,
        sparsity.activation_pattern,
        sparsity.activation_wgrad_pattern,
        shards=shards,
        grad_output=dy,
    )
    ref["dx"], ref["dgamma"], ref["dbeta"] = torch.autograd.grad(ln, (x64, *norm), ref["dx"])
    return ref


def _run(mlp, x, dy):
    x = x.clone().requires_grad_(True)
    y, bias = mlp(x)
    y = y + bias
    y.backward(dy)
    return y, x.grad


def _close(actual, expected, what, tol):
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}"
    )


def _check(mlp, sparsity, seq=SEQ, dtype=torch.float64, tol=1e-10, norm_tol=1e-6):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(seq, BATCH, HIDDEN, generator=g, dtype=torch.float64)
    dy = torch.randn(seq, BATCH, HIDDEN, generator=g, dtype=torch.float64)
    ref = _reference(mlp, x, dy, sparsity)
    y, dx = _run(mlp, x.to(dtype), dy.to(dtype))
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    _close(y, ref["y"], "output", tol)
    _close(dx, ref["dx"], "input grad", max(tol, norm_tol))  # through the fp32 norm
    _close(fc1.weight.grad, ref["dw1"], "fc1 weight grad", tol)
    _close(fc1.bias.grad, ref["db1"], "fc1 bias grad", tol)
    _close(fc1.layer_norm_weight.grad, ref["dgamma"], "norm weight grad", max(tol, norm_tol))
    _close(fc1.layer_norm_bias.grad, ref["dbeta"], "norm bias grad", max(tol, norm_tol))
    _close(fc2.weight.grad, ref["dw2"], "fc2 weight grad", tol)
    _close(fc2.bias.grad, ref["db2"], "fc2 bias grad", tol)
    return ref


class _RouteCalls:
    """The sparse linear ops the bf16 route runs, with what fc2 received."""

    def __init__(self):
        self.inputs = []

    def __enter__(self):
        real = sparse_route.sparse_linear_step

        def recorded(x, *args):
            self.inputs.append(x)
            return real(x, *args)

        self._patch = mock.patch.object(sparse_route, "sparse_linear_step", recorded)
        self._patch.__enter__()
        return self

    def __exit__(self, *exc):
        self._patch.__exit__(*exc)


CASES = [  # (activations, weights, activation_wgrad)
    ("2:4", None, None),
    ("2:4", "2:4", None),
    ("64:2:16", None, None),
    ("64:2:16", "2:4", None),
    ("64:4:16", "2:4", "64:4:8"),
]


@pytest.mark.parametrize("activations,weights,wgrad", CASES)
def test_te_sparse_mlp_matches_the_float64_reference(activations, weights, wgrad):
    from megasparse.core.sparse_operand import sparse_pattern

    sparsity = _sparsity(activations, weights, wgrad)
    mlp = _te_mlp(sparsity)
    assert mlp.linear_fc2.input_sparsified_upstream and mlp.linear_fc1._fed_fc2() is mlp.linear_fc2
    with _RouteCalls() as calls:
        _check(mlp, sparsity)
    # both GEMMs ran megasparse's op; fc2's operand was the activation as the sparsifier marked it
    assert len(calls.inputs) == 2
    assert sparse_pattern(calls.inputs[1]) == parse_activation_pattern(activations)
    stats = mlp.activation_stats()
    assert stats["elements"] == SEQ * BATCH * FFN  # counted once, by the activation


def _tp2_worker():
    import torch.distributed as dist
    from megatron_helpers import full_mlp_tensors

    rank, tp = dist.get_rank(), dist.get_world_size()
    seq = 22  # 44 tokens: ragged for V=64 and M=16, split evenly over 2 sequence-parallel ranks
    t = full_mlp_tensors(seq, BATCH, HIDDEN, FFN)
    cols = slice(rank * FFN // tp, (rank + 1) * FFN // tp)
    for sequence_parallel in (False, True):
        rows = slice(rank * seq // tp, (rank + 1) * seq // tp) if sequence_parallel else slice(None)
        for activations, weights, wgrad in (CASES[1], CASES[2], CASES[4]):
            where = f"rank {rank} sp={sequence_parallel} {activations} {weights} {wgrad}"
            sparsity = _sparsity(activations, weights, wgrad)
            cfg = _config(tp=tp, sequence_parallel=sequence_parallel)
            mlp = _te_mlp(sparsity, cfg)
            fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
            with torch.no_grad():
                fc1.weight.copy_(t["w1"][cols]), fc1.bias.copy_(t["b1"][cols])
                fc2.weight.copy_(t["w2"][:, cols]), fc2.bias.copy_(t["b2"])
            full = (t["w1"], t["b1"], t["w2"], t["b2"])
            ref = _reference(mlp, t["x"], t["dy"], sparsity, full, shards=tp)
            with _RouteCalls() as calls:
                y, dx = _run(mlp, t["x"][rows], t["dy"][rows])
            assert len(calls.inputs) == 2, where
            tol = 1e-6  # the norm's fp32 math sits before everything
            _close(y, ref["y"][rows], f"{where} output", tol)
            _close(dx, ref["dx"][rows], f"{where} input grad", tol)
            _close(fc1.weight.grad, ref["dw1"][cols], f"{where} fc1 weight grad", tol)
            _close(fc1.bias.grad, ref["db1"][cols], f"{where} fc1 bias grad", tol)
            _close(fc2.weight.grad, ref["dw2"][:, cols], f"{where} fc2 weight grad", tol)
            replicated = {  # each rank's share of its tokens under SP (Megatron sums them later)
                "fc2 bias": (fc2.bias.grad, ref["db2"]),
                "norm weight": (fc1.layer_norm_weight.grad, ref["dgamma"]),
                "norm bias": (fc1.layer_norm_bias.grad, ref["dbeta"]),
            }
            for name, (grad, expected) in replicated.items():
                grad = grad.clone()
                if sequence_parallel:
                    dist.all_reduce(grad)
                close_tol = tol if name == "fc2 bias" else 2e-5  # sums of the fp32 norm's terms
                _close(grad, expected, f"{where} {name} grad", close_tol)


def test_tp2_and_sequence_parallel_select_per_shard_and_match_the_reference():
    from megasparse.testing import run_distributed

    run_distributed(_tp2_worker, world_size=2, tensor_model_parallel_size=2)


def test_te_sparse_mlp_in_float32_matches_the_float64_reference():
    sparsity = _sparsity("64:2:16", "2:4")
    _check(_te_mlp(sparsity, _config(torch.float32)), sparsity, dtype=torch.float32, tol=2e-4)


def test_te_sparse_mlp_with_no_tokens():
    sparsity = _sparsity("64:4:16", "2:4", "64:4:8")
    mlp = _te_mlp(sparsity)
    x = torch.randn(0, BATCH, HIDDEN, dtype=torch.float64, requires_grad=True)
    y, bias = mlp(x)
    (y + bias).sum().backward()
    assert y.shape == (0, BATCH, HIDDEN) and x.grad.shape == x.shape
    for p in (mlp.linear_fc1.weight, mlp.linear_fc2.weight, mlp.linear_fc1.layer_norm_weight):
        assert torch.count_nonzero(p.grad) == 0  # no tokens, no gradient


def test_hand_built_te_fc2_sparsifies_its_own_input_on_the_route():
    sparsity = _sparsity("64:2:16", None)
    fc2 = _hand_built_fc2(sparsity, "fc2")
    a = torch.relu(torch.randn(SEQ * BATCH, FFN, dtype=torch.float64)).requires_grad_(True)
    with _RouteCalls() as calls:
        y, _ = fc2(a)
    assert len(calls.inputs) == 1
    pattern = parse_activation_pattern("64:2:16")
    v, n, m = pattern
    from megasparse.kernels import activation_sparsify_reference

    mask = activation_sparsify_reference(a.detach(), v, m, False, n=n)[1]
    expected = (a.detach() * mask) @ fc2.weight.detach().t()
    _close(y, expected, "output", 1e-10)
    dy = torch.randn_like(y)
    y.backward(dy)
    _close(a.grad, (dy @ fc2.weight.detach()) * mask, "input grad", 1e-10)
    assert fc2.activation_stats()["elements"] == SEQ * BATCH * FFN


def test_dense_phase_is_tes_own_forward():
    sparsity = _sparsity("2:4", "2:4")
    mlp = _te_mlp(sparsity)
    for linear in (mlp.linear_fc1, mlp.linear_fc2):
        linear.sparsity.enabled = False
    dense = _sparsity(None, None)
    with _RouteCalls() as calls:
        _check(mlp, dense)
    assert calls.inputs == []  # no route: TE's own GEMMs on the dense weights


def test_fp8_with_activation_sparsity_is_refused_at_construction_and_forward():
    with pytest.raises(NotImplementedError, match="config.fp8='hybrid'.*drop --fp8-format"):
        _te_mlp(_sparsity("2:4"), _config(fp8="hybrid"))
    _te_mlp(_sparsity(None, "2:4"), _config(fp8="hybrid"))  # FP8 with 2:4 weights only: built
    mlp = _te_mlp(_sparsity("2:4"))
    x = torch.randn(4, 1, HIDDEN, dtype=torch.float64)
    with mock.patch("megasparse.te.fp8_route.te_fp8_state", return_value=(True, None)):
        with pytest.raises(NotImplementedError, match="fp8_autocast is on.*activations=None"):
            mlp(x)
    mlp(x)  # without fp8_autocast it runs
    mlp.linear_fc2.sparsity.enabled = mlp.linear_fc1.sparsity.enabled = False
    with mock.patch("megasparse.te.fp8_route.te_fp8_state", return_value=(True, None)):
        mlp(x)  # a dense phase under fp8_autocast: TE's own (FP8) forward, nothing sparse


class _OverlappedFc2(TERowParallelLinear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ub_overlap_rs_fprop = True  # as TE sets it under --tp-comm-overlap


def test_userbuffers_overlap_with_activation_sparsity_is_refused():
    with pytest.raises(NotImplementedError, match="ub_overlap_rs_fprop.*--tp-comm-overlap"):
        _te_mlp(_sparsity("2:4"), fc2_cls=sparse_te_class(_OverlappedFc2))
    mlp = _te_mlp(_sparsity(None))
    mlp.linear_fc1.ub_overlap_ag_fprop = True
    with pytest.raises(NotImplementedError, match="ub_overlap_ag_fprop"):
        mlp.linear_fc1.feeds_sparse_activation_of(_te_mlp(_sparsity("2:4")).linear_fc2)


def test_te_fc2_checks_what_the_local_fc2_checks():
    with pytest.raises(ValueError, match="groups 16 FFN columns.*gives 40 per rank.*16\\*TP=16"):
        _te_mlp(_sparsity("64:2:16"), _config(ffn=40))
    with pytest.raises(ValueError, match="non-gated.*gated_linear_unit=True"):
        _te_mlp(_sparsity("2:4"), _config(gated_linear_unit=True))
    with pytest.raises(ValueError, match="tp_comm_buffer_name='proj'.*or set activations=None"):
        _hand_built_fc2(_sparsity("2:4"), "proj")


def test_only_linears_over_tes_linear_take_an_activation_side():
    from megasparse.megatron.activation_input import FeedsSparseActivation, SparseActivationInput
    from te_standins import TEGroupedLinearLike

    class TERowParallelGroupedLinear(TEGroupedLinearLike):  # Megatron's experts' fc2 (its name)
        pass

    grouped = sparse_te_class(TERowParallelGroupedLinear)(2, 64, 32, sparsity=SparsityConfig())
    assert not isinstance(grouped, (SparseActivationInput, FeedsSparseActivation))
    assert issubclass(SparseFc2, SparseActivationInput) and issubclass(
        SparseFc1, FeedsSparseActivation
    )
