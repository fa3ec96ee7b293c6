"""The main job (for now): a tensor-parallel sparse FFN language model trained on real text on CPU.

    python -m megasparse.demo              # TP=2 over gloo, 4 recipes, ~1-2 minutes on 2 cores

A byte-level next-byte model on the Python standard library's own source (no download):
embedding of the previous `context` bytes -> SparseColumnParallelLinear (fc1) -> squared ReLU
-> SparseRowParallelLinear (fc2) -> residual -> output head. It trains each recipe from the
same initialization and prints loss, validation loss, the weight density the GEMMs see and
the share of |W| the 2:4 masks keep. The GPTModel demo of the roadmap replaces this model.
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
    def __init__(self, config, context, embed, ffn, sparsity):
        super().__init__()
        from megasparse.layers import SparseColumnParallelLinear, SparseRowParallelLinear

        hidden = context * embed
        self.context = context
        self.embed = torch.nn.Embedding(256, embed)
        self.norm = torch.nn.LayerNorm(hidden)
        init = lambda w: torch.nn.init.normal_(w, std=0.02)  # noqa: E731
        self.fc1 = SparseColumnParallelLinear(
            hidden, ffn, config=config, init_method=init, bias=True, gather_output=False, sparsity=sparsity
        )
        self.fc2 = SparseRowParallelLinear(
            ffn, hidden, config=config, init_method=init, bias=True, input_is_parallel=True,
            skip_bias_add=False, sparsity=sparsity,
        )
        self.head = torch.nn.Linear(hidden, 256)

    def sparse_layers(self):
        return [self.fc1, self.fc2]

    def forward(self, windows):  # windows [batch, context] -> logits [batch, 256]
        h = self.embed(windows).flatten(1)
        a, _ = self.fc1(self.norm(h)[None])  # Megatron layers take [seq, batch, hidden]
        y, _ = self.fc2(torch.relu(a).square())
        return self.head(h + y[0])


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
    model = SparseFFNLanguageModel(config, args.context, args.embed, args.ffn, recipe["sparsity"])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    dense_from = int(args.steps * (1 - recipe.get("dense_final_fraction", 0.0)))
    rank0 = dist.get_rank() == 0
    bar = range(args.steps)
    if rank0:
        from tqdm import tqdm

        bar = tqdm(bar, desc=f"{name:>24}", ncols=100, file=sys.stdout, mininterval=1.0)
    start, loss_ema = time.perf_counter(), None
    for step in bar:
        if step == dense_from and dense_from < args.steps:
            for layer in model.sparse_layers():
                layer.sparsity.enabled = False  # dense final phase: the dense master weight carries on
        x, y = batches(data_train, args.context, args.batch, gen)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        if rank0 and step % 25 == 0:
            bar.set_postfix(loss=f"{loss_ema:.3f}")
    seconds_per_step = (time.perf_counter() - start) / args.steps
    model.eval()
    with torch.no_grad():
        vgen = torch.Generator().manual_seed(999)
        losses = []
        for _ in range(8):
            vx, vy = batches(data_val, args.context, 512, vgen)
            losses.append(torch.nn.functional.cross_entropy(model(vx), vy).item())
        val = sum(losses) / len(losses)
    density, kept = weight_stats(model)
    return {"recipe": name, "train_loss": loss_ema, "val_loss": val, "density": density,
            "kept_abs_w": kept, "ms_per_step": 1000 * seconds_per_step}


def _run(args):
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=args.context * args.embed, num_attention_heads=args.tp,
        tensor_model_parallel_size=args.tp, use_cpu_initialization=True, params_dtype=torch.float32,
    )
    data = load_corpus(args.corpus_bytes)
    split = int(0.9 * len(data))
    results = [train_recipe(name, args, data[:split], data[split:], config) for name in args.recipes]
    if dist.get_rank() == 0:
        print(f"\nbyte-level LM on {len(data) / 1e6:.1f} MB of Python stdlib source, TP={args.tp} (gloo, CPU), "
              f"{args.steps} steps, fc1 {args.context * args.embed}->{args.ffn}, fc2 {args.ffn}->{args.context * args.embed}")
        header = f"{'recipe':>24} | {'train loss':>10} | {'val loss':>8} | {'weight density':>14} | {'|W| kept':>8} | {'ms/step':>7}"
        print(header + "\n" + "-" * len(header))
        for r in results:
            print(f"{r['recipe']:>24} | {r['train_loss']:>10.3f} | {r['val_loss']:>8.3f} | {r['density']:>14.3f} | "
                  f"{r['kept_abs_w']:>8.3f} | {r['ms_per_step']:>7.1f}")
        print("(weight density and |W| kept are at the end of training: 1.000 for a dense phase)")


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
