"""SparseMLP and the MoE experts with compacted V:N:M activations (M >= 8) and both-ways weight
gradients, against the float64 reference (tests/references/speed_path_reference.py): TP=1 and TP=2
with and without sequence parallelism, ragged and empty token counts, uneven and empty experts,
the SparsitySchedule's dense phases, held 2:4 masks of fc1, gated and non-Squared-ReLU FFNs, flags.

What is exact: the activation selection is per block of V tokens and group of M ffn columns, and
the groups never cross a tensor-parallel shard (ffn/TP is a multiple of M), so TP=2 selects what
TP=1 selects. The both-ways token selection is per block of V ffn columns: each rank selects on
its own shard, so it is TP-invariant only when ffn/TP is a multiple of V; the tests compare TP=2
with the reference that selects per shard, and show that it differs from the TP=1 selection here.
"""

import contextlib
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from megasparse import SparseGroupedMLP, SparseSequentialMLP, SparsityConfig
from megasparse.config import parse_activation_pattern
from megasparse.kernels import mask_1d_reference
from megasparse.testing import run_distributed
from speed_path_reference import speed_path_mlp_reference

SEQ, BATCH, HIDDEN, FFN = 42, 2, 16, 64  # 84 tokens: a short last block of 64, of 8 and of 16
CASES = [  # (activations, activation_wgrad)
    ("64:4:16", None),
    ("64:2:8", None),
    ("64:4:16", "64:4:8"),
    ("64:2:8", "64:4:8"),
    ("16:4:8", "16:2:8"),
]


@contextlib.contextmanager
def _compact_gemms():
    """The reduction widths of the compact layout's GEMM calls: [a_c columns of each
    gather_k_matmul] and [output columns of each compact_matmul]."""
    from megasparse.core import compact_activation

    gathers, computes = [], []
    gather, compute = compact_activation.gather_k_matmul, compact_activation.compact_matmul

    def recorded_gather(a_c, *args):
        gathers.append(a_c.shape[1])
        return gather(a_c, *args)

    def recorded_compute(*args):
        out = compute(*args)
        computes.append(out.shape[1])
        return out

    with (
        mock.patch.object(compact_activation, "gather_k_matmul", recorded_gather),
        mock.patch.object(compact_activation, "compact_matmul", recorded_compute),
    ):
        yield gathers, computes


def _kept_tokens(wgrad) -> int:
    """The tokens a both-ways weight gradient reduces over: 4 of every M (all of a short group)."""
    return 4 * -(-SEQ * BATCH // parse_activation_pattern(wgrad).m)


def _full_tensors(seq=SEQ):
    from megatron_helpers import full_mlp_tensors

    return full_mlp_tensors(seq, BATCH, HIDDEN, FFN)


def _mlp(sparsity, tp=1, sequence_parallel=False, dtype=torch.float64, **config):
    from megatron.core.activations import squared_relu
    from megatron_helpers import make_config, make_mlp

    config.setdefault("activation_func", squared_relu)
    cfg = make_config(
        tp=tp,
        sequence_parallel=sequence_parallel,
        dtype=dtype,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        **config,
    )
    return make_mlp(cfg, FFN, sparsity, sparsity)


def _load(mlp, t, cols=slice(None)):
    """This rank's shard of the full weights: fc1 rows and fc2 columns `cols`."""
    from megatron_helpers import load_mlp_shards

    load_mlp_shards(mlp.linear_fc1, mlp.linear_fc2, t, cols)


def _reference(t, activations, wgrad, shards=1, seq=slice(None)):
    m1, m2 = mask_1d_reference(t["w1"]), mask_1d_reference(t["w2"])
    return speed_path_mlp_reference(
        t["x"][seq],
        t["w1"],
        t["b1"],
        t["w2"],
        t["b2"],
        m1,
        m2,
        parse_activation_pattern(activations),
        parse_activation_pattern(wgrad),
        shards=shards,
        grad_output=t["dy"][seq],
    )


def _close(actual, expected, what, tol=1e-10):
    torch.testing.assert_close(
        actual.double(), expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}"
    )


def _forward_backward(mlp, x, dy):
    x = x.clone().requires_grad_(True)
    y, bias = mlp(x)
    y = y + bias
    y.backward(dy)
    return y, x.grad


def _check_mlp(mlp, ref, x, dy, cols=slice(None), seq=slice(None), where="", tol=1e-10):
    y, dx = _forward_backward(mlp, x, dy)
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    _close(y, ref["y"][seq], f"{where} output", tol)
    _close(dx, ref["dx"][seq], f"{where} input grad", tol)
    _close(fc1.weight.grad, ref["dw1"][cols], f"{where} fc1 weight grad", tol)
    _close(fc1.bias.grad, ref["db1"][cols], f"{where} fc1 bias grad", tol)
    _close(fc2.weight.grad, ref["dw2"][:, cols], f"{where} fc2 weight grad", tol)


# -- TP=1 ------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("megatron_tp1")
@pytest.mark.parametrize("activations,wgrad", CASES)
def test_sparse_mlp_matches_float64_reference(activations, wgrad):
    sparsity = SparsityConfig(activations=activations, activation_wgrad=wgrad, backend="dense")
    mlp = _mlp(sparsity)
    t = _full_tensors()
    _load(mlp, t)
    ref = _reference(t, activations, wgrad)
    with _compact_gemms() as (gathers, computes):
        _check_mlp(mlp, ref, t["x"], t["dy"], where=f"{activations} wgrad={wgrad}")
    compact = 4 * FFN // parse_activation_pattern(activations).m
    # fc2 forward and fc1 input gradient gather the chosen columns; fc2's dA computes only them;
    # both ways, dW2 (after fc2's dA) and dW1 gather 4 of every M tokens (the last group short)
    assert computes == [compact]
    if wgrad is None:
        assert gathers == [compact, compact]
    else:
        assert gathers == [compact, _kept_tokens(wgrad), compact, _kept_tokens(wgrad)]
    _close(mlp.linear_fc2.bias.grad, ref["db2"], "fc2 bias grad")
    assert mlp.activation_stats()["elements"] == SEQ * BATCH * FFN
    if wgrad is not None:  # the both-ways weight gradients differ from the exact ones
        exact = _reference(t, activations, None)
        assert not torch.allclose(mlp.linear_fc1.weight.grad, exact["dw1"])
        assert not torch.allclose(mlp.linear_fc2.weight.grad, exact["dw2"])
    # no tokens: empty output, zero weight gradients
    mlp.zero_grad()
    empty = _full_tensors(seq=0)
    y, dx = _forward_backward(mlp, empty["x"], empty["dy"])
    assert y.shape == (0, BATCH, HIDDEN) and dx.shape == (0, BATCH, HIDDEN)
    for p in (mlp.linear_fc1.weight, mlp.linear_fc2.weight):
        assert p.grad is None or not p.grad.any()


@pytest.mark.usefixtures("megatron_tp1")
def test_sparse_mlp_in_float32_matches_the_float64_reference():
    sparsity = SparsityConfig(activations="64:4:16", activation_wgrad="64:4:8", backend="dense")
    mlp = _mlp(sparsity, dtype=torch.float32)
    t = _full_tensors()
    _load(mlp, t)
    ref = _reference(t, "64:4:16", "64:4:8")
    _check_mlp(mlp, ref, t["x"].float(), t["dy"].float(), where="float32", tol=2e-4)


# -- TP=2, sequence parallel ----------------------------------------------------------------------


def _tp2_worker():
    rank, tp = dist.get_rank(), dist.get_world_size()
    t = _full_tensors()
    cols = slice(rank * FFN // tp, (rank + 1) * FFN // tp)
    seq = slice(rank * SEQ // tp, (rank + 1) * SEQ // tp)
    for sequence_parallel in (False, True):
        for activations, wgrad in CASES[:4]:
            where = f"rank {rank} sp={sequence_parallel} {activations} wgrad={wgrad}"
            sparsity = SparsityConfig(
                activations=activations, activation_wgrad=wgrad, backend="dense"
            )
            mlp = _mlp(sparsity, tp=tp, sequence_parallel=sequence_parallel)
            _load(mlp, t, cols)
            rows = seq if sequence_parallel else slice(None)
            per_shard = _reference(t, activations, wgrad, shards=tp)
            _check_mlp(mlp, per_shard, t["x"][rows], t["dy"][rows], cols, rows, where)
            whole = _reference(t, activations, wgrad, shards=1)
            # the activation selection is TP-invariant (groups of M never cross a shard)
            assert torch.equal(per_shard["mask"], whole["mask"]), where
            _close(per_shard["y"], whole["y"], f"{where} TP-invariant output")
            if wgrad is not None:  # ffn/TP = 32 < V = 64: the token selection is per shard
                assert not torch.allclose(per_shard["dw1"], whole["dw1"]), where


def test_tp2_and_sequence_parallel_select_per_shard_and_match_the_reference():
    run_distributed(_tp2_worker, world_size=2, tensor_model_parallel_size=2)


# -- dense phases, held masks --------------------------------------------------------------------


@pytest.mark.usefixtures("megatron_tp1")
def test_dense_phases_run_the_dense_mlp_bit_for_bit():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP, MLPSubmodules

    from megasparse.megatron.schedule import SparsitySchedule

    sparsity = SparsityConfig(activations="64:4:16", activation_wgrad="64:4:8", backend="dense")
    mlp = _mlp(sparsity)
    cfg = mlp.config
    dense = MLP(
        cfg,
        MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        ffn_hidden_size=FFN,
    )
    t = _full_tensors()
    _load(mlp, t), _load(dense, t)
    schedule = SparsitySchedule(dense_warmup_iters=1, dense_final_iters=1, train_iters=3)
    for iteration, phase in enumerate(("dense", "sparse", "dense")):
        schedule.apply(mlp, iteration)
        mlp.zero_grad(), dense.zero_grad()
        y, dx = _forward_backward(mlp, t["x"], t["dy"])
        if phase == "sparse":
            ref = _reference(t, "64:4:16", "64:4:8")
            _close(y, ref["y"], "sparse phase output")
            _close(mlp.linear_fc1.weight.grad, ref["dw1"], "sparse phase fc1 weight grad")
            continue
        y_dense, dx_dense = _forward_backward(dense, t["x"], t["dy"])
        assert torch.equal(y, y_dense) and torch.equal(dx, dx_dense), iteration
        for name, p in mlp.named_parameters():
            assert torch.equal(p.grad, dict(dense.named_parameters())[name].grad), name


@pytest.mark.usefixtures("megatron_tp1")
def test_held_fc1_mask_is_the_one_the_compacted_path_uses():
    """mask_refresh_interval=2: the second step keeps the first step's 2:4 masks although the
    weights changed; every micro-batch of both steps equals the reference with those masks."""
    from megasparse.megatron.schedule import sparse_modules

    sparsity = SparsityConfig(
        activations="64:2:8", activation_wgrad="64:4:8", mask_refresh_interval=2, backend="dense"
    )
    mlp = _mlp(sparsity)
    t = _full_tensors()
    _load(mlp, t)
    masks = None
    for step in range(2):
        for module in sparse_modules(mlp):
            module.set_sparsity_iteration(step)
        w1, w2 = mlp.linear_fc1.weight.detach().clone(), mlp.linear_fc2.weight.detach().clone()
        for micro in range(2):
            mlp.zero_grad()
            x, dy = t["x"] * (1 + micro), t["dy"]
            y, _ = _forward_backward(mlp, x, dy)
            m1, m2 = mlp.linear_fc1.sparsity_mask(), mlp.linear_fc2.sparsity_mask()
            if masks is None:
                masks = (m1, m2)
                assert torch.equal(m1, mask_1d_reference(w1))
            assert torch.equal(m1, masks[0]) and torch.equal(m2, masks[1]), (step, micro)
            ref = speed_path_mlp_reference(
                x, w1, t["b1"], w2, t["b2"], m1, m2, (64, 2, 8), (64, 4, 8), grad_output=dy
            )
            _close(y, ref["y"], f"step {step} micro {micro} output")
            _close(mlp.linear_fc1.weight.grad, ref["dw1"], f"step {step} micro {micro} dW1")
        with torch.no_grad():  # an optimizer step that would change the masks
            for p in (mlp.linear_fc1.weight, mlp.linear_fc2.weight):
                p.add_(torch.randn_like(p))
    assert not torch.equal(mask_1d_reference(mlp.linear_fc1.weight.detach()), masks[0])


# -- FFNs the speed path does not cover -----------------------------------------------------------


@pytest.mark.usefixtures("megatron_tp1")
def test_gated_ffn_refuses_activation_sparsity_and_keeps_weight_sparsity():
    import torch.nn.functional as F

    with pytest.raises(ValueError, match="needs a non-gated Squared-ReLU FFN.*gated_linear_unit"):
        _mlp(SparsityConfig(activations="64:4:16"), gated_linear_unit=True, activation_func=F.silu)
    weights_only = _mlp(SparsityConfig(backend="dense"), gated_linear_unit=True)
    x = _full_tensors()["x"]
    y, _ = weights_only(x)
    fc1, fc2 = weights_only.linear_fc1, weights_only.linear_fc2
    h = torch.nn.functional.linear(x, fc1.weight * fc1.sparsity_mask(), fc1.bias)
    gate, linear = h.chunk(2, dim=-1)
    a = torch.relu(gate).square() * linear
    _close(y, torch.nn.functional.linear(a, fc2.weight * fc2.sparsity_mask()).detach(), "glu")
    # turning activation sparsity on later is refused at the next forward
    weights_only.linear_fc2.sparsity.activations = "64:4:16"
    with pytest.raises(ValueError, match="needs a non-gated Squared-ReLU FFN"):
        weights_only(x)


@pytest.mark.usefixtures("megatron_tp1")
def test_fc2_of_a_gated_ffn_outside_sparse_mlp_refuses_activation_sparsity():
    """A gated shared expert (not a SparseMLP) builds its fc2 itself: the layer refuses too."""
    from megatron.core.activations import squared_relu
    from megatron_helpers import make_config

    from megasparse import SparseRowParallelLinear

    cfg = make_config(
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        gated_linear_unit=True,
        activation_func=squared_relu,
    )
    build = dict(
        config=cfg,
        init_method=torch.nn.init.zeros_,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=True,
        tp_comm_buffer_name="fc2",
    )
    with pytest.raises(ValueError, match="fc2 belongs to a gated one.*activations=None"):
        SparseRowParallelLinear(
            FFN, HIDDEN, sparsity=SparsityConfig(activations="64:4:16"), **build
        )
    SparseRowParallelLinear(FFN, HIDDEN, sparsity=SparsityConfig(weights="2:4"), **build)


@pytest.mark.usefixtures("megatron_tp1")
@pytest.mark.parametrize("wgrad", [None, "64:4:8"])
def test_non_squared_relu_activation(wgrad):
    """GeLU with a compacting pattern, sparsified unfused: fc2 reads the compact form (forward
    gather, dA only at the kept columns; with wgrad, dW2 both ways, the token selection on fc2's
    input A); dH = GeLU'(H) dA is a plain tensor, so fc1's input and weight gradients are dense
    and exact."""
    import torch.nn.functional as F
    from reference import sparse_mlp_reference
    from speed_path_reference import token_mask

    sparsity = SparsityConfig(activations="64:4:16", activation_wgrad=wgrad, backend="dense")
    mlp = _mlp(sparsity, activation_func=F.gelu)
    t = _full_tensors()
    _load(mlp, t)
    with _compact_gemms() as (gathers, computes):
        y, dx = _forward_backward(mlp, t["x"], t["dy"])
    compact = 4 * FFN // 16
    assert computes == [compact]
    assert gathers == [compact] + ([] if wgrad is None else [_kept_tokens(wgrad)])
    m1, m2 = mlp.linear_fc1.sparsity_mask(), mlp.linear_fc2.sparsity_mask()
    ref = sparse_mlp_reference(
        t["x"], t["w1"], t["b1"], t["w2"], t["b2"], m1, m2, (64, 4, 16), F.gelu, t["dy"]
    )
    _close(y, ref["y"], "gelu output")
    _close(dx, ref["dx"], "gelu input grad")
    _close(mlp.linear_fc1.weight.grad, ref["dw1"], "gelu fc1 weight grad (exact)")
    dw2 = ref["dw2"]
    if wgrad is not None:
        a = (ref["activation"] * ref["mask"]).reshape(-1, FFN)
        dw2 = ref["dy"].reshape(-1, HIDDEN).t() @ (a * token_mask(a, (64, 4, 8)))
    _close(mlp.linear_fc2.weight.grad, dw2, "gelu fc2 weight grad")


# -- MoE experts ------------------------------------------------------------------------------------


def _check_experts(experts, activations, wgrad, dtype, tol):
    from expert_builders import make_expert_inputs, run_experts_per_expert

    x, probs, tokens = make_expert_inputs(dtype)
    (y, _, dy, dx), per_expert = run_experts_per_expert(experts, x, tokens, probs)
    for e, rows, fc1, fc2 in per_expert:
        n = rows.stop - rows.start
        ref = speed_path_mlp_reference(
            x[rows],
            fc1.weight,
            None,
            fc2.weight,
            None,
            fc1.sparsity_mask(),
            fc2.sparsity_mask(),
            parse_activation_pattern(activations),
            parse_activation_pattern(wgrad),
            grad_output=dy[rows],
            probs=probs[rows],
        )
        where = f"expert {e} ({n} tokens)"
        _close(y[rows], ref["y"], f"{where} output", tol)
        _close(dx[rows], ref["dx"], f"{where} input grad", tol)
        _close(fc1.weight.grad, ref["dw1"], f"{where} fc1 weight grad", tol)
        _close(fc2.weight.grad, ref["dw2"], f"{where} fc2 weight grad", tol)


@pytest.mark.usefixtures("megatron_tp1")
@pytest.mark.parametrize("cls", [SparseSequentialMLP, SparseGroupedMLP])
@pytest.mark.parametrize(
    "activations,wgrad", [("4:4:8", None), ("4:2:8", "4:4:8"), ("64:4:16", "64:4:8")]
)
def test_experts_select_per_expert_on_their_own_tokens(cls, activations, wgrad):
    """Tokens [5, 0, 7, 3] with V = 4: blocks of V tokens and groups of M tokens end at every
    expert's last token (a block that mixed experts would change the selection)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from expert_builders import FFN as EXPERT_FFN, make_experts

    grouped_calls = []

    class CountGroupedMM(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten._grouped_mm:
                grouped_calls.append(func)
            return func(*args, **(kwargs or {}))

    sparsity = SparsityConfig(activations=activations, activation_wgrad=wgrad, backend="dense")
    dtype = torch.float32 if cls is SparseGroupedMLP else torch.float64
    experts = make_experts(cls, sparsity, dtype=dtype)
    with CountGroupedMM(), _compact_gemms() as (gathers, computes):
        _check_experts(
            experts, activations, wgrad, dtype, 2e-4 if dtype == torch.float32 else 1e-10
        )
    assert grouped_calls == []  # compacted: each expert runs SparseMLP's compact path
    compact = 4 * EXPERT_FFN // parse_activation_pattern(activations).m
    assert computes == [compact] * 3  # fc2's dA of the three experts with tokens


@pytest.mark.usefixtures("megatron_tp1")
def test_grouped_experts_group_again_in_a_dense_phase():
    from expert_builders import make_expert_inputs, make_experts

    sparsity = SparsityConfig(activations="4:4:8", backend="dense")
    experts = make_experts(SparseGroupedMLP, sparsity, dtype=torch.float32)
    x, _, _ = make_expert_inputs(torch.float32)
    assert not experts._can_group(x)
    for e in experts.local_experts:
        e.linear_fc1.sparsity.enabled = e.linear_fc2.sparsity.enabled = False
    assert experts._can_group(x)


# -- flags, specs ----------------------------------------------------------------------------------


def _parse(*argv):
    import argparse

    from megasparse.megatron.args import add_args

    return add_args(argparse.ArgumentParser()).parse_args(list(argv))


def test_activation_wgrad_flag_round_trip():
    from megasparse.megatron.args import config_from_args

    args = _parse("--sparsity-activations", "64:4:16", "--sparsity-activation-wgrad", "64:4:8")
    cfg = config_from_args(args)
    assert (cfg.activations, cfg.activation_wgrad) == ("64:4:16", "64:4:8")
    assert cfg.activation_wgrad_pattern == (64, 4, 8)
    for spelling in ("none", "None"):
        none = _parse("--sparsity-activations", "64:4:16", "--sparsity-activation-wgrad", spelling)
        assert config_from_args(none).activation_wgrad is None
    assert config_from_args(_parse("--sparsity-weights", "2:4")).activation_wgrad is None
    with pytest.raises(ValueError, match="needs a compacted activation.*M >= 8.*2:4"):
        config_from_args(
            _parse("--sparsity-activations", "2:4", "--sparsity-activation-wgrad", "64:4:8")
        )
    with pytest.raises(ValueError, match="--sparsity-activations none"):
        config_from_args(_parse("--sparsity-activation-wgrad", "64:4:8"))
    gated = _parse("--sparsity-weights", "2:4", "--sparsity-activations", "64:4:16")
    gated.swiglu = True
    with pytest.raises(ValueError, match="non-gated Squared-ReLU FFN.*--swiglu.*--squared-relu"):
        config_from_args(gated)
    gated.sparsity_activations = None  # 2:4 weights of a SwiGLU FFN
    assert config_from_args(gated).weights == "2:4"


@pytest.mark.parametrize("value", ["64:3:8", "0:4:8", "64:4:4", "4:8", "dense"])
def test_activation_wgrad_flag_refuses_bad_patterns(value, capsys):
    with pytest.raises(SystemExit):
        _parse("--sparsity-activation-wgrad", value)
    assert "--sparsity-activation-wgrad" in capsys.readouterr().err


def test_flag_help_lists_the_compacting_patterns(capsys):
    with pytest.raises(SystemExit):
        _parse("--help")
    help_text = " ".join(capsys.readouterr().out.split())
    assert "'V:4:M'" in help_text and "'64:4:16'" in help_text
    assert "--sparsity-activation-wgrad" in help_text and "'64:4:8'" in help_text


def test_sparsify_spec_gives_activation_wgrad_to_fc2_and_the_experts_only():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megasparse import sparsify_spec
    from megasparse.megatron_lm import gpt_layer_spec_from_args

    def sparsity_of(entry):
        return (
            entry.keywords["sparsity"] if hasattr(entry, "keywords") else entry.params["sparsity"]
        )

    def submodules(node):
        return node.keywords["submodules"] if hasattr(node, "keywords") else node.submodules

    cfg = SparsityConfig(activations="64:4:16", activation_wgrad="64:4:8")
    spec = sparsify_spec(get_gpt_layer_local_spec(), cfg, ("qkv", "fc1", "fc2"))
    mlp = submodules(spec.submodules.mlp)
    assert sparsity_of(mlp.linear_fc2).activation_wgrad == "64:4:8"
    assert sparsity_of(mlp.linear_fc1).activation_wgrad is None  # fc1 reads fc2's
    qkv = submodules(spec.submodules.self_attention).linear_qkv
    assert sparsity_of(qkv).activation_wgrad is None
    moe = sparsify_spec(get_gpt_layer_local_spec(num_experts=4), cfg)
    experts = submodules(moe.submodules.mlp).experts
    assert sparsity_of(experts).activation_wgrad == "64:4:8"
    # Megatron-LM's --spec entry point reads the flag
    args = _parse(
        "--sparsity-weights", "2:4", "--sparsity-activations", "64:4:16",
        "--sparsity-activation-wgrad", "64:4:8",
    )  # fmt: skip
    args.squared_relu = True
    built = gpt_layer_spec_from_args(args)
    assert sparsity_of(submodules(built.submodules.mlp).linear_fc2).activation_wgrad == "64:4:8"


@pytest.mark.usefixtures("megatron_tp1")
def test_te_grouped_experts_run_a_compacting_pattern_on_its_masked_math():
    """SparseTEGroupedMLP's grouped GEMMs take the activation dense: the same values per expert
    (selection on the expert's own tokens), no work skipped; both-ways weight gradients refused."""
    from expert_builders import TOKENS_PER_EXPERT, make_expert_inputs, make_te_experts

    from megasparse import SparseTEGroupedMLP

    sparsity = SparsityConfig(activations="4:4:8", backend="dense")
    experts = make_te_experts(SparseTEGroupedMLP, sparsity, torch.float64)
    x, probs, tokens = make_expert_inputs(torch.float64)
    xr = x.clone().requires_grad_(True)
    y = experts(xr, tokens, probs)[0]
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y.backward(dy)
    start = 0
    for e, n in enumerate(TOKENS_PER_EXPERT):
        rows = slice(start, start + n)
        start += n
        w1, w2 = (
            getattr(fc, f"weight{e}").detach() for fc in (experts.linear_fc1, experts.linear_fc2)
        )
        ref = speed_path_mlp_reference(
            x[rows],
            w1,
            None,
            w2,
            None,
            mask_1d_reference(w1),
            mask_1d_reference(w2),
            (4, 4, 8),
            grad_output=dy[rows],
            probs=probs[rows],
        )
        _close(y[rows], ref["y"], f"expert {e} output")
        _close(xr.grad[rows], ref["dx"], f"expert {e} input grad")
    experts.sparsity.activation_wgrad = "4:4:8"
    with pytest.raises(NotImplementedError, match="activation_wgrad='4:4:8'.*SparseSequentialMLP"):
        experts(x, tokens, probs)


@pytest.mark.usefixtures("megatron_tp1")
@pytest.mark.parametrize("weights", [None, "2:4"])
def test_stats_count_the_held_transposed_weight_of_the_compact_path(weights):
    """fc2's compact GEMMs hold (W*M)^T for the step: the stats read it (and name it) after a
    forward and backward, as megasparse.stats and Megatron-LM's log writers do every interval."""
    import megasparse

    mlp = _mlp(SparsityConfig(weights=weights, activations="64:4:16", backend="dense"))
    t = _full_tensors()
    _load(mlp, t)
    _forward_backward(mlp, t["x"], t["dy"])
    held = mlp.linear_fc2.sparsity_stats()["state_bytes"]
    weight = mlp.linear_fc2.weight
    assert held["compact_transposed_weight"] == weight.numel() * weight.element_size()
    # the model-wide statistics read the state of every layer that prunes weights
    assert len(megasparse.stats(mlp)) == (0 if weights is None else 2)
