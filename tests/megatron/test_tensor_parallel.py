"""TP=2 over gloo (2 processes): the same full weights give the same masks and outputs as TP=1.

The TP=1 side is the float64 plain-torch masked MLP on the full weights (test_layers.py checks
the TP=1 layers against that same reference).
"""

import torch
import torch.distributed as dist

from megasparse import SparsityConfig
from megasparse.kernels import mask_1d_reference, mask_transposable_reference
from megasparse.testing import run_distributed

SEQ, BATCH, HIDDEN, FFN = 8, 2, 16, 32
SCENARIOS = [("1d", "ste"), ("transposable", "srste"), ("1d", "masked")]
REFERENCE_MASKS = {"1d": mask_1d_reference, "transposable": mask_transposable_reference}


def _activation(h):
    return torch.relu(h).square()


def _full_tensors():
    from megatron_helpers import full_mlp_tensors

    return full_mlp_tensors(SEQ, BATCH, HIDDEN, FFN)


def _reference(t, mask_kind, gradient, decay):
    m1, m2 = REFERENCE_MASKS[mask_kind](t["w1"]), REFERENCE_MASKS[mask_kind](t["w2"])
    x = t["x"].clone().requires_grad_(True)
    w1s, w2s = (t["w1"] * m1).requires_grad_(True), (t["w2"] * m2).requires_grad_(True)
    b1, b2 = t["b1"].clone().requires_grad_(True), t["b2"].clone().requires_grad_(True)
    y = torch.nn.functional.linear(_activation(torch.nn.functional.linear(x, w1s, b1)), w2s, b2)
    y.backward(t["dy"])
    dws = []
    for ws, m, w in ((w1s, m1, t["w1"]), (w2s, m2, t["w2"])):
        g = ws.grad
        g = g * m if gradient == "masked" else g + decay * (~m) * w if gradient == "srste" else g
        dws.append(g)
    return {
        "m1": m1,
        "m2": m2,
        "y": y.detach(),
        "dx": x.grad,
        "dw1": dws[0],
        "dw2": dws[1],
        "db1": b1.grad,
        "db2": b2.grad,
    }


def _load_shards(fc1, fc2, t, rows):
    from megatron_helpers import load_mlp_shards

    load_mlp_shards(fc1, fc2, t, rows)


def _close(actual, expected, what):
    torch.testing.assert_close(
        actual, expected, rtol=1e-10, atol=1e-10, msg=lambda m: f"{what}: {m}"
    )


def _tp2_mlp_worker():
    from megatron_helpers import make_column, make_config, make_row

    rank, tp = dist.get_rank(), dist.get_world_size()
    t = _full_tensors()
    rows = slice(rank * FFN // tp, (rank + 1) * FFN // tp)
    seq = slice(rank * SEQ // tp, (rank + 1) * SEQ // tp)
    for sequence_parallel in (False, True):
        for mask_kind, gradient in SCENARIOS:
            where = f"rank {rank} sp={sequence_parallel} {mask_kind}/{gradient}"
            sparsity = SparsityConfig(
                mask=mask_kind, gradient=gradient, srste_decay=0.1, backend="dense"
            )
            cfg = make_config(tp=tp, sequence_parallel=sequence_parallel)
            fc1 = make_column(cfg, HIDDEN, FFN, sparsity)
            fc2 = make_row(cfg, FFN, HIDDEN, sparsity)
            _load_shards(fc1, fc2, t, rows)
            x = (t["x"][seq] if sequence_parallel else t["x"]).clone().requires_grad_(True)
            h, _ = fc1(x)
            y, _ = fc2(_activation(h))
            ref = _reference(t, mask_kind, gradient, 0.1)
            assert torch.equal(fc1.sparsity_mask(), ref["m1"][rows]), where
            assert torch.equal(fc2.sparsity_mask(), ref["m2"][:, rows]), where
            _close(y, ref["y"][seq] if sequence_parallel else ref["y"], f"{where} output")
            y.backward(t["dy"][seq] if sequence_parallel else t["dy"])
            _close(
                x.grad, ref["dx"][seq] if sequence_parallel else ref["dx"], f"{where} input grad"
            )
            _close(fc1.weight.grad, ref["dw1"][rows], f"{where} fc1 weight grad")
            _close(fc2.weight.grad, ref["dw2"][:, rows], f"{where} fc2 weight grad")
            _close(fc1.bias.grad, ref["db1"][rows], f"{where} fc1 bias grad")
            db2 = fc2.bias.grad.clone()
            if sequence_parallel:  # Megatron all-reduces sequence-parallel bias grads over TP later
                dist.all_reduce(db2)
            _close(db2, ref["db2"], f"{where} fc2 bias grad")


def _tp2_gather_and_scatter_worker():
    """fc1 with gather_output=True feeding fc2 with input_is_parallel=False (Megatron's other wiring)."""
    from megatron_helpers import make_column, make_config, make_row

    rank, tp = dist.get_rank(), dist.get_world_size()
    t = _full_tensors()
    rows = slice(rank * FFN // tp, (rank + 1) * FFN // tp)
    sparsity = SparsityConfig(mask="transposable", backend="dense")
    cfg = make_config(tp=tp)
    fc1 = make_column(cfg, HIDDEN, FFN, sparsity, gather_output=True)
    fc2 = make_row(cfg, FFN, HIDDEN, sparsity, input_is_parallel=False)
    _load_shards(fc1, fc2, t, rows)
    x = t["x"].clone().requires_grad_(True)
    h, _ = fc1(x)
    assert h.shape[-1] == FFN
    y, _ = fc2(_activation(h))
    y.backward(t["dy"])
    ref = _reference(t, "transposable", "ste", 0.0)
    _close(y, ref["y"], f"rank {rank} gathered output")
    _close(x.grad, ref["dx"], f"rank {rank} input grad")
    _close(fc1.weight.grad, ref["dw1"][rows], f"rank {rank} fc1 weight grad")
    _close(fc2.weight.grad, ref["dw2"][:, rows], f"rank {rank} fc2 weight grad")


def _tp2_sparse_mlp_worker():
    """SparseMLP (Squared-ReLU, sparse activations and weights) at TP=2 equals the full-weight reference."""
    from megatron.core.activations import squared_relu
    from megatron_helpers import make_config, make_mlp
    from reference import sparse_mlp_reference

    rank, tp = dist.get_rank(), dist.get_world_size()
    t = _full_tensors()
    rows = slice(rank * FFN // tp, (rank + 1) * FFN // tp)
    seq = slice(rank * SEQ // tp, (rank + 1) * SEQ // tp)
    for sequence_parallel in (False, True):
        for activations, pattern in (("2:4", (64, 2, 4)), ("4:2:8", (4, 2, 8))):
            where = f"rank {rank} sp={sequence_parallel} activations={activations}"
            sparsity = SparsityConfig(activations=activations, mask="transposable", backend="dense")
            cfg = make_config(
                tp=tp,
                sequence_parallel=sequence_parallel,
                hidden_size=HIDDEN,
                ffn_hidden_size=FFN,
                activation_func=squared_relu,
            )
            mlp = make_mlp(cfg, FFN, sparsity, sparsity)
            fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
            _load_shards(fc1, fc2, t, rows)
            x = (t["x"][seq] if sequence_parallel else t["x"]).clone().requires_grad_(True)
            y, bias = mlp(x)
            y = y + bias
            m1, m2 = mask_transposable_reference(t["w1"]), mask_transposable_reference(t["w2"])
            ref = sparse_mlp_reference(
                t["x"],
                t["w1"],
                t["b1"],
                t["w2"],
                t["b2"],
                m1,
                m2,
                pattern,
                "squared_relu",
                grad_output=t["dy"],
            )
            _close(y, ref["y"][seq] if sequence_parallel else ref["y"], f"{where} output")
            y.backward(t["dy"][seq] if sequence_parallel else t["dy"])
            _close(
                x.grad, ref["dx"][seq] if sequence_parallel else ref["dx"], f"{where} input grad"
            )
            _close(fc1.weight.grad, ref["dw1"][rows], f"{where} fc1 weight grad")
            _close(fc1.bias.grad, ref["db1"][rows], f"{where} fc1 bias grad")
            _close(fc2.weight.grad, ref["dw2"][:, rows], f"{where} fc2 weight grad")


def _tp2_workers():
    _tp2_mlp_worker()
    _tp2_gather_and_scatter_worker()
    _tp2_sparse_mlp_worker()
    _tp2_bad_shapes_worker()


def _tp2_bad_shapes_worker():
    import pytest
    from megatron_helpers import make_column, make_config, make_row

    cfg = make_config(tp=2)
    with pytest.raises(
        ValueError,
        match="input_size=12 split over tensor-parallel size 2 gives 6 columns per rank.*4\\*TP=8",
    ):
        make_row(cfg, 12, 16, SparsityConfig())
    with pytest.raises(
        ValueError, match="6 output rows per tensor-parallel rank \\(TP=2\\).*multiple of 4\\*TP=8"
    ):
        make_column(cfg, 16, 12, SparsityConfig(mask="transposable"))
    # a row-parallel layer holds all its output rows on every rank: a multiple of 4 is enough
    with pytest.raises(
        ValueError,
        match="6 output rows per tensor-parallel rank \\(TP=2\\)\\. Make output_size a multiple of 4, ",
    ):
        make_row(cfg, 16, 6, SparsityConfig(mask="transposable"))
    _tp2_row_transposable_with_12_outputs(cfg)
    make_row(cfg, 16, 16, SparsityConfig())  # 8 per rank: fine
    with pytest.raises(
        ValueError, match="ffn size 24 over tensor-parallel size 2 gives 12 per rank.*8\\*TP=16"
    ):
        make_row(cfg, 24, 16, SparsityConfig(weights=None, activations="64:2:8"))


def _tp2_row_transposable_with_12_outputs(cfg):
    """12 output rows (3 tiles, not a multiple of 4*TP): the same output as the full masked weight."""
    from megatron_helpers import make_row

    rank, tp = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(7)
    w, b = (
        torch.randn(12, 16, generator=g, dtype=torch.float64),
        torch.randn(12, generator=g, dtype=torch.float64),
    )
    x = torch.randn(SEQ, BATCH, 16, generator=g, dtype=torch.float64)
    cols = slice(rank * 16 // tp, (rank + 1) * 16 // tp)
    row = make_row(cfg, 16, 12, SparsityConfig(mask="transposable", backend="dense"))
    with torch.no_grad():
        row.weight.copy_(w[:, cols]), row.bias.copy_(b)
    y, _ = row(x[..., cols])
    mask = mask_transposable_reference(w)
    assert torch.equal(row.sparsity_mask(), mask[:, cols])
    _close(y, torch.nn.functional.linear(x, w * mask, b), f"rank {rank} row output")


def test_tp2_matches_tp1_sequence_parallel_gather_scatter_sparse_mlp_and_rejects_split_groups():
    # one spawn for all TP=2 checks: starting two processes costs more than the checks
    run_distributed(_tp2_workers, world_size=2, tensor_model_parallel_size=2)
