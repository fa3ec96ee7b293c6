"""The main job (for now): a tensor-parallel sparse FFN language model trained on real text on CPU.

    python -m megasparse.demo              # TP=2 over gloo, 4 recipes, ~1-2 minutes on 2 cores

A byte-level next-byte model on the Python standard library's own source (no download):
embedding of the previous `context` bytes -> Megatron's MLP as `SparseMLP` (fc1 a
SparseColumnParallelLinear, Squared-ReLU, fc2 a SparseRowParallelLinear) -> residual -> output
head. It trains each recipe from the same initialization and prints loss, validation loss, the
weight density the GEMMs see, the share of |W| the 2:4 masks keep, and for activation sparsity
how many activations were exact zeros and how much of their L1 mass was dropped. The GPTModel
demo of the roadmap replaces this model.
"""

import argparse
import glob
import os
import sys
import time

import torch
import torch.distributed as dist

from megasparse.config import SparsityConfig

RECIPES = {
    "dense": dict(sparsity=SparsityConfig(enabled=False)),
    "2:4": dict(sparsity=SparsityConfig(mask="1d", gradient="ste")),
    "2:4-transposable-srste": dict(sparsity=SparsityConfig(mask="transposable", gradient="srste")),
    "2:4+act-2:4": dict(sparsity=SparsityConfig(mask="1d", activations="2:4")),
    "act-64:2:8": dict(sparsity=SparsityConfig(weights=None, activations="64:2:8")),
    "2:4-then-dense": dict(sparsity=SparsityConfig(mask="1d", gradient="ste"), dense_final_fraction=0.25),
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


class SparseFFNLanguageModel(torch.nn.Module):
    def __init__(self, config, context, embed, sparsity):
        super().__init__()
        from megatron.core.transformer.mlp import MLPSubmodules

        from megasparse.compat import linear_entry
        from megasparse.layers import SparseColumnParallelLinear, SparseRowParallelLinear
        from megasparse.mlp import SparseMLP

        hidden = context * embed
        self.embed = torch.nn.Embedding(256, embed)
        self.norm = torch.nn.LayerNorm(hidden)
        fc1 = linear_entry(SparseColumnParallelLinear, sparsity)
        fc2 = linear_entry(SparseRowParallelLinear, sparsity)
        self.mlp = SparseMLP(config, MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2), ffn_hidden_size=config.ffn_hidden_size)
        self.head = torch.nn.Linear(hidden, 256)

    def sparse_layers(self):
        return [self.mlp.linear_fc1, self.mlp.linear_fc2]

    def forward(self, windows):  # windows [batch, context] -> logits [batch, 256]
        h = self.embed(windows).flatten(1)
        y, bias = self.mlp(self.norm(h)[None])  # Megatron layers take [seq, batch, hidden]
        return self.head(h + y[0] + bias)


def batches(data, context, batch_size, generator):
    starts = torch.randint(0, len(data) - context - 1, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(context + 1)
    chunk = data[idx]
    return chunk[:, :-1], chunk[:, -1]


@torch.no_grad()
def weight_stats(model):
    """Density of the weight the GEMMs see and the share of |W| the masks keep (summed over TP ranks)."""
    kept = total = nonzero = numel = 0.0
    for layer in model.sparse_layers():
        mask = layer.sparsity_mask()
        a = layer.weight.abs().double()
        kept += float((a * mask).sum())
        total += float(a.sum())
        nonzero += float(mask.sum())
        numel += mask.numel()
    t = torch.tensor([kept, total, nonzero, numel], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[2] / t[3]), float(t[0] / t[1])


def train_recipe(name, args, data_train, data_val, config):
    recipe = RECIPES[name]
    torch.manual_seed(args.seed)  # same init for every recipe (and every rank: replicated parts agree)
    model = SparseFFNLanguageModel(config, args.context, args.embed, recipe["sparsity"])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    dense_from = int(args.steps * (1 - recipe.get("dense_final_fraction", 0.0)))
    rank0 = dist.get_rank() == 0
    bar = range(args.steps)
    if rank0:
        from tqdm import tqdm

        bar = tqdm(bar, desc=f"{name:>24}", ncols=100, file=sys.stdout, mininterval=1.0)
    warmup = min(10, args.steps // 2)  # first steps pay one-time costs: not timed
    start, loss_ema = time.perf_counter(), None
    for step in bar:
        if step == warmup:
            start = time.perf_counter()
        if step == dense_from and dense_from < args.steps:
            for layer in model.sparse_layers():
                layer.sparsity.enabled = False  # dense final phase: the dense master weight carries on
        if step == args.steps - 1:
            model.mlp.activation_stats(reset=True)  # report the activation of the last training step
        x, y = batches(data_train, args.context, args.batch, gen)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        if rank0 and step % 25 == 0:
            bar.set_postfix(loss=f"{loss_ema:.3f}")
    seconds_per_step = (time.perf_counter() - start) / (args.steps - warmup)
    model.eval()
    with torch.no_grad():
        vgen = torch.Generator().manual_seed(999)
        losses = []
        for _ in range(8):
            vx, vy = batches(data_val, args.context, 512, vgen)
            losses.append(torch.nn.functional.cross_entropy(model(vx), vy).item())
        val = sum(losses) / len(losses)
    density, kept = weight_stats(model)
    act = model.mlp.activation_stats()
    return {"recipe": name, "train_loss": loss_ema, "val_loss": val, "density": density,
            "kept_abs_w": kept, "act_zeros": act["zero_fraction"], "act_dropped": act["dropped_l1_fraction"],
            "ms_per_step": 1000 * seconds_per_step}


def _run(args):
    from megatron.core.transformer import TransformerConfig

    from megatron.core.activations import squared_relu

    config = TransformerConfig(
        num_layers=1, hidden_size=args.context * args.embed, ffn_hidden_size=args.ffn, num_attention_heads=args.tp,
        tensor_model_parallel_size=args.tp, use_cpu_initialization=True, params_dtype=torch.float32,
        activation_func=squared_relu, init_method_std=0.02,
    )
    data = load_corpus(args.corpus_bytes)
    split = int(0.9 * len(data))
    results = [train_recipe(name, args, data[:split], data[split:], config) for name in args.recipes]
    if dist.get_rank() == 0:
        print(f"\nbyte-level LM on {len(data) / 1e6:.1f} MB of Python stdlib source, TP={args.tp} (gloo, CPU), "
              f"{args.steps} steps, fc1 {args.context * args.embed}->{args.ffn}, fc2 {args.ffn}->{args.context * args.embed}")
        header = (f"{'recipe':>22} | {'train loss':>10} | {'val loss':>8} | {'W density':>9} | {'|W| kept':>8} | "
                  f"{'act zeros':>9} | {'act L1 dropped':>14} | {'ms/step':>7}")
        print(header + "\n" + "-" * len(header))
        for r in results:
            act = (f"{r['act_zeros']:>9.3f} | {r['act_dropped']:>14.4f}" if r["act_zeros"] == r["act_zeros"]
                   else f"{'-':>9} | {'-':>14}")
            print(f"{r['recipe']:>22} | {r['train_loss']:>10.3f} | {r['val_loss']:>8.3f} | {r['density']:>9.3f} | "
                  f"{r['kept_abs_w']:>8.3f} | {act} | {r['ms_per_step']:>7.1f}")
        print("W density and |W| kept: at the end of training (1.000 in a dense phase). act: the FFN activation of "
              "the last training step, on rank 0's ffn shard (exact zeros before sparsifying, L1 share dropped).")


def _worker(rank, args, port):
    from megasparse.testing import init_megatron, shutdown_megatron

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // args.tp))
    init_megatron(rank, args.tp, port, tensor_model_parallel_size=args.tp)
    try:
        import warnings

        warnings.filterwarnings("ignore")  # Megatron's deprecation notices would bury the progress bars
        _run(args)
    finally:
        shutdown_megatron()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size (gloo processes)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--context", type=int, default=8, help="previous bytes the model sees")
    p.add_argument("--embed", type=int, default=32, help="embedding size per byte (hidden = context*embed)")
    p.add_argument("--ffn", type=int, default=1024, help="FFN size (a multiple of 4*tp)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--corpus-bytes", type=int, default=2_000_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from megasparse.testing import free_port

    torch.multiprocessing.spawn(_worker, args=(args, free_port()), nprocs=args.tp, join=True)


if __name__ == "__main__":
    main()
