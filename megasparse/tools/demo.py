"""The main job: a real megatron-core GPTModel trained on real text with sparse recipes, side by side.

    python -m megasparse.tools.demo            # TP=2 over gloo on CPU (NCCL on GPUs), 4 recipes, ~4 minutes on 2 cores

A byte-level GPT (vocab 256) learns the Python standard library's own source files (no
download). Every recipe starts from the same initialization and sees the same batches:
  dense                  Megatron's layers
  2:4                    2:4 weights on fc1/fc2 (SparseMLP, Squared-ReLU)
  2:4+act-2:4            plus 2:4 Squared-ReLU activation sparsity
  sparse-then-dense      dense warm-up 10%, 2:4 + act 2:4, dense final 25% (SparsitySchedule)
It prints a table (validation loss, activation exact zeros, activation L1 dropped, |W| kept,
time per step) and writes the numbers to demo_out/results.json and, when matplotlib is installed
(pip install 'megasparse[plot]'), the loss curves to demo_out/loss_curves.png.
"""

import argparse
import glob
import logging
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from megasparse.config import SparsityConfig

RECIPES = {
    "dense": dict(sparsity=None),
    "2:4": dict(sparsity=SparsityConfig(weights="2:4")),
    "2:4+act-2:4": dict(sparsity=SparsityConfig(weights="2:4", activations="2:4")),
    "sparse-then-dense": dict(sparsity=SparsityConfig(weights="2:4", activations="2:4"),
                              dense_warmup=0.10, dense_final=0.25),
}


def load_corpus(max_bytes: int) -> torch.Tensor:
    """Bytes of the standard library's .py files, in a fixed order."""
    root = os.path.dirname(os.__file__)
    data = bytearray()
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        with open(path, "rb") as f:
            data += f.read()
        if len(data) >= max_bytes:
            break
    return torch.frombuffer(bytes(data[:max_bytes]), dtype=torch.uint8).long()


def text_batches(data, seq, batch, generator):
    """(tokens, labels), each [batch, seq]: random windows of the corpus and the next byte."""
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
    windows = data[starts[:, None] + torch.arange(seq + 1)]
    return windows[:, :-1], windows[:, 1:]


def build_gpt(args, sparsity, device):
    from megatron.core.activations import squared_relu
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from megasparse.specs import sparsify_spec

    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads, ffn_hidden_size=args.ffn,
        tensor_model_parallel_size=args.tp, use_cpu_initialization=True, params_dtype=torch.float32,
        activation_func=squared_relu, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02,
    )
    spec = get_gpt_layer_local_spec()
    if sparsity is not None:
        spec = sparsify_spec(spec, sparsity, targets=args.targets)
    torch.manual_seed(args.seed)  # the same initialization for every recipe
    model = GPTModel(config, spec, vocab_size=256, max_sequence_length=args.seq, position_embedding_type="learned_absolute")
    return model.to(device)


def gpt_loss(model, tokens, labels):
    seq = tokens.shape[1]
    positions = torch.arange(seq, device=tokens.device).expand_as(tokens)
    causal = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool, device=tokens.device), diagonal=1)
    return model(tokens, positions, causal, labels=labels).mean()


@torch.no_grad()
def sparsity_stats(model):
    """Across TP ranks: share of |W| the masks keep (sparse layers only) and the FFN activation stats."""
    from megasparse.ops import weight_mask
    from megasparse.schedule import sparse_modules

    kept = total = zeros = act_total = act_dropped = numel = 0.0
    for m in sparse_modules(model):
        if getattr(m, "weight", None) is not None and m.sparsity.weights is not None:
            a = m.weight.abs().double()
            kept += float((a * weight_mask(m.weight, m.sparsity.mask)).sum())  # also in a dense phase
            total += float(a.sum())
        stats = getattr(m, "activation_stats", None)
        if stats is not None and stats.sums is not None:
            z, t, d, n = stats.sums.tolist()
            zeros, act_total, act_dropped, numel = zeros + z, act_total + t, act_dropped + d, numel + n
    device = next(model.parameters()).device  # NCCL reduces device tensors only
    t = torch.tensor([kept, total, zeros, act_total, act_dropped, numel], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    kept, total, zeros, act_total, act_dropped, numel = t.tolist()
    return {"w_kept": kept / total if total else None, "act_zeros": zeros / numel if numel else None,
            "act_dropped": act_dropped / act_total if act_total else None}


def phase_label(sparsity, phase: str) -> str:
    """What the progress bar shows: the schedule's phase, or "dense" for a recipe with no sparsity."""
    return "dense" if sparsity is None else phase


def train_recipe(name, args, data, device):
    from megasparse.schedule import SparsitySchedule, sparse_modules

    recipe = RECIPES[name]
    model = build_gpt(args, recipe["sparsity"], device)
    schedule = SparsitySchedule(dense_warmup_iters=int(recipe.get("dense_warmup", 0) * args.steps),
                                dense_final_iters=int(recipe.get("dense_final", 0) * args.steps), train_iters=args.steps)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    split = int(0.9 * len(data))
    train_gen, val_gen = torch.Generator().manual_seed(args.seed + 1), torch.Generator().manual_seed(args.seed + 2)
    val_batches = [text_batches(data[split:], args.seq, args.batch, val_gen) for _ in range(4)]
    curve, val_curve, seconds, timed = [], [], 0.0, 0
    rank0 = dist.get_rank() == 0
    steps = range(args.steps)
    if rank0:
        from tqdm import tqdm

        steps = tqdm(steps, desc=f"{name:>18}", ncols=100, file=sys.stdout, mininterval=1.0)
    for it in steps:
        phase = schedule.apply(model, it)
        if it == args.steps - 1:
            for m in sparse_modules(model):
                if hasattr(m, "activation_stats"):
                    m.activation_stats.reset()  # report the activation of the last training step
        tokens, labels = (t.to(device) for t in text_batches(data[:split], args.seq, args.batch, train_gen))
        start = time.perf_counter()
        loss = gpt_loss(model, tokens, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it >= min(10, args.steps // 2):  # the first steps pay one-time costs
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds, timed = seconds + time.perf_counter() - start, timed + 1
        curve.append(loss.item())
        if it % args.eval_every == 0 or it == args.steps - 1:
            val_curve.append((it, evaluate(model, val_batches, device)))
        if rank0:
            steps.set_postfix(loss=f"{curve[-1]:.3f}", phase=phase_label(recipe["sparsity"], phase))
    stats = sparsity_stats(model)
    return {"recipe": name, "val_loss": val_curve[-1][1], "train_curve": curve, "val_curve": val_curve,
            "ms_per_step": 1000 * seconds / max(timed, 1), **stats}


@torch.no_grad()
def evaluate(model, val_batches, device):
    model.eval()
    losses = [gpt_loss(model, t.to(device), l.to(device)).item() for t, l in val_batches]
    model.train()
    return sum(losses) / len(losses)


def report(results, args, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    fmt = lambda v, spec: "-".rjust(int(spec.split(".")[0])) if v is None else format(v, spec)  # noqa: E731
    lines = [
        f"byte-level GPT on the Python stdlib source, TP={args.tp}, {args.layers} layers, hidden {args.hidden}, "
        f"ffn {args.ffn}, seq {args.seq}, batch {args.batch}, {args.steps} steps; sparse targets {' '.join(args.targets)}",
        f"{'recipe':>18} | {'val loss':>8} | {'act zeros':>9} | {'act L1 dropped':>14} | {'|W| kept':>8} | {'ms/step':>8}",
    ]
    lines.append("-" * len(lines[1]))
    for r in results:
        lines.append(f"{r['recipe']:>18} | {r['val_loss']:>8.3f} | {fmt(r['act_zeros'], '9.3f')} | "
                     f"{fmt(r['act_dropped'], '14.4f')} | {fmt(r['w_kept'], '8.3f')} | {r['ms_per_step']:>8.1f}")
    lines.append("act: the FFN activation (fc2 input) of the last training step; |W| kept: share of the sparse "
                 "layers' |W| inside the 2:4 masks at the end (in a dense phase: what the masks would keep)")
    print("\n" + "\n".join(lines))
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"settings": vars(args), "results": results}, f, indent=1)
    if plot(results, os.path.join(out_dir, "loss_curves.png")):
        print(f"wrote {out_dir}/results.json and {out_dir}/loss_curves.png")
    else:
        print(f"wrote {out_dir}/results.json; no loss_curves.png: matplotlib is not installed "
              "(pip install matplotlib, or pip install 'megasparse[plot]')")


def plot(results, path) -> bool:
    """Loss curves as a PNG; False (nothing written) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    floor = min(min(v for _, v in r["val_curve"]) for r in results)
    for r in results:
        curve = torch.tensor(r["train_curve"])
        smooth = torch.nn.functional.avg_pool1d(curve[None, None], 25, 1, 12, count_include_pad=False)[0, 0]
        train_ax.plot(smooth.tolist(), label=r["recipe"], linewidth=1.2)
        steps, vals = zip(*r["val_curve"])
        val_ax.plot(steps, vals, "o-", markersize=3, label=r["recipe"], linewidth=1.2)
    for ax, title in ((train_ax, "training loss (25-step mean)"), (val_ax, "validation loss")):
        ax.set_ylim(floor - 0.1, floor + 1.0)
        ax.set_xlabel("iteration")
        ax.set_ylabel("nats / byte")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("megasparse demo: byte-level GPT (megatron-core, TP=2) on Python stdlib source")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _worker(rank, args, port):
    import warnings

    from megasparse.testing import init_megatron, shutdown_megatron

    warnings.filterwarnings("ignore")  # Megatron's deprecation notices would bury the progress bars
    # megatron-core 0.16 logs "Unknown MLP type" for any MLP subclass (SparseMLP): it then uses the default TP group
    logging.getLogger("megatron.core.transformer.transformer_layer").setLevel(logging.ERROR)
    cuda = torch.cuda.device_count() >= args.tp  # one GPU per TP rank, else gloo on the CPU
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // args.tp))
    init_megatron(rank, args.tp, port, backend="nccl" if cuda else "gloo", tensor_model_parallel_size=args.tp)
    try:
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        data = load_corpus(args.corpus_bytes)
        results = [train_recipe(name, args, data, device) for name in args.recipes]
        if rank == 0:
            report(results, args, args.out)
    finally:
        shutdown_megatron()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size (processes; GPUs when there are any)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--targets", nargs="+", default=["fc1", "fc2"], help="linears made sparse (see sparsify_spec)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--corpus-bytes", type=int, default=2_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="demo_out", help="where results.json and loss_curves.png go")
    args = p.parse_args(argv)
    from megasparse.testing import free_port

    if 0 < torch.cuda.device_count() < args.tp:
        print(f"megasparse.demo: {torch.cuda.device_count()} GPU(s) for TP={args.tp}: running on the CPU over gloo")
    torch.multiprocessing.spawn(_worker, args=(args, free_port()), nprocs=args.tp, join=True)


if __name__ == "__main__":
    main()
