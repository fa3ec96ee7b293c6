"""One-shot 2:4 pruning of a dense checkpoint of the demo's GPT: magnitude, Wanda or SparseGPT.

    python -m megasparse.tools.prune --load DIR --save DIR --method {magnitude,wanda,sparsegpt} \
        [--calib-batches N] [--targets fc1 fc2] [--overwrite] [model flags of megasparse.tools.demo]

Reads a Megatron `dist_checkpointing` checkpoint of the demo's GPT (`megasparse.tools.demo`;
the model flags must match it), prunes the `--targets` linears 2:4 along their input dim and
writes a checkpoint of the same model with the pruned weights in the dense layout (zeros where
pruned). It loads into the dense model and into the sparse one (`sparsify_spec`): there every
mask computed from a pruned weight (`megasparse.core.masks.weight_mask`, "1d") equals the pruning
mask. Ties: a pruned group has at most 2 nonzeros, so the magnitude mask keeps them all; only
where a kept weight is exactly 0 (a zero dense weight, or a dead input column in SparseGPT)
is "which zero is kept" ambiguous, and then the mask reported is the magnitude mask of the
pruned weight (lower index wins). The pruned values W*M are the same either way.
`--save` must be a new or empty directory: `--overwrite` writes into a non-empty one (the
`--load` directory too), replacing the checkpoint there.

Methods (each per linear, W [out, in], groups of 4 consecutive inputs):
- magnitude: the project's 1d mask of |W| (keep the 2 largest |w| of 4).
- wanda (Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for LLMs", 2023):
  score S_ij = |W_ij| * ||X_j||_2 over all calibration tokens, keep the 2 largest S of 4.
- sparsegpt (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned
  in One-Shot", ICML 2023, Alg. 1): H = 2 X^T X + lambda I (lambda = 1% of mean diag H);
  U = upper Cholesky factor of H^-1; for column blocks of B, at every 4th column choose the
  2:4 mask of the next 4 columns by the OBS error w^2 / U_jj^2, then column by column set the
  pruned weights to 0 and move the error (w_j - q_j) / U_jj onto the later columns of the row
  (-= err * U_j,j+1:), and after a block onto all later columns. Kept weights are changed.
Layers are pruned in forward order, each with calibration inputs that already pass through
the pruned earlier layers (as both papers do). Calibration: `--calib-batches` random windows
of the demo's corpus (its training split), seed `--seed`.

Tensor parallelism: the tool builds the model at TP=1 (exact). At TP>1 per shard: magnitude
and Wanda are exact (Wanda's column norms are per input column; a row-parallel shard holds
whole columns, a column-parallel shard needs the full input, which every rank has after the
sequence-parallel all-gather). SparseGPT is exact for column-parallel shards (rows are
independent given the full H) but for row-parallel shards (fc2, proj) a local solve with
only the shard's block of H ignores the correlations with the other shards' inputs and moves
no error across shards: an approximation.
"""

import argparse
import json
import os

import torch

from megasparse.core.masks import weight_mask

METHODS = ("magnitude", "wanda", "sparsegpt")
MODULE_NAMES = {
    "qkv": "self_attention.linear_qkv",
    "proj": "self_attention.linear_proj",
    "fc1": "mlp.linear_fc1",
    "fc2": "mlp.linear_fc2",
}


def _groups_mask(score: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest of every 4 of a score >= 0 (the 1d rule: lower index wins ties)."""
    return weight_mask(score, "1d")


def magnitude_prune(weight: torch.Tensor):
    """(W * M, M) with M the project's 1d magnitude mask."""
    mask = weight_mask(weight, "1d")
    return weight * mask, mask


def wanda_prune(weight: torch.Tensor, input_sq_norms: torch.Tensor):
    """(W * M, M), M keeping the 2 largest |W_ij| * ||X_j||_2 of every 4 inputs (Sun et al. 2023).

    input_sq_norms [in]: sum over calibration tokens of x_j^2 (the diagonal of X^T X).
    """
    score = weight.abs().double() * input_sq_norms.double().clamp_min(0).sqrt()[None, :]
    mask = _groups_mask(score)
    return weight * mask, mask


def sparsegpt_prune(
    weight: torch.Tensor, hessian: torch.Tensor, block: int = 128, damping: float = 0.01
):
    """(Q, M): SparseGPT 2:4 (Frantar & Alistarh 2023, Alg. 1) of W [out, in] with H = 2 X^T X.

    Works in float64; returns Q in W's dtype. block: columns per lazy-update block (multiple of 4).
    """
    assert block % 4 == 0
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0  # inputs never active: their weights do not matter, prune them
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damping * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        w_blk, u_blk = w[:, b0:b1].clone(), u[b0:b1, b0:b1]
        err_blk = torch.zeros_like(w_blk)
        for j in range(b1 - b0):
            if j % 4 == 0:  # 2:4 selection by the OBS error of the next 4 columns
                obs = w_blk[:, j : j + 4] ** 2 / torch.diag(u_blk)[j : j + 4][None, :] ** 2
                pruned[:, b0 + j : b0 + j + 4] = ~_groups_mask(obs)
            col = w_blk[:, j]
            kept = torch.where(pruned[:, b0 + j], torch.zeros_like(col), col)
            q[:, b0 + j] = kept
            err = (col - kept) / u_blk[j, j]
            w_blk[:, j:] -= err[:, None] * u_blk[j, j:][None, :]
            err_blk[:, j] = err
        w[:, b1:] -= err_blk @ u[b0:b1, b1:]
    return q.to(weight.dtype), ~pruned


def _final_mask(pruned_weight: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The magnitude mask of the pruned weight; it covers every nonzero (see the module notes)."""
    mask = weight_mask(pruned_weight, "1d")
    assert not (pruned_weight * ~mask).any(), "a pruned group holds more than 2 nonzeros"
    assert torch.equal(mask | (pruned_weight == 0), chosen | (pruned_weight == 0))
    return mask


def target_modules(model, targets):
    """[(name, module)] of the targeted linears in forward order."""
    suffixes = tuple(MODULE_NAMES[t] for t in targets)
    return [(n, m) for n, m in model.named_modules() if n.endswith(suffixes)]


@torch.no_grad()
def _input_gram(model, module, calib, forward):
    """sum over calibration tokens of x x^T for the input x of `module` (float64 [in, in])."""
    acc = {}

    def hook(_mod, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        acc["g"] = acc.get("g", 0) + x.t() @ x

    handle = module.register_forward_pre_hook(hook)
    try:
        for tokens, labels in calib:
            forward(model, tokens, labels)
    finally:
        handle.remove()
    return acc["g"]


@torch.no_grad()
def prune_model(model, method: str, calib, forward, targets=("fc1", "fc2")):
    """Prune the `targets` linears of `model` in place; returns {parameter name: mask}.

    calib: list of (tokens, labels); forward(model, tokens, labels) runs the model (only for
    wanda / sparsegpt). Layers go in forward order, each seeing the already pruned ones.
    """
    if method not in METHODS:
        raise ValueError(f"prune: method must be one of {list(METHODS)}, got {method!r}")
    if method != "magnitude" and not calib:
        raise ValueError(
            f"prune: {method} scores weights by their calibration inputs, but no calibration "
            "batches were given; pass at least one (--calib-batches 1 or more), or use magnitude"
        )
    was_training = model.training
    model.eval()
    masks = {}
    for name, module in target_modules(model, targets):
        weight = module.weight
        if weight.shape[1] % 4:
            raise ValueError(f"prune: {name} has {weight.shape[1]} inputs, not a multiple of 4")
        if method == "magnitude":
            pruned, chosen = magnitude_prune(weight)
        else:
            gram = _input_gram(model, module, calib, forward)
            if method == "wanda":
                pruned, chosen = wanda_prune(weight, torch.diag(gram))
            else:
                pruned, chosen = sparsegpt_prune(weight, 2 * gram / max(len(calib), 1))
        weight.copy_(pruned)
        masks[name + ".weight"] = _final_mask(weight, chosen)
    model.train(was_training)
    return masks


def calibration_batches(args, count):
    """`count` (tokens, labels) batches from the demo corpus' training split (seed args.seed)."""
    from megasparse.tools.gpt_text import load_corpus, text_batches

    data = load_corpus(args.corpus_bytes)
    split = int(0.9 * len(data))
    g = torch.Generator().manual_seed(args.seed + 3)
    return [text_batches(data[:split], args.seq, args.batch, g) for _ in range(count)]


def check_save_dir(path: str, overwrite: bool) -> None:
    """Refuse to write into a file or, unless `overwrite`, into a directory that holds anything."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"prune: --save {path} is a file; give a directory for the checkpoint")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise ValueError(
            f"prune: --save {path} is not empty (it may hold a checkpoint, even the --load one); "
            "give a new or empty directory, or pass --overwrite to replace its checkpoint"
        )


def prune_checkpoint(args):
    """Load args.load, prune, save args.save; returns the masks. Megatron: initialized, TP=1."""
    from megatron.core import dist_checkpointing

    from megasparse.tools.gpt_text import build_gpt, gpt_loss

    check_save_dir(args.save, getattr(args, "overwrite", False))
    model = build_gpt(args, None, torch.device("cpu"))
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), args.load))
    calib = calibration_batches(args, args.calib_batches) if args.method != "magnitude" else []
    masks = prune_model(model, args.method, calib, gpt_loss, args.targets)
    os.makedirs(args.save, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), args.save)
    with open(os.path.join(args.save, "megasparse_prune.json"), "w") as f:
        json.dump(
            {
                "method": args.method,
                "calib_batches": len(calib),
                "seed": args.seed,
                "targets": list(args.targets),
                "pruned": sorted(masks),
            },
            f,
            indent=1,
        )
    return masks


def parse_args(argv=None):
    from megasparse.tools.gpt_text import add_model_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="dense dist_checkpointing checkpoint (demo GPT)")
    p.add_argument("--save", required=True, help="where the pruned checkpoint goes (new/empty dir)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into --save even if it is not empty (replaces the checkpoint there)",
    )
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument(
        "--calib-batches",
        type=int,
        default=16,
        help="calibration batches (wanda, sparsegpt: at least 1)",
    )
    p.add_argument("--targets", nargs="+", default=["fc1", "fc2"], choices=list(MODULE_NAMES))
    add_model_args(p)
    args = p.parse_args(argv)
    if args.calib_batches < 0:
        p.error(f"--calib-batches must be >= 0, got {args.calib_batches}")
    if args.method != "magnitude" and args.calib_batches < 1:
        p.error(
            f"--method {args.method} scores weights by their calibration inputs: "
            f"--calib-batches must be at least 1, got {args.calib_batches} (or use --method magnitude)"
        )
    try:
        check_save_dir(args.save, args.overwrite)
    except ValueError as e:
        p.error(str(e))
    args.tp = 1
    return args


def main(argv=None):
    from megatron.core import parallel_state

    from megasparse.testing import free_port, init_megatron, shutdown_megatron

    args = parse_args(argv)
    own = not parallel_state.model_parallel_is_initialized()
    if own:  # one gloo process at TP=1
        init_megatron(0, 1, free_port(), tensor_model_parallel_size=1)
    try:
        masks = prune_checkpoint(args)
    finally:
        if own:
            shutdown_megatron()
    print(f"megasparse.tools.prune: {args.method} pruned {len(masks)} linears 2:4 -> {args.save}")
    return masks


if __name__ == "__main__":
    main()
