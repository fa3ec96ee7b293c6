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

    python -m megasparse.tools.demo --quality   # the quality table (docs/quality.md)

runs the 2:4 pretraining recipes of the literature on the same model, data and seeds (2:4 weights
on fc1/fc2, no activation sparsity; QUALITY_RECIPES): dense; 2:4 with ste / srste (Zhou et al.
2021) / masked_decay (Hu et al., ICML 2024) / sste (Hu et al., NeurIPS 2024), each without and with
the MVUE weight gradient (Chmiel et al., ICLR 2023); sparse-then-dense; and pruned-from-dense
(SparseGPT, megasparse.tools.prune, at half the steps) then sparse fine-tune with the mask held.
Columns: validation loss, gap to dense in %, final flip rate (share of mask entries changed per
step, mean over the last 5% of steps and the sparse layers; Hu et al., ICML 2024). Plot: loss and
flip rate over steps (demo_out/quality.png). Seeds: --seed s initializes the model (s), draws the
training batches (s+1), the validation batches (s+2), the calibration batches (s+3) and the MVUE
draws (wgrad_seed=s).

    python -m megasparse.tools.demo --fp8       # the FP8 + 2:4 table (docs/fp8.md)

runs FP8_RECIPES on the same model, data and seeds with bf16 parameters and fp32 master weights
(`MasterWeights`): bf16 dense, FP8 dense, bf16 2:4, and FP8 2:4 in both orders
(prune-then-quantize, quantize-then-prune), FP8 through the local spec's path
(SparsityConfig(fp8="hybrid"), emulated on the CPU) on the sparse targets. It also runs
megasparse.tools.fp8_numerics on the trained FP8 2:4 layers and saves them
(demo_out/<recipe>_rank0.pt). Outputs: demo_out/fp8.md, fp8.json, fp8.png.

    python -m megasparse.tools.demo --activation-sweep --threads 1   # the activation frontier

trains megasparse.tools.activation_sweep.SWEEP_RECIPES (dense; 2:4 weights; 2:4 weights with 2:4
or V:N:M activations, with and without both-ways weight gradients) on the same model, data and
schedule (dense 10% / sparse 70% / dense 20%), at its own size (SWEEP_DEFAULTS: TP=1, ffn 512),
with --sweep-seeds (dense and the recommended row run every seed, the others the first). Columns:
final and end-of-sparse-phase validation loss, share of the activation's L1 mass dropped in the
sparse phase, projected H100 speed-ups (perfmodel.projected_speedups). Outputs:
demo_out/activation_frontier.md, .json, .png (--sweep-plot), each run in demo_out/sweep_runs/
(--resume reuses them).
"""

import argparse
import dataclasses
import logging
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import megasparse
from megasparse.config import Fp8Order, SparsityConfig
from megasparse.tools.gpt_text import (
    add_model_args,
    build_gpt,
    gpt_loss,
    load_corpus,
    text_batches,
)

RECIPES = {
    "dense": dict(sparsity=None),
    "2:4": dict(sparsity=SparsityConfig(weights="2:4")),
    "2:4+act-2:4": dict(sparsity=SparsityConfig(weights="2:4", activations="2:4")),
    "sparse-then-dense": dict(
        sparsity=SparsityConfig(weights="2:4", activations="2:4"),
        dense_warmup=0.10,
        dense_final=0.25,
    ),
}


def _quality(gradient="ste", **kw):
    return SparsityConfig(weights="2:4", gradient=gradient, track_flip_rate=True, **kw)


QUALITY_RECIPES = {  # --quality: 2:4 weights only (fc1, fc2), see the module docstring
    "dense": dict(sparsity=None),
    "ste": dict(sparsity=_quality("ste")),
    "srste": dict(sparsity=_quality("srste")),
    "masked_decay": dict(sparsity=_quality("masked_decay")),
    "sste": dict(sparsity=_quality("sste")),
    "ste+mvue": dict(sparsity=_quality("ste", wgrad_sparsity="mvue")),
    "srste+mvue": dict(sparsity=_quality("srste", wgrad_sparsity="mvue")),
    "masked_decay+mvue": dict(sparsity=_quality("masked_decay", wgrad_sparsity="mvue")),
    "sste+mvue": dict(sparsity=_quality("sste", wgrad_sparsity="mvue")),
    "sparse-then-dense": dict(sparsity=_quality("ste"), dense_warmup=0.10, dense_final=0.25),
    # dense for half the steps, SparseGPT one-shot 2:4, then sparse fine-tuning with that mask held
    "pruned-then-sparse": dict(
        sparsity=_quality("masked", mask_refresh_interval=1_000_000),
        dense_warmup=0.5,
        prune="sparsegpt",
    ),
}


def _fp8(weights="2:4", order=Fp8Order.PRUNE_THEN_QUANTIZE):
    return SparsityConfig(weights=weights, fp8="hybrid", fp8_order=order)


FP8_RECIPES = {  # --fp8: bf16 model, fp32 master weights; FP8 GEMMs on the targets (fc1, fc2)
    "bf16-dense": dict(sparsity=None, bf16=True),
    "fp8-dense": dict(sparsity=_fp8(weights=None), bf16=True),
    "bf16-2:4": dict(sparsity=SparsityConfig(weights="2:4"), bf16=True),
    **{f"fp8-2:4-{order}": dict(sparsity=_fp8(order=order), bf16=True) for order in Fp8Order},
}
ALL_RECIPES = {**RECIPES, **QUALITY_RECIPES, **FP8_RECIPES}


class MasterWeights:
    """bf16 parameters with fp32 master copies in the optimizer (Megatron's bf16 mixed precision):
    gradients are copied up, AdamW steps the fp32 copies, which are copied back down."""

    def __init__(self, model, lr):
        self.params = list(model.parameters())
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.optimizer = torch.optim.AdamW(self.master, lr=lr, weight_decay=0.0)

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        for p, m in zip(self.params, self.master):
            m.grad = None if p.grad is None else p.grad.float()
        self.optimizer.step()
        for p, m in zip(self.params, self.master):
            p.copy_(m)


@torch.no_grad()
def sparsity_stats(model):
    """Across TP ranks: share of |W| the masks keep (sparse layers only) and the FFN activation stats."""
    from megasparse.core.masks import weight_mask
    from megasparse.megatron.schedule import sparse_modules

    kept = total = zeros = act_total = act_dropped = numel = 0.0
    for m in sparse_modules(model):
        if getattr(m, "weight", None) is not None and m.sparsity.weights is not None:
            a = m.weight.abs().double()
            kept += float(
                (a * weight_mask(m.weight, m.sparsity.mask)).sum()
            )  # also in a dense phase
            total += float(a.sum())
    activations = megasparse.stats(model).activation_sums()  # the fc2 layers' activations
    if activations is not None:
        zeros, act_total, act_dropped, numel = activations.tolist()
    device = next(model.parameters()).device  # NCCL reduces device tensors only
    t = torch.tensor(
        [kept, total, zeros, act_total, act_dropped, numel], dtype=torch.float64, device=device
    )
    dist.all_reduce(t)
    kept, total, zeros, act_total, act_dropped, numel = t.tolist()
    return {
        "w_kept": kept / total if total else None,
        "act_zeros": zeros / numel if numel else None,
        "act_dropped": act_dropped / act_total if act_total else None,
    }


def phase_label(sparsity, phase: str) -> str:
    """What the progress bar shows: the schedule's phase, or "dense" for a recipe with no sparsity."""
    dense = sparsity is None or (sparsity.weights is None and sparsity.activations is None)
    return "dense" if dense else phase


def _prune_now(model, method, args, data, device):
    """One-shot 2:4 pruning of the (still dense) model's target linears (megasparse.tools.prune)."""
    from megasparse.tools.prune import prune_model

    g = torch.Generator().manual_seed(args.seed + 3)
    split = int(0.9 * len(data))
    calib = [
        tuple(t.to(device) for t in text_batches(data[:split], args.seq, args.batch, g))
        for _ in range(16)
    ]
    prune_model(model, method, calib, gpt_loss, args.targets)


def _optimizer(model, args, bf16):
    if bf16:
        return MasterWeights(model, args.lr)
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)


def train_recipe(name, args, data, device, recipe=None):
    """Train one recipe (ALL_RECIPES[name], or `recipe`) with args.seed; the result's curves and
    stats. With a schedule, it also evaluates at the end of the sparse phase, and sums the
    activation statistics over the sparse phase's training steps."""
    from megasparse.megatron.schedule import SPARSE, SparsitySchedule, sparse_modules

    recipe = ALL_RECIPES[name] if recipe is None else recipe
    sparsity = recipe["sparsity"]
    if sparsity is not None and sparsity.wgrad_sparsity is not None:
        sparsity = dataclasses.replace(sparsity, wgrad_seed=args.seed)
    model = build_gpt(args, sparsity, device)
    bf16 = recipe.get("bf16", False)
    if bf16:
        model = model.to(torch.bfloat16)  # the same initialization, rounded
    schedule = SparsitySchedule(
        dense_warmup_iters=int(recipe.get("dense_warmup", 0) * args.steps),
        dense_final_iters=int(recipe.get("dense_final", 0) * args.steps),
        train_iters=args.steps,
    )
    opt = _optimizer(model, args, bf16)
    split = int(0.9 * len(data))
    train_gen, val_gen = (
        torch.Generator().manual_seed(args.seed + 1),
        torch.Generator().manual_seed(args.seed + 2),
    )
    val_batches = [
        text_batches(data[split:], args.seq, args.batch, val_gen) for _ in range(args.val_batches)
    ]
    curve, val_curve, seconds, timed = [], [], 0.0, 0
    flips = []
    last_sparse = (
        args.steps - schedule.dense_final_iters - 1 if schedule.dense_final_iters else None
    )
    sparse_end_val, sparse_sums, act_sparse_iters = None, None, []
    prune_at = schedule.dense_warmup_iters if recipe.get("prune") else None
    rank0 = dist.get_rank() == 0
    steps = range(args.steps)
    if rank0:
        from tqdm import tqdm

        steps = tqdm(steps, desc=f"{name:>22}", ncols=100, file=sys.stdout, mininterval=1.0)
    for it in steps:
        if it == prune_at:
            _prune_now(model, recipe["prune"], args, data, device)
            # fine-tune with a fresh optimizer (no moments of the pruned weights)
            opt = _optimizer(model, args, bf16)
        phase = schedule.apply(model, it)
        for m in sparse_modules(model):
            if getattr(m, "activation_counter", None) is not None:
                m.activation_counter.reset()  # this training step's activation (the last one is reported)
        tokens, labels = (
            t.to(device) for t in text_batches(data[:split], args.seq, args.batch, train_gen)
        )
        start = time.perf_counter()
        loss = gpt_loss(model, tokens, labels)
        # this step's masks against the last ones (0 for held masks; read when the curve is)
        flips.append(megasparse.stats(model).step_flip_rate() if sparsity is not None else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it >= min(10, args.steps // 2):  # the first steps pay one-time costs
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds, timed = seconds + time.perf_counter() - start, timed + 1
        curve.append(loss.item())
        sums = megasparse.stats(model).activation_sums()  # before an evaluation adds its forwards
        if sums is not None and sums[3] > 0:
            act_sparse_iters.append(it)
            if phase == SPARSE:
                sparse_sums = sums.clone() if sparse_sums is None else sparse_sums + sums
        if it % args.eval_every == 0 or it == args.steps - 1 or it == last_sparse:
            val_curve.append((it, evaluate(model, val_batches, device)))
            if it == last_sparse:
                sparse_end_val = val_curve[-1][1]  # still in the sparse phase
        if rank0:
            steps.set_postfix(
                loss=f"{curve[-1]:.3f}", phase=phase_label(recipe["sparsity"], phase), refresh=False
            )
    stats = sparsity_stats(model)
    stats.update(_sparse_phase_stats(sparse_sums, sparsity, device))
    if sparsity is not None and sparsity.fp8 is not None and sparsity.weights is not None:
        stats["fp8_numerics"] = _fp8_numerics(model, name, sparsity, args)
    flip_curve = [(i, float(f)) for i, f in enumerate(flips) if f is not None]
    tail = [f for i, f in flip_curve if i >= args.steps - max(1, args.steps // 20)]
    return {
        "recipe": name,
        "seed": args.seed,
        "val_loss": val_curve[-1][1],
        "sparse_end_val_loss": sparse_end_val,
        "act_sparse_iters": act_sparse_iters,
        "train_curve": curve,
        "val_curve": val_curve,
        "ms_per_step": 1000 * seconds / max(timed, 1),
        "flip_curve": flip_curve,
        "final_flip_rate": sum(tail) / len(tail) if tail else None,
        **stats,
    }


def run_activation_sweep(args, data, device):
    """The activation frontier's runs (activation_sweep.runs over args.recipes and
    args.sweep_seeds), each saved as JSON under args.out/sweep_runs (reused with args.resume),
    with the row's density and the perfmodel's current projection."""
    from megasparse.tools import activation_sweep

    results = []
    for name, seed in activation_sweep.runs(args.recipes, args.sweep_seeds, args.sweep_repeat):
        recipe = activation_sweep.SWEEP_RECIPES[name]
        path = os.path.join(args.out, "sweep_runs", f"{name.replace(':', '-')}_seed{seed}.json")
        if args.resume and os.path.exists(path):
            with open(path) as f:
                result = json.load(f)
        else:
            run_args = argparse.Namespace(**{**vars(args), "seed": seed})
            result = train_recipe(name, run_args, data, device, recipe=recipe)
            if dist.get_rank() == 0:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    json.dump(result, f)
        sparsity = recipe["sparsity"]
        result.update(  # not saved: a resumed run takes the perfmodel as it is now
            density=activation_sweep.density(recipe),
            projected=activation_sweep.projection(recipe),
            sparsity_activation_wgrad=sparsity and sparsity.activation_wgrad,
        )
        results.append(result)
    return results


def _sparse_phase_stats(sums, sparsity, device):
    """Across TP ranks: the sparse phase's activation exact zeros and share of L1 dropped (0 for a
    recipe without activation sparsity), and the activation elements counted."""
    if sums is None:
        dropped = 0.0 if sparsity is None or sparsity.activations is None else None
        return {"sparse_act_zeros": None, "sparse_act_dropped": dropped, "sparse_act_elements": 0}
    sums = sums.to(device=device, dtype=torch.float64)
    dist.all_reduce(sums)
    zeros, total, dropped, numel = sums.tolist()
    return {
        "sparse_act_zeros": zeros / numel,
        "sparse_act_dropped": dropped / total if total else 0.0,
        "sparse_act_elements": int(numel),
    }


def _fp8_numerics(model, name, sparsity, args):
    """megasparse.tools.fp8_numerics on this rank's trained shards (the tensors the per-tensor FP8
    scales are taken of); rank 0 also saves its shards for the command-line tool."""
    from megasparse.tools.fp8_numerics import report as numerics_report

    fp8_layers = {  # the layers that ran FP8 (the recipe's targets), not attention's bf16 GEMMs
        f"{n}.weight": m.weight.detach()
        for n, m in model.named_modules()
        if getattr(getattr(m, "sparsity", None), "fp8", None) is not None
    }
    if dist.get_rank() == 0:
        os.makedirs(args.out, exist_ok=True)
        torch.save(fp8_layers, os.path.join(args.out, f"{name.replace(':', '')}_rank0.pt"))
    return numerics_report(fp8_layers, sparsity.mask)


@torch.no_grad()
def evaluate(model, val_batches, device):
    model.eval()
    losses = [gpt_loss(model, t.to(device), lab.to(device)).item() for t, lab in val_batches]
    model.train()
    return sum(losses) / len(losses)


def report(results, args, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    fmt = lambda v, spec: "-".rjust(int(spec.split(".")[0])) if v is None else format(v, spec)  # noqa: E731
    lines = [
        f"byte-level GPT on the Python stdlib source, TP={args.tp}, {args.layers} layers, hidden {args.hidden}, "
        f"ffn {args.ffn}, seq {args.seq}, batch {args.batch}, {args.steps} steps; "
        f"sparse targets {' '.join(args.targets)}",
        f"{'recipe':>18} | {'val loss':>8} | {'act zeros':>9} | {'act L1 dropped':>14} | "
        f"{'|W| kept':>8} | {'ms/step':>8}",
    ]
    lines.append("-" * len(lines[1]))
    for r in results:
        lines.append(
            f"{r['recipe']:>18} | {r['val_loss']:>8.3f} | {fmt(r['act_zeros'], '9.3f')} | "
            f"{fmt(r['act_dropped'], '14.4f')} | {fmt(r['w_kept'], '8.3f')} | {r['ms_per_step']:>8.1f}"
        )
    lines.append(
        "act: the FFN activation (fc2 input) of the last training step; |W| kept: share of the sparse "
        "layers' |W| inside the 2:4 masks at the end (in a dense phase: what the masks would keep)"
    )
    print("\n" + "\n".join(lines))
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"settings": vars(args), "results": results}, f, indent=1)
    if plot(results, os.path.join(out_dir, "loss_curves.png")):
        print(f"wrote {out_dir}/results.json and {out_dir}/loss_curves.png")
    else:
        print(
            f"wrote {out_dir}/results.json; no loss_curves.png: matplotlib is not installed "
            "(pip install matplotlib, or pip install 'megasparse[plot]')"
        )


def quality_report(results, args, out_dir, seconds):
    """The quality table: validation loss, gap to dense in %, final flip rate."""
    os.makedirs(out_dir, exist_ok=True)
    dense = next((r["val_loss"] for r in results if r["recipe"] == "dense"), None)
    lines = [
        f"byte-level GPT on the Python stdlib source, TP={args.tp}, {args.layers} layers, "
        f"hidden {args.hidden}, ffn {args.ffn}, seq {args.seq}, batch {args.batch}, "
        f"{args.steps} steps, AdamW lr {args.lr}, seed {args.seed}; 2:4 weights on "
        f"{' '.join(args.targets)}; {args.val_batches} validation batches",
        f"| {'recipe':<18} | {'val loss':>8} | {'gap to dense':>12} | {'final flip rate':>15} "
        f"| {'ms/step':>7} |",
        f"|{'-' * 20}|{'-' * 10}:|{'-' * 13}:|{'-' * 16}:|{'-' * 8}:|",
    ]
    for r in results:
        gap = "-" if dense is None else f"{100 * (r['val_loss'] - dense) / dense:+.2f}%"
        flip = "-" if r["final_flip_rate"] is None else f"{r['final_flip_rate']:.2e}"
        lines.append(
            f"| {r['recipe']:<18} | {r['val_loss']:>8.4f} | {gap:>12} | {flip:>15} | "
            f"{r['ms_per_step']:>7.1f} |"
        )
    lines.append(f"wall time {seconds / 60:.1f} min")
    print("\n" + "\n".join(lines))
    with open(os.path.join(out_dir, "quality.json"), "w") as f:
        json.dump({"settings": vars(args), "results": results, "table": lines}, f, indent=1)
    with open(os.path.join(out_dir, "quality.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plotted = plot(results, os.path.join(out_dir, "quality.png"), flips=True)
    print(
        f"wrote {out_dir}/quality.json, {out_dir}/quality.md"
        + (" and quality.png" if plotted else " (no plot: pip install 'megasparse[plot]')")
    )


def fp8_report(results, args, out_dir, seconds):
    """The FP8 table: validation loss, gap to bf16 dense, the FP8 cost (gap to the bf16
    run of the same sparsity), and the per-layer FP8 weight errors of the trained FP8 2:4 models."""
    from megasparse.tools.fp8_numerics import format_table

    os.makedirs(out_dir, exist_ok=True)
    by_name = {r["recipe"]: r["val_loss"] for r in results}
    gap = lambda a, b: "-" if b is None else f"{100 * (a - b) / b:+.2f}%"  # noqa: E731
    lines = [
        f"byte-level GPT on the Python stdlib source, TP={args.tp}, {args.layers} layers, "
        f"hidden {args.hidden}, ffn {args.ffn}, seq {args.seq}, batch {args.batch}, "
        f"{args.steps} steps, AdamW lr {args.lr}, seed {args.seed}; bf16 parameters with fp32 "
        f"master weights; FP8 (HYBRID, current per-tensor scaling, the CPU emulation of "
        f"the GPU math) and 2:4 on {' '.join(args.targets)}",
        f"| {'recipe':<28} | {'val loss':>8} | {'gap to bf16 dense':>17} | "
        f"{'FP8 cost':>8} | {'ms/step':>7} |",
        f"|{'-' * 30}|{'-' * 10}:|{'-' * 18}:|{'-' * 9}:|{'-' * 8}:|",
    ]
    for r in results:
        name = r["recipe"]
        bf16_twin = "bf16-2:4" if "2:4" in name else "bf16-dense"
        cost = gap(r["val_loss"], by_name.get(bf16_twin)) if name.startswith("fp8") else "-"
        lines.append(
            f"| {name:<28} | {r['val_loss']:>8.4f} | "
            f"{gap(r['val_loss'], by_name.get('bf16-dense')):>17} | {cost:>8} | "
            f"{r['ms_per_step']:>7.1f} |"
        )
    lines.append(
        "FP8 cost: the gap to the bf16 run with the same sparsity; ms/step: CPU emulation, not a speed"
    )
    lines.append(f"wall time {seconds / 60:.1f} min")
    for r in results:
        if r.get("fp8_numerics"):
            lines += [
                "",
                f"{r['recipe']}: per-layer FP8 weight errors of the trained model (rank 0)",
            ]
            lines.append(format_table(r["fp8_numerics"]))
    print("\n" + "\n".join(lines))
    with open(os.path.join(out_dir, "fp8.json"), "w") as f:
        json.dump({"settings": vars(args), "results": results, "table": lines}, f, indent=1)
    with open(os.path.join(out_dir, "fp8.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plotted = plot(results, os.path.join(out_dir, "fp8.png"))
    print(
        f"wrote {out_dir}/fp8.json, {out_dir}/fp8.md"
        + (" and fp8.png" if plotted else " (no plot: pip install 'megasparse[plot]')")
    )


def plot(results, path, flips=False) -> bool:
    """Loss (and flip-rate) curves as a PNG; False (nothing written) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if flips:
        fig, (train_ax, val_ax, flip_ax) = plt.subplots(1, 3, figsize=(16, 4.6))
        for r in results:
            if r.get("flip_curve"):
                steps, rates = zip(*r["flip_curve"])
                flip_ax.plot(steps, [max(v, 1e-7) for v in rates], label=r["recipe"], linewidth=0.9)
        flip_ax.set_yscale("log")
        flip_ax.set_xlabel("iteration")
        flip_ax.set_ylabel("share of mask entries changed")
        flip_ax.set_title("mask flip rate (Hu et al. 2024)")
        flip_ax.grid(alpha=0.3)
        flip_ax.legend(fontsize=7)
    else:
        fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    floor = min(min(v for _, v in r["val_curve"]) for r in results)
    for r in results:
        curve = torch.tensor(r["train_curve"])
        smooth = torch.nn.functional.avg_pool1d(
            curve[None, None], 25, 1, 12, count_include_pad=False
        )[0, 0]
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
    fig.suptitle("megasparse demo: byte-level GPT (megatron-core) on Python stdlib source")
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
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) // args.tp))
    init_megatron(
        rank, args.tp, port, backend="nccl" if cuda else "gloo", tensor_model_parallel_size=args.tp
    )
    try:
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        data = load_corpus(args.corpus_bytes)
        start = time.perf_counter()
        if args.activation_sweep:
            results = run_activation_sweep(args, data, device)
        else:
            results = [train_recipe(name, args, data, device) for name in args.recipes]
        if rank == 0:
            if args.activation_sweep:
                from megasparse.tools.activation_sweep import write_report

                write_report(results, args, time.perf_counter() - start)
            elif args.quality:
                quality_report(results, args, args.out, time.perf_counter() - start)
            elif args.fp8:
                fp8_report(results, args, args.out, time.perf_counter() - start)
            else:
                report(results, args, args.out)
    finally:
        shutdown_megatron()


def parse_args(argv=None) -> argparse.Namespace:
    """The demo's flags; --activation-sweep brings its own model size (flags given still win)."""
    from megasparse.tools.activation_sweep import REPEATED, SWEEP_DEFAULTS, SWEEP_RECIPES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--activation-sweep",
        action="store_true",
        help="the activation quality-speed frontier (activation_sweep.SWEEP_RECIPES: measured val "
        "loss, projected speed-up; its own model size and steps, see the module docstring)",
    )
    p.add_argument(
        "--sweep-seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="--activation-sweep: every row runs the first seed, the --sweep-repeat rows all",
    )
    p.add_argument(
        "--sweep-repeat",
        nargs="+",
        default=list(REPEATED),
        choices=list(SWEEP_RECIPES),
        help="--activation-sweep: the rows that run every seed (default: dense and the "
        "recommended row, activation_sweep.REPEATED)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="--activation-sweep: reuse the runs already saved under OUT/sweep_runs",
    )
    p.add_argument(
        "--sweep-plot",
        default=None,
        help="--activation-sweep: where the Pareto plot goes (default OUT/activation_frontier.png)",
    )
    p.add_argument(
        "--tp",
        type=int,
        default=2,
        help="tensor-parallel size (processes; GPUs when there are any)",
    )
    p.add_argument("--steps", type=int, default=400)
    p.add_argument(
        "--quality",
        action="store_true",
        help="the quality table (QUALITY_RECIPES; see the module docstring)",
    )
    p.add_argument(
        "--fp8",
        action="store_true",
        help="the FP8 table (FP8_RECIPES: bf16 / FP8 dense / FP8 2:4, both orders)",
    )
    p.add_argument(
        "--recipes",
        nargs="+",
        default=None,
        choices=[*ALL_RECIPES, *SWEEP_RECIPES],
        help="default: all of RECIPES (of QUALITY_RECIPES with --quality, FP8_RECIPES with --fp8, "
        "SWEEP_RECIPES with --activation-sweep)",
    )
    p.add_argument(
        "--val-batches",
        type=int,
        default=None,
        help="validation batches (default 4; 16 with --quality)",
    )
    p.add_argument(
        "--targets",
        nargs="+",
        default=["fc1", "fc2"],
        help="linears made sparse (see sparsify_spec)",
    )
    add_model_args(p)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads per process (default: the cores over TP; 1 on a machine shared with "
        "other jobs, where more threads wait on each other)",
    )
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--out", default="demo_out", help="where results.json and loss_curves.png go")
    if p.parse_known_args(argv)[0].activation_sweep:
        p.set_defaults(**SWEEP_DEFAULTS)  # the frontier's size: flags given still win
    args = p.parse_args(argv)
    if args.recipes is None:
        args.recipes = list(
            QUALITY_RECIPES
            if args.quality
            else FP8_RECIPES
            if args.fp8
            else SWEEP_RECIPES
            if args.activation_sweep
            else RECIPES
        )
    if args.quality + args.fp8 + args.activation_sweep > 1:
        p.error("--quality, --fp8 and --activation-sweep are separate tables: run one at a time")
    if args.activation_sweep and not set(args.recipes) <= set(SWEEP_RECIPES):
        p.error(f"--activation-sweep runs rows of SWEEP_RECIPES only: {list(SWEEP_RECIPES)}")
    if args.val_batches is None:
        args.val_batches = 16 if args.quality else 4
    return args


def main(argv=None):
    from megasparse.testing import free_port

    args = parse_args(argv)
    if 0 < torch.cuda.device_count() < args.tp:
        print(
            f"megasparse.tools.demo: {torch.cuda.device_count()} GPU(s) for TP={args.tp}: running on the CPU over gloo"
        )
    torch.multiprocessing.spawn(_worker, args=(args, free_port()), nprocs=args.tp, join=True)


if __name__ == "__main__":
    main()
