"""The activation quality-speed frontier (`python -m megasparse.tools.demo --activation-sweep`):
its rows, runs and seeds, and its table and Pareto plot (measured validation loss against the
speed-up `megasparse.tools.perfmodel` projects on H100).

Every row trains the demo's GPT from the same initialization on the same batches under the same
schedule: dense warm-up 10% of the steps, sparse 70%, dense final 20% (SparsitySchedule). A row
is 2:4 weights on fc1/fc2 plus an activation pattern on fc2's input, with or without the
both-ways weight gradient (activation_wgrad, the weight-gradient operands sparsified again along
tokens: an approximation of dW, see docs/quality.md); plus the dense and 2:4-weights-only rows.
"""

import json
import math
import os
import statistics
from typing import Optional

from megasparse.config import SparsityConfig, parse_activation_pattern

DENSE_WARMUP, DENSE_FINAL = 0.10, 0.20  # the schedule of every row (and of the projection)
PATTERNS = ("64:2:8", "64:4:8", "64:2:16", "64:4:16", "64:2:32", "64:4:32")  # compacted (M >= 8)
BOTH_WAYS = "64:4:8"  # activation_wgrad of the both-ways rows
RECOMMENDED = "w2:4+a64:2:16"  # the frontier's pick (docs/quality.md): its extra seeds run too
REPEATED = ("dense", RECOMMENDED)  # rows trained with every seed of --sweep-seeds
# The model of the frontier: ffn 512 per rank (16 groups of M = 32), 8 x 64 tokens per step (8
# blocks of V = 64), 400 steps: one run is 10-45 s of CPU time (the V:N:M torch references
# dominate a sparse step), 20 s to 2.5 min on 2 shared CPU cores at one thread (docs/quality.md).
SWEEP_DEFAULTS = dict(
    tp=1, layers=2, hidden=128, ffn=512, batch=8, steps=400, val_batches=32, eval_every=100,
    threads=1,
)  # fmt: skip


def row_name(activations: Optional[str], activation_wgrad: Optional[str] = None) -> str:
    name = "w2:4" + (f"+a{activations}" if activations else "")
    return name + (f"+bw{activation_wgrad}" if activation_wgrad else "")


def _row(weights=None, activations=None, activation_wgrad=None):
    sparsity = None
    if weights is not None or activations is not None:
        sparsity = SparsityConfig(
            weights=weights, activations=activations, activation_wgrad=activation_wgrad
        )
    return dict(sparsity=sparsity, dense_warmup=DENSE_WARMUP, dense_final=DENSE_FINAL)


SWEEP_RECIPES = {
    "dense": _row(),
    row_name(None): _row("2:4"),
    row_name("2:4"): _row("2:4", "2:4"),
    **{row_name(p, bw): _row("2:4", p, bw) for p in PATTERNS for bw in (None, BOTH_WAYS)},
}


def runs(rows, seeds, repeated=REPEATED):
    """(row, seed) in training order: every row with the first seed, then the other seeds of the
    repeated rows (the noise of one seed)."""
    first = [(r, seeds[0]) for r in rows]
    return first + [(r, s) for s in seeds[1:] for r in rows if r in repeated]


def _pattern(recipe):
    s = recipe["sparsity"]
    return (None, None, None) if s is None else (s.weights, s.activations, s.activation_wgrad)


def density(recipe) -> float:
    """Share of the activation the pattern keeps (1 without activation sparsity)."""
    pattern = parse_activation_pattern(_pattern(recipe)[1])
    return 1.0 if pattern is None else pattern.density


def projection(recipe, device="H100", bound="mid") -> Optional[dict]:
    """Projected speed-ups of this row's sparsity (perfmodel.projected_speedups): {"ffn",
    "layer_1b", "layer_7b", "layer_7b_schedule"}, or None where the perfmodel has no such API."""
    from megasparse.tools import perfmodel

    project = getattr(perfmodel, "projected_speedups", None)
    if project is None:
        return None
    weights, activations, wgrad = _pattern(recipe)
    return project(activations, activation_wgrad=wgrad, weights=weights, device=device, bound=bound)


def _mean_spread(values):
    """(mean, sample standard deviation or None for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def paired_gaps(row_results, dense_results):
    """Gap in % of each seed's final val loss to the dense run of the same seed (the seed also
    draws the validation batches, so only same-seed losses compare)."""
    dense = {r["seed"]: r["val_loss"] for r in dense_results}
    return [100 * (r["val_loss"] / dense[r["seed"]] - 1) for r in row_results if r["seed"] in dense]


def _gap(value, ref):
    return "-" if ref is None or value is None else f"{100 * (value - ref) / ref:+.2f}%"


def _num(value, spec):
    return "-" if value is None else format(value, spec)


def table(results, args, seconds, recipes=SWEEP_RECIPES):
    """Markdown lines: one row per pattern (first seed), then mean and spread over seeds."""
    first_seed = min(r["seed"] for r in results)
    by_row = {}
    for r in results:
        by_row.setdefault(r["recipe"], []).append(r)
    dense = next((r for r in by_row.get("dense", []) if r["seed"] == first_seed), None)
    dense_val = dense and dense["val_loss"]
    dense_sparse_end = dense and dense["sparse_end_val_loss"]
    lines = [
        f"Byte-level GPT (megatron-core, local spec) on the Python stdlib source, TP={args.tp}, "
        f"{args.layers} layers, hidden {args.hidden}, ffn {args.ffn} (per rank "
        f"{args.ffn // args.tp}), Squared-ReLU (non-gated), seq {args.seq}, batch {args.batch}, "
        f"{args.steps} steps, AdamW lr {args.lr}, {args.val_batches} validation batches; "
        f"schedule dense {DENSE_WARMUP:.0%} / sparse {1 - DENSE_WARMUP - DENSE_FINAL:.0%} / "
        f"dense {DENSE_FINAL:.0%}; 2:4 weights on {' '.join(args.targets)}; seed {first_seed}.",
        "",
        "| row | act density | val loss (final) | gap to dense | val loss (end of sparse) | "
        "gap to dense | act L1 dropped (sparse phase) | FFN x (projected) | "
        "7B layer x, sparse steps (projected) | 7B layer x, schedule (projected) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, row_results in by_row.items():
        r = next((x for x in row_results if x["seed"] == first_seed), row_results[0])
        proj = r.get("projected") or {}
        lines.append(
            f"| {name} | {r['density']:.3f} | {r['val_loss']:.4f} | "
            f"{_gap(r['val_loss'], dense_val)} | {_num(r['sparse_end_val_loss'], '.4f')} | "
            f"{_gap(r['sparse_end_val_loss'], dense_sparse_end)} | "
            f"{_num(r['sparse_act_dropped'], '.4f')} | {_num(proj.get('ffn'), '.2f')} | "
            f"{_num(proj.get('layer_7b'), '.2f')} | {_num(proj.get('layer_7b_schedule'), '.2f')} |"
        )
    repeated = {n: rs for n, rs in by_row.items() if len(rs) > 1}
    if repeated:
        lines += [
            "",
            "| row | seeds | val loss per seed | gap to dense of the same seed | mean gap | "
            "spread of the gap (sample std) | mean gap within 1% |",
            "|---|---|---|---|--:|--:|---|",
        ]
        for name, rs in repeated.items():
            gaps = paired_gaps(rs, by_row.get("dense", []))
            mean, spread = _mean_spread(gaps) if gaps else (None, None)
            within = "-" if mean is None or name == "dense" else ("yes" if mean <= 1.0 else "no")
            lines.append(
                f"| {name} | {' '.join(str(r['seed']) for r in rs)} | "
                f"{' '.join(format(r['val_loss'], '.4f') for r in rs)} | "
                f"{' '.join(format(g, '+.2f') + '%' for g in gaps)} | "
                f"{_num(mean, '+.2f')}% | {_num(spread, '.2f')} | {within} |"
            )
    lines += [
        "",
        "Rows: w2:4 = 2:4 weights (1d mask, ste) on fc1 and fc2; aV:N:M = that activation pattern on "
        "fc2's input (its GEMMs gather the 4 chosen columns of every M); bw64:4:8 = both-ways "
        "weight gradients (activation_wgrad). act L1 dropped: share of the FFN activation's L1 mass "
        "the pattern removed, summed over the sparse phase's training steps and the layers. "
        "x (projected): megasparse.tools.perfmodel.projected_speedups on H100, mid bound, against "
        "dense bf16; not measured.",
        f"Wall time {seconds / 60:.1f} min on 2 shared CPU cores"
        + (" (this invocation: runs reused with --resume not counted)." if args.resume else "."),
    ]
    return lines


def pareto_front(points):
    """The (x, y) points no other point beats on both axes (higher speed-up x, lower loss y)."""
    front, best = [], math.inf
    for x, y in sorted(points, key=lambda p: (-p[0], p[1])):
        if y < best:
            front.append((x, y))
            best = y
    return sorted(front)


def plot(results, path) -> bool:
    """Final val-loss gap to dense (same seed; mean and spread where several seeds) against the
    projected FFN and 7B-layer speed-ups, with the Pareto front; False (nothing written) without
    matplotlib, projections or a dense run."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_row = {}
    for r in results:
        if r.get("projected"):
            by_row.setdefault(r["recipe"], []).append(r)
    gaps = {n: paired_gaps(rs, by_row.get("dense", [])) for n, rs in by_row.items()}
    gaps = {n: g for n, g in gaps.items() if g}
    if not gaps:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.2))
    for ax, key, label in (
        (axes[0], "ffn", "FFN fwd+bwd"),
        (axes[1], "layer_7b", "7B-like layer, sparse steps"),
    ):
        points = []
        for i, (name, row_gaps) in enumerate(gaps.items()):
            x = by_row[name][0]["projected"][key]
            mean, spread = _mean_spread(row_gaps)
            both_ways = by_row[name][0]["sparsity_activation_wgrad"] is not None
            ax.errorbar(
                x, mean, yerr=spread, fmt="s" if both_ways else "o", capsize=3, markersize=6,
                label=f"{name} ({len(row_gaps)} seed{'s' if len(row_gaps) > 1 else ''})",
                color=plt.cm.tab20(i % 20),
            )  # fmt: skip
            points.append((x, mean))
        front = pareto_front(points)
        ax.plot(*zip(*front), "k--", linewidth=0.8, label="Pareto front")
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")  # the quality target
        ax.text(ax.get_xlim()[0], 1.0, " dense + 1%", fontsize=7, va="bottom")
        ax.set_xlabel(f"projected speed-up vs dense bf16, H100, mid bound ({label})")
        ax.set_ylabel("final val loss gap to dense, same seed (%)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7)
    fig.suptitle(
        "activation patterns with 2:4 weights: measured loss (CPU demo GPT, dense 10% / sparse 70% "
        "/ dense 20%) vs projected speed-up (squares: both-ways weight gradients)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(results, args, seconds):
    """Print the table; write OUT/activation_frontier.md and .json, and the Pareto plot."""
    os.makedirs(args.out, exist_ok=True)
    lines = table(results, args, seconds)
    print("\n" + "\n".join(lines))
    stem = os.path.join(args.out, "activation_frontier")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(stem + ".json", "w") as f:
        json.dump({"settings": vars(args), "results": results, "table": lines}, f, indent=1)
    plot_path = args.sweep_plot or stem + ".png"
    plotted = plot(results, plot_path)
    print(
        f"wrote {stem}.md, {stem}.json"
        + (f" and {plot_path}" if plotted else " (no plot: needs matplotlib and projections)")
    )
