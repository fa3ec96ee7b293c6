"""The TE spec on a GPU: Megatron's TE MLP with megasparse's sparse TE linears timed beside TE dense.

`te_ffn_rows` times one optimizer step (k micro-batches forward + backward, then the step that
rebuilds megasparse's per-step state) of Megatron's MLP built from the TE spec's linears
(TELayerNormColumnParallelLinear -> squared ReLU -> TERowParallelLinear) per recipe: dense, 2:4
(1d / transposable) in bf16, and FP8 dense vs FP8 2:4 under TE's fp8_autocast with DelayedScaling
(`transformer_engine.pytorch.fp8_autocast(enabled=, fp8_recipe=)` and
`transformer_engine.common.recipe.DelayedScaling()`: the same signatures in TE v2.5 and v2.18,
checked in TE's source), each beside te_spec's projection. Without CUDA or Transformer Engine it
returns one row saying why and times nothing. `timer(fn) -> ms` and `build` are parameters, so the
plumbing runs on the CPU in the tests.
"""

import functools

import torch

RECIPES = {  # bench name: (SparsityConfig keywords or None for dense, FP8)
    "dense": (None, False),
    "2:4 1d": ({"weights": "2:4", "mask": "1d"}, False),
    "2:4": ({"weights": "2:4", "mask": "transposable"}, False),
    "FP8 dense": (None, True),
    "FP8 2:4": ({"weights": "2:4", "mask": "transposable"}, True),
}
BASELINE = {False: "dense", True: "FP8 dense"}


def unavailable() -> str:
    """Why the TE rows cannot run here ("" when they can)."""
    if not torch.cuda.is_available():
        return "no CUDA device: the TE-spec rows time GPU kernels"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return (
            "Transformer Engine is not installed (pip install -e '.[te]' in the clone, "
            "or pip install 'transformer-engine[pytorch]>=2.5')"
        )
    return ""


def te_mlp(hidden, ffn, sparsity, dtype=torch.bfloat16):
    """Megatron's MLP with the TE spec's fc1/fc2 (megasparse's sparse TE linears when `sparsity`).
    Needs Megatron's model-parallel state (megasparse.testing.init_megatron)."""
    from megatron.core.extensions.transformer_engine import (
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )
    from megatron.core.transformer.mlp import MLP, MLPSubmodules

    from megasparse.megatron.compat import linear_entry
    from megasparse.te.linear import sparse_te_class
    from megasparse.tools.perf.models import mlp_config

    config = mlp_config(hidden, ffn, dtype)
    fc1, fc2 = TELayerNormColumnParallelLinear, TERowParallelLinear
    if sparsity is not None:
        fc1 = linear_entry(sparse_te_class(fc1), sparsity)
        fc2 = linear_entry(sparse_te_class(fc2), sparsity)
    return MLP(config, MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2), ffn_hidden_size=ffn)


def _fp8_context(fp8: bool):
    if not fp8:
        import contextlib

        return contextlib.nullcontext
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import DelayedScaling

    return functools.partial(te.fp8_autocast, enabled=True, fp8_recipe=DelayedScaling())


def optimizer_step(module, x, k, context):
    """k micro-batches forward + backward in `context`, then a zero-learning-rate SGD step (the step
    boundary at which megasparse rebuilds its per-step weight state)."""
    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)

    def step():
        for _ in range(k):
            with context():
                out, _ = module(x)
            out.backward(torch.ones_like(out))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def projected_ratio(name, bound="mid"):
    """te_spec's projected ratio of a recipe vs its baseline (H100, the reference FFN, 16k tokens)."""
    from megasparse.tools.perf import te_spec

    kw, fp8 = RECIPES[name]
    if kw is None:
        return 1.0
    if fp8:
        row = [r for r in te_spec.fp8_rows("H100", (bound,)) if r["weights"] == kw["mask"]][0]
        return row["after_vs_fp8_dense"]
    rows = te_spec.bf16_rows("H100", (bound,), (te_spec.TOKENS,))
    row = [r for r in rows if r["weights"] == kw["mask"] and r["scope"] == "ffn"][0]
    return row["after_vs_te_dense"]


def te_ffn_rows(timer, hidden, ffn, tokens, k=4, recipes=RECIPES, build=None, device="cuda"):
    """Rows {recipe, ms, baseline, baseline_ms, measured_ratio, projected_ratio} per recipe, or one
    {skipped: reason} row without CUDA / TE (when `build` is not given)."""
    from megasparse import SparsityConfig

    if build is None:
        reason = unavailable()
        if reason:
            return [{"section": "te_spec", "skipped": reason}]
        build = te_mlp
    x = torch.randn(tokens, 1, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    times = {}
    for name, (kw, fp8) in recipes.items():
        module = build(hidden, ffn, None if kw is None else SparsityConfig(**kw)).to(device)
        times[name] = timer(optimizer_step(module, x, k, _fp8_context(fp8)))
        del module
    rows = []
    for name, (kw, fp8) in recipes.items():
        base = BASELINE[fp8]
        if name == base or base not in times:
            continue
        rows.append(
            {
                "section": "te_spec",
                "recipe": name,
                "hidden": hidden,
                "ffn": ffn,
                "tokens": tokens,
                "microbatches": k,
                "ms": times[name],
                "baseline": base,
                "baseline_ms": times[base],
                "measured_ratio": times[base] / times[name],
                "projected_ratio": projected_ratio(name)
                if (hidden, ffn, tokens) == (8192, 28672, 16384)
                else None,
            }
        )
    return rows
