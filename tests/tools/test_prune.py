"""One-shot pruning of a dense demo-GPT checkpoint (`python -m megasparse.tools.prune`).

A small demo-style GPT is trained 250 steps on the demo's corpus (one thread, fixed seeds) and
checkpointed; each method prunes qkv/proj/fc1/fc2 2:4. Checked: each pruned checkpoint loads
into the sparse model whose masks equal the pruning masks (and give the same loss); validation
loss right after pruning: SparseGPT strictly best, Wanda no worse than magnitude within
WANDA_TOL. On this tiny model Wanda vs magnitude is within noise: with training seed 1 Wanda
wins (2.0896 vs 2.0982), with seed 2 they tie (2.0672 vs 2.0668); the inputs have no outlier
features yet, which is where Wanda's |W| * ||X_j|| score pays off. Also SparseGPT and Wanda
against float64 loop references on small matrices.
"""

import argparse
import math

import pytest
import torch

from megasparse.tools.prune import (
    magnitude_prune,
    main,
    parse_args,
    prune_model,
    sparsegpt_prune,
    target_modules,
    wanda_prune,
)

MODEL = [
    "--layers",
    "2",
    "--hidden",
    "64",
    "--heads",
    "4",
    "--ffn",
    "256",
    "--seq",
    "64",
    "--batch",
    "16",
    "--corpus-bytes",
    "400000",
    "--targets",
    "qkv",
    "proj",
    "fc1",
    "fc2",
]
TARGETS = ("qkv", "proj", "fc1", "fc2")
TRAIN_STEPS = 250  # fewer: the model is still near unigram statistics and pruning order is noise
WANDA_TOL = 0.005  # nats/byte: Wanda may tie magnitude on this model (see the module notes)


def _model_args():
    return argparse.Namespace(
        layers=2,
        hidden=64,
        heads=4,
        ffn=256,
        seq=64,
        batch=16,
        tp=1,
        seed=0,
        targets=list(TARGETS),
        corpus_bytes=400_000,
    )


def _val_batches(args):
    from megasparse.tools.gpt_text import load_corpus, text_batches

    data = load_corpus(args.corpus_bytes)
    g = torch.Generator().manual_seed(99)
    return [text_batches(data[int(0.9 * len(data)) :], args.seq, args.batch, g) for _ in range(8)]


@torch.no_grad()
def _val_loss(model, batches):
    from megasparse.tools.gpt_text import gpt_loss

    model.eval()
    return sum(gpt_loss(model, t, lab).item() for t, lab in batches) / len(batches)


def _load(sparsity, path):
    from megatron.core import dist_checkpointing

    from megasparse.tools.gpt_text import build_gpt

    model = build_gpt(_model_args(), sparsity, torch.device("cpu"))
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), path))
    return model


@pytest.fixture(scope="module")
def dense_checkpoint(megatron_tp1, tmp_path_factory):
    from megatron.core import dist_checkpointing

    from megasparse.tools.gpt_text import build_gpt, gpt_loss, load_corpus, text_batches

    args = _model_args()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a reproducible training run (reduction order)
    model = build_gpt(args, None, torch.device("cpu"))
    data = load_corpus(args.corpus_bytes)
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(TRAIN_STEPS):
        loss = gpt_loss(model, *text_batches(data[: int(0.9 * len(data))], args.seq, args.batch, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    path = str(tmp_path_factory.mktemp("dense"))
    dist_checkpointing.save(model.sharded_state_dict(), path)
    return path, _val_loss(model, _val_batches(args))


def test_pruned_checkpoints_order_and_load_into_the_sparse_model(dense_checkpoint, tmp_path):
    from megasparse.config import SparsityConfig
    from megasparse.core.masks import weight_mask

    dense_path, dense_loss = dense_checkpoint
    batches = _val_batches(_model_args())
    losses = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        out = str(tmp_path / method)
        masks = main(
            [
                "--load",
                dense_path,
                "--save",
                out,
                "--method",
                method,
                "--calib-batches",
                "8",
                *MODEL,
            ]
        )
        assert len(masks) == 8  # qkv, proj, fc1, fc2 of 2 layers
        dense = _load(None, out)
        losses[method] = _val_loss(dense, batches)
        sparse = _load(SparsityConfig(weights="2:4"), out)
        for name, module in target_modules(sparse, TARGETS):
            assert torch.equal(weight_mask(module.weight), masks[name + ".weight"]), name
            assert torch.equal(module.sparsity_mask(), masks[name + ".weight"]), name
        # the sparse model computes exactly what the pruned dense weights compute
        assert _val_loss(sparse, batches) == pytest.approx(losses[method], abs=1e-5)
    print(
        f"\nval loss: dense {dense_loss:.4f}, "
        + ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
    )
    assert dense_loss < losses["sparsegpt"]
    assert losses["sparsegpt"] < min(losses["wanda"], losses["magnitude"])
    assert losses["wanda"] <= losses["magnitude"] + WANDA_TOL


def _loop_wanda(w, x):
    out = w.clone()
    for r in range(w.shape[0]):
        for g in range(0, w.shape[1], 4):
            s = [
                abs(float(w[r, g + j]))
                * math.sqrt(sum(float(x[t, g + j]) ** 2 for t in range(x.shape[0])))
                for j in range(4)
            ]
            keep = sorted(range(4), key=lambda j: (-s[j], j))[:2]
            for j in range(4):
                if j not in keep:
                    out[r, g + j] = 0.0
    return out


def test_wanda_matches_loop_reference():
    torch.manual_seed(0)
    w, x = torch.randn(6, 16, dtype=torch.float64), torch.randn(40, 16, dtype=torch.float64)
    x[:, 3] *= 20  # an outlier input feature: Wanda keeps its weights, magnitude may not
    pruned, mask = wanda_prune(w, (x * x).sum(0))
    assert torch.equal(pruned, _loop_wanda(w, x))
    assert mask[:, 3].all()


def _loop_sparsegpt(w, h, damping=0.01):
    """Row by row, column by column OBS (no blocks, no Cholesky): for each row keep the inverse
    Hessian of the not-yet-processed columns and update it by Gaussian elimination. The 2:4
    choice at the start of each group scores w_k^2 / d_k^2 with d_k^2 = [(H_{k:,k:})^-1]_kk, the
    inverse Hessian of the columns from k on (the paper's Cholesky diagonal, here explicit)."""
    w = w.clone()
    n = w.shape[1]
    h = h + damping * torch.diag(h).mean() * torch.eye(n, dtype=h.dtype)
    q = torch.zeros_like(w)
    for r in range(w.shape[0]):
        row = w[r].clone()
        hinv = torch.linalg.inv(h)
        for g in range(0, n, 4):
            # OBS error of each of the 4 columns given the current inverse Hessian
            err = [
                float(row[g + j]) ** 2 / float(torch.linalg.inv(h[g + j :, g + j :])[0, 0])
                for j in range(4)
            ]
            keep = sorted(range(4), key=lambda j: (-err[j], j))[:2]
            for j in range(4):
                c = g + j
                target = float(row[c]) if j in keep else 0.0
                delta = (float(row[c]) - target) / float(hinv[c, c])
                row -= delta * hinv[c]  # OBS update of all not-yet-fixed columns (row c of H^-1)
                row[c] = target
                # remove column c from the problem: Schur complement of the inverse
                hinv = hinv - torch.outer(hinv[:, c], hinv[c]) / hinv[c, c]
        q[r] = row
    return q


def test_sparsegpt_matches_loop_obs_reference():
    """Blocked Cholesky SparseGPT = sequential OBS with exact inverse Hessian updates (float64)."""
    torch.manual_seed(0)
    x = torch.randn(64, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)
    w = torch.randn(5, 16, dtype=torch.float64)
    h = 2 * x.t() @ x
    for block in (4, 8, 128):
        q, mask = sparsegpt_prune(w, h, block=block)
        assert torch.allclose(q, _loop_sparsegpt(w, h), atol=1e-9), block
    assert ((q != 0).reshape(5, 4, 4).sum(-1) == 2).all()
    assert torch.equal(mask, q != 0)
    # better reconstruction than magnitude and Wanda: || X W^T - X Q^T ||
    rec = lambda p: float(((x @ (w - p).t()) ** 2).sum())  # noqa: E731
    assert rec(q) < rec(wanda_prune(w, (x * x).sum(0))[0]) and rec(q) < rec(magnitude_prune(w)[0])


TINY = ["--layers", "1", "--hidden", "16", "--heads", "2", "--ffn", "32", "--seq", "8"]


def _tiny_checkpoint(path):
    from megatron.core import dist_checkpointing

    from megasparse.tools.gpt_text import build_gpt

    args = argparse.Namespace(layers=1, hidden=16, heads=2, ffn=32, seq=8, tp=1, seed=0)
    model = build_gpt(args, None, torch.device("cpu"))
    dist_checkpointing.save(model.sharded_state_dict(), str(path))
    return args, {n: p.detach().clone() for n, p in model.named_parameters()}


def _files(path):
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def test_save_refuses_a_non_empty_directory_unless_overwrite(megatron_tp1, tmp_path, capsys):
    from megatron.core import dist_checkpointing

    from megasparse.core.masks import weight_mask
    from megasparse.tools.gpt_text import build_gpt

    ckpt = tmp_path / "dense"
    ckpt.mkdir()
    args, dense = _tiny_checkpoint(ckpt)
    before = _files(ckpt)
    argv = ["--load", str(ckpt), "--save", str(ckpt), "--method", "magnitude", *TINY]
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err
    assert "is not empty" in err and "--overwrite" in err
    assert _files(ckpt) == before  # the dense input is untouched
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit):
        parse_args(
            ["--load", str(ckpt), "--save", str(tmp_path / "a_file"), "--method", "magnitude"]
        )
    assert "is a file" in capsys.readouterr().err

    masks = main(argv + ["--overwrite"])  # the user asked for it: prune in place
    assert masks
    model = build_gpt(args, None, torch.device("cpu"))
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(ckpt)))
    for name, param in model.named_parameters():
        expected = dense[name]
        if name in masks:  # the dense weight times its own 1d magnitude mask
            expected = dense[name] * weight_mask(dense[name], "1d")
        assert torch.equal(param, expected), name


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibrated_methods_need_calibration_batches(method, megatron_tp1, tmp_path, capsys):
    argv = ["--load", str(tmp_path), "--save", str(tmp_path / "out"), "--method", method]
    with pytest.raises(SystemExit):
        parse_args(argv + ["--calib-batches", "0"])
    err = capsys.readouterr().err
    assert "--calib-batches must be at least 1, got 0" in err and method in err
    with pytest.raises(SystemExit):
        parse_args(argv[:-2] + ["--method", "magnitude", "--calib-batches", "-1"])
    assert "--calib-batches must be >= 0" in capsys.readouterr().err
    assert parse_args(argv + ["--calib-batches", "1"]).calib_batches == 1
    # the library call says the same, not KeyError
    from megasparse.tools.gpt_text import build_gpt, gpt_loss

    args = argparse.Namespace(layers=1, hidden=16, heads=2, ffn=32, seq=8, tp=1, seed=0)
    with pytest.raises(ValueError, match="no calibration batches"):
        prune_model(build_gpt(args, None, torch.device("cpu")), method, [], gpt_loss)
