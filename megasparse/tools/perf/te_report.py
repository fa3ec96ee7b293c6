"""The TE-spec and MoE sections of perfmodel's output: tables, the targets block, a short summary.

Every figure comes from te_spec's and moe's projected rows; nothing is a measurement.
"""

from megasparse.tools.perf import moe, te_spec
from megasparse.tools.perf.roofline import DEVICES

BOUNDS = te_spec.BOUNDS


def te_rows(device="H100", bounds=BOUNDS) -> list:
    """Every TE-spec and MoE row (bf16, FP8, each change, activation sparsity, MoE), projected."""
    return (
        te_spec.bf16_rows(device, bounds)
        + te_spec.fp8_rows(device, bounds)
        + te_spec.change_rows(device, bounds)
        + te_spec.activation_rows(device, bounds)
        + moe.moe_rows(device, bounds)
    )


def _pick(rows, bound="mid", **where):
    for r in rows:
        if r["bound"] == bound and all(r.get(k) == v for k, v in where.items()):
            return r
    raise KeyError(f"no projected row with {where} at bound {bound}")


def _cells(rows, key, fmt="{:.2f}x", **where):
    return "/".join(fmt.format(_pick(rows, b, **where)[key]) for b in BOUNDS)


def _verdict(value, target, higher=True):
    # equal within float noise counts as met (the TE route runs the local spec's own op)
    miss = (1 - value / target) if higher else (value / target - 1)
    return "MET" if miss <= 1e-9 else f"MISSED by {miss:.2%}"


def _header(device, what, cells="cells low/mid/high of the sparse speed-up table"):
    return (
        f"== {what} (PROJECTED on {DEVICES[device].name}, not measured; h8192/ffn28672, TP 1, "
        f"k={te_spec.K}; {cells})"
    )


def te_tables(rows, device="H100") -> list:
    lines = [
        _header(device, "TE spec, bf16 2:4 (ratios vs TE dense; step = prep + k micro-batches)")
    ]
    lines.append(
        f"  {'mask':<13} {'scope':<6} {'tokens':>6} {'TE dense ms':>11} {'before':>15} "
        f"{'after':>15} {'local spec':>15} {'gate dense':>15}  gate roles (mid)"
    )
    for w in ("1d", "transposable"):
        for tokens in (te_spec.TOKENS, te_spec.GATE_DENSE_TOKENS):
            for scope in ("ffn", "layer"):
                where = dict(section="te_bf16", weights=w, scope=scope, tokens=tokens)
                try:
                    mid = _pick(rows, **where)
                except KeyError:
                    continue
                lines.append(
                    f"  {w:<13} {scope:<6} {tokens:>6} {mid['te_dense_ms']:>11.1f} "
                    f"{_cells(rows, 'before_vs_te_dense', **where):>15} "
                    f"{_cells(rows, 'after_vs_te_dense', **where):>15} "
                    f"{_cells(rows, 'local_vs_te_dense', **where):>15} "
                    f"{_cells(rows, 'forced_dense_vs_te_dense', **where):>15}  "
                    f"{','.join(mid['gate_roles']) or 'none (dense)'}"
                )
    lines.append(
        "  before: TE's dense GEMM on W*M; after: cuSPARSELt (fwd; dgrad with transposable masks) "
        "where the gate keeps sparse, 1d masks holding W*M; gate dense: the gate keeping every "
        "role dense (only the per-step mask + W*M paid); local spec: perfmodel's row (1d under "
        "SparsityConfig's hold_backward_weight default; sparse at every token count: no gate)"
    )
    lines.append(_header(device, "TE spec, FP8 2:4 vs FP8 dense (Megatron's delayed scaling)"))
    lines.append(
        f"  {'mask':<13} {'FFN before':>15} {'norm fused':>15} {'in-GEMM acc':>15} "
        f"{'FFN after':>15} {'fc1 before':>15} {'fc1 after':>15}"
    )
    for w in ("1d", "transposable"):
        where = dict(section="te_fp8", weights=w)
        lines.append(
            f"  {w:<13} "
            + " ".join(
                f"{_cells(rows, key, **where):>15}"
                for key in (
                    "before_vs_fp8_dense",
                    "fused_norm_only_vs_fp8_dense",
                    "accumulate_only_vs_fp8_dense",
                    "after_vs_fp8_dense",
                    "before_fc1_vs_fp8_dense",
                    "after_fc1_vs_fp8_dense",
                )
            )
        )
    lines.append(
        _header(device, "Each change, before -> after", "mid bound; gain = before / after")
    )
    for r in (x for x in rows if x["section"] == "change" and x["bound"] == "mid"):
        extra = ", ".join(
            f"{k} {v:.2f}"
            for k, v in r.items()
            if k.endswith(("_gb", "_gb_per_weight", "_gb_per_ffn", "_ms")) or k == "assumed_gain"
        )
        lines.append(
            f"  {r['change']:<52} {r['before']:8.2f} -> {r['after']:8.2f} {r['unit']:<36} "
            f"gain {r['gain']:.3f}x" + (f"  ({extra})" if extra else "")
        )
    lines.append(
        f"  alg search: the sparse GEMMs / {te_spec.ALG_SEARCH_GAIN:.2f} is an ASSUMPTION (vllmbench's "
        "per-shape H100 tables list different best algorithms, gaps up to ~1.5x), not a measured gain"
    )
    lines.append(_header(device, "TE spec activation sparsity (before: refused by the TE linears)"))
    for recipe in te_spec.ACTIVATION_RECIPES:
        where = dict(section="te_activation", recipe=recipe.name)
        lines.append(
            f"  {recipe.name:<36} vs TE dense {_cells(rows, 'after_vs_te_dense', **where)}"
            f"  (local spec SparseMLP: {_cells(rows, 'local_vs_dense', **where)})"
        )
    return lines


def moe_tables(rows, device="H100") -> list:
    lines = [
        _header(device, "MoE experts, ms per micro-batch (per-step prep / k included)"),
        f"  assumed host costs: {moe.LAUNCH_US:.0f} us per launch, {moe.CSLT_CALL_US:.0f} us per "
        f"per-expert cuSPARSELt call (launch + fresh plan), FP8 expert loop "
        f"{moe.FP8_EXPERT_HOST_US['before']:.0f} -> {moe.FP8_EXPERT_HOST_US['after']:.0f} us per "
        f"expert and call; loads: a fixed ramp +/-{moe.SPREAD:.0%} around the mean, "
        f"{moe.TOKENS} tokens",
        f"  {'experts':<11} {'sparse':>6} {'dense ms':>9} {'before':>15} {'after':>15} "
        f"{'batched/after':>15} {'pad waste':>9} {'even loads':>10} {'FP8 host ms':>12}",
    ]
    for experts, top_k in moe.CASES:
        where = dict(section="moe", experts=experts, top_k=top_k)
        mid = _pick(rows, **where)
        lines.append(
            f"  {experts:>3} top-{top_k:<4} {mid['sparse_experts']:>6} {mid['dense_ms']:>9.1f} "
            f"{_cells(rows, 'before_vs_dense', **where):>15} "
            f"{_cells(rows, 'after_vs_dense', **where):>15} "
            f"{_cells(rows, 'batched_vs_after', **where):>15} "
            f"{mid['batched_padding_waste']:>9.0%} {mid['batched_vs_after_even_loads']:>9.3f}x "
            f"{mid['fp8_host_before_ms']:>5.2f}->{mid['fp8_host_after_ms']:.2f}"
        )
    lines.append(
        "  before: dense grouped GEMMs on stacked W*M; after: per-expert cuSPARSELt above the "
        "4096-token bucket, the rest and all weight gradients grouped; batched: a proposed "
        "binding, one cuSPARSELt call per role over experts padded to the largest load; FP8 host: "
        "the TE FP8 expert loop's host time, exposed only where it exceeds an expert's GEMMs "
        f"(exposed before: {_pick(rows, section='moe', experts=64, top_k=8)['fp8_host_exposed_before_ms']:.2f} ms "
        "at 64 experts of this size)"
    )
    return lines


def targets(rows, device="H100") -> list:
    """The issue's targets on the projection, met or missed by how much, and why."""
    lines = [
        f"== Targets of the TE spec and MoE (PROJECTED on {device}, not measured; 16k tokens, "
        f"k={te_spec.K}, mid bound unless said)"
    ]
    for w in ("transposable", "1d"):
        r = _pick(rows, section="te_bf16", weights=w, scope="ffn", tokens=te_spec.TOKENS)
        lines.append(
            f"  TE bf16 2:4 FFN ({w}) >= local spec: {r['after_vs_te_dense']:.3f}x vs "
            f"{r['local_vs_te_dense']:.3f}x of TE dense -> {_verdict(r['after_ms'], r['local_ms'], False)}"
        )
    r = _pick(rows, section="te_bf16", weights="transposable", scope="ffn", tokens=te_spec.TOKENS)
    lines.append(
        f"  gate keeps dense, within 3% of TE dense: {r['forced_dense_vs_te_dense']:.3f}x at "
        f"{te_spec.TOKENS} tokens -> {_verdict(r['forced_dense_vs_te_dense'], 0.97)}"
    )
    small = _pick(
        rows,
        section="te_bf16",
        weights="transposable",
        scope="ffn",
        tokens=te_spec.GATE_DENSE_TOKENS,
    )
    lines.append(
        f"    at {te_spec.GATE_DENSE_TOKENS} tokens (below the bucket: the gate keeps dense) "
        f"{small['after_vs_te_dense']:.3f}x -> {_verdict(small['after_vs_te_dense'], 0.97)}: the "
        "per-step mask + W*M of both weights is a fixed cost the shorter step no longer hides"
    )
    for w in ("transposable", "1d"):
        r = _pick(rows, section="te_fp8", weights=w)
        cells = _cells(rows, "after_vs_fp8_dense", section="te_fp8", weights=w)
        lines.append(
            f"  TE FP8 2:4 ({w}) vs FP8 dense >= 1.1x: {cells} "
            f"-> {_verdict(r['after_vs_fp8_dense'], 1.1)} (before {r['before_vs_fp8_dense']:.3f}x); "
            f"fc1 vs dense {r['before_fc1_vs_fp8_dense']:.3f}x -> {r['after_fc1_vs_fp8_dense']:.3f}x "
            f"-> {'MET (not slower)' if r['after_fc1_vs_fp8_dense'] >= 1 else 'MISSED (slower)'}"
        )
    search = next(
        x
        for x in rows
        if x["bound"] == "mid" and x.get("change", "").endswith("FP8 (transposable)")
    )
    r = _pick(rows, section="te_fp8", weights="transposable")
    lines.append(
        "    why: the 2:4 path keeps costs TE's dense FP8 does not have: the output-scaling "
        "epilogue of each cuSPARSELt GEMM, a current-scaled e4m3 dY (amax + cast) for the sparse "
        "dgrad, and two dense FP8 weight-gradient GEMMs per FFN; with the ASSUMED "
        f"{te_spec.ALG_SEARCH_GAIN:.2f}x algorithm search: "
        f"{r['fp8_dense_ffn_ms'] / search['after']:.3f}x"
    )
    for experts, top_k in moe.CASES:
        where = dict(section="moe", experts=experts, top_k=top_k)
        r, low = _pick(rows, **where), _pick(rows, "low", **where)
        cells = _cells(rows, "after_vs_dense", **where)
        verdict = (
            f"-> {_verdict(r['after_vs_dense'], 1.1)} at mid, "
            f"{_verdict(low['after_vs_dense'], 1.1)} at low (target >= 1.1x)"
            if experts == 8
            else "(no target)"
        )
        lines.append(
            f"  MoE {experts} experts top-{top_k}, 2:4 vs dense grouped: {cells} {verdict}; "
            f"{r['sparse_experts']}/{experts} experts above the bucket, the rest dense; the "
            "weight gradients stay dense"
        )
    return lines


def summary_rows(device="H100") -> list:
    """The rows `summary` reads, at the mid bound only."""
    return (
        te_spec.bf16_rows(device, ("mid",), (te_spec.TOKENS,))
        + te_spec.fp8_rows(device, ("mid",))
        + moe.moe_rows(device, ("mid",))
    )


def summary(rows, device="H100") -> list:
    """A few lines for perfmodel's default output."""
    bf = _pick(rows, section="te_bf16", weights="transposable", scope="ffn", tokens=te_spec.TOKENS)
    f8 = _pick(rows, section="te_fp8", weights="transposable")
    m8 = _pick(rows, section="moe", experts=8, top_k=2)
    m64 = _pick(rows, section="moe", experts=64, top_k=8)
    return [
        f"== TE spec and MoE summary (PROJECTED, {device}, mid; --te / --moe for the tables)",
        f"  TE bf16 2:4 FFN (transposable): {bf['before_vs_te_dense']:.2f}x -> "
        f"{bf['after_vs_te_dense']:.2f}x TE dense (local spec {bf['local_vs_te_dense']:.2f}x)",
        f"  TE FP8 2:4 FFN (transposable) vs FP8 dense: {f8['before_vs_fp8_dense']:.3f}x -> "
        f"{f8['after_vs_fp8_dense']:.3f}x; fc1 {f8['before_fc1_vs_fp8_dense']:.3f}x -> "
        f"{f8['after_fc1_vs_fp8_dense']:.3f}x",
        f"  MoE experts vs dense grouped: 8 top-2 {m8['before_vs_dense']:.2f}x -> "
        f"{m8['after_vs_dense']:.2f}x; 64 top-8 {m64['before_vs_dense']:.2f}x -> "
        f"{m64['after_vs_dense']:.2f}x",
    ]
