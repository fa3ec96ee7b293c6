"""GPU benchmark: dense vs sparse FFNs per optimizer step, as ratios against dense measured in the
same run, printed beside the projection of megasparse.tools.perfmodel for the same case.

    python -m megasparse.tools.bench [--quick] [--out bench_out] [--check]

On a CUDA GPU: the time of one optimizer step of k=4 micro-batches (forward + backward; the
per-step weight state is rebuilt once per step, as in training) of Megatron's dense MLP against
megasparse's (2:4 weights 1d / transposable; 2:4 weights + 2:4 Squared-ReLU activations) in bf16;
the share of the step spent preparing weights (masks, compression); the FP8 2:4 cuSPARSELt GEMM
against the FP8 dense GEMM (torch._scaled_mm) at the FFN's shape; every Triton kernel's time
against a device copy of the same bytes (`kernel_bandwidths`); the bytes the per-step state
holds per layer against the dense weight; and the activation speed path (V:N:M activations with
M >= 8, with and without both-ways weight gradients): its gather/compact GEMMs beside the dense
cuBLAS GEMMs and one FFN step per pattern, each beside perfmodel's projection
(`bench_activation_path`); the TE spec's sparse linears against TE dense in bf16 and FP8
(`bench_te_spec`, skipped without Transformer Engine). Targets are marked met or MISSED;
`--check` exits non-zero if one is missed.
Without a GPU it says so, runs a small CPU correctness smoke, prints the state's memory and the
projected targets (labelled projected), and `--check` applies the targets to the projection.
"""

import argparse
import json
import os
import sys

import torch

from megasparse.core.gpu_timer import cuda_event_seconds
from megasparse.tools.perf.models import mlp_config

SHAPES = [(4096, 14336), (8192, 28672)]  # (hidden, ffn)
TOKENS = [4096, 16384, 32768]
MICROBATCHES = 4
TARGETS = {  # name: (what, threshold, higher is better)
    "ffn_2:4": (
        "FFN step (k=4), 2:4 weights vs dense bf16 (hidden 8192, ffn 28672, 16k tokens)",
        1.3,
        True,
    ),
    "weight_prep": ("weight preparation / sparse FFN step time (same shape)", 0.05, False),
    "fp8_2:4": (
        "FP8 2:4 vs FP8 dense (measured: GEMM 16k x 8192 x 28672; projected: FFN step)",
        1.3,
        True,
    ),
    "mask_bandwidth": ("mask kernels / device copy bandwidth", 0.70, True),
    "state_memory_1d": (
        "per-step state of a 1d-mask layer with hold_backward_weight=False / dense weight bytes",
        0.65,
        False,
    ),
}
RECIPES = {  # bench name: (perfmodel recipe, SparsityConfig keywords or None for dense)
    "dense": ("dense bf16", None),
    "2:4 1d": ("2:4 (1d)", {"weights": "2:4", "mask": "1d"}),
    "2:4": ("2:4 (transposable)", {"weights": "2:4", "mask": "transposable"}),
    "2:4+act": ("2:4 + 2:4 act", {"weights": "2:4", "mask": "transposable", "activations": "2:4"}),
}


def _time_ms(fn, warmup=3, iters=10):
    return 1e3 * cuda_event_seconds(fn, iters, warmup, synchronize_device=True)


def _mlp(hidden, ffn, sparsity, dtype):
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megasparse.megatron.compat import with_sparse_linears
    from megasparse.megatron.mlp import SparseMLP

    config = mlp_config(hidden, ffn, dtype)
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    if sparsity is None:
        return MLP(config, submodules, ffn_hidden_size=ffn)
    return SparseMLP(config, with_sparse_linears(submodules, sparsity), ffn_hidden_size=ffn)


def _optimizer_step(module, x, k=MICROBATCHES):
    """One optimizer step: k micro-batches forward + backward, then a (zero learning rate) SGD step,
    which is the step boundary that makes megasparse rebuild its per-step weight state."""
    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)

    def step():
        for _ in range(k):
            out, _ = module(x)
            out.backward(torch.ones_like(out))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _rebuild_states(module):
    """The per-step weight work alone: every sparse linear's state rebuilt (mask, W*M, compression)."""
    from megasparse.core.backends import BACKENDS

    def prep():
        for linear in (module.linear_fc1, module.linear_fc2):
            state = getattr(linear, "weight_state", None)
            if state is not None and linear.sparsity.prunes_weights:
                state.invalidate()
                backend = (
                    linear.backend_for(linear.weight)
                    if linear.__dict__.get("_backends")
                    else BACKENDS["dense"]
                )
                step = state.step(linear.weight, linear.sparsity, backend)
                step.compressed()
                if step.transposable and step.hold_backward:
                    step.compressed_t()

    return prep


def device_key(name: str):
    """The perfmodel device for a CUDA device name, or None."""
    for key in ("A100", "H100", "H200", "B200"):
        if key in name:
            return key
    return None


def projection(device, recipes, tokens_list, k=MICROBATCHES):
    """perfmodel's projected FFN rows (TP 1) at its shape (hidden 8192, ffn 28672), keyed by
    (perfmodel recipe, tokens): ratio_vs_dense, step_ms, weight_prep_share. Empty without a device."""
    from megasparse.tools import perfmodel

    if device is None:
        return {}
    rows = perfmodel.rows(
        devices={device: perfmodel.DEVICES[device]},
        tokens_list=tuple(tokens_list),
        tps=(1,),
        ks=(k,),
        scopes=("ffn",),
        recipes=tuple(dict.fromkeys(("dense bf16", *recipes))),
    )
    return {(r["recipe"], r["tokens"]): r for r in rows}


def projected_ratio(device, recipe, tokens, k=MICROBATCHES):
    """perfmodel's projected step-time ratio vs dense bf16 for one FFN case (TP 1)."""
    row = projection(device, (recipe,), (tokens,), k).get((recipe, tokens))
    return None if row is None else row["ratio_vs_dense"]


def bench_gpu(args, shapes=None, tokens_list=None):
    """Measure on the GPU; `shapes` [(hidden, ffn)] and `tokens_list` default to the command line's
    (--quick: the projection's shape at 16k tokens)."""
    from megasparse import SparsityConfig
    from megasparse.tools import perfmodel

    device = torch.cuda.get_device_name()
    key = device_key(device)
    results = {
        "device": device,
        "capability": list(torch.cuda.get_device_capability()),
        "rows": [],
        "targets": {},
    }
    shapes = shapes or (SHAPES[-1:] if args.quick else SHAPES)
    tokens_list = tokens_list or ([16384] if args.quick else TOKENS)
    for hidden, ffn in shapes:
        projected = (
            projection(key, [recipe for recipe, _ in RECIPES.values()], tokens_list)
            if (hidden, ffn) == (perfmodel.HIDDEN, perfmodel.FFN)
            else {}
        )
        modules = {
            name: _mlp(
                hidden, ffn, None if kw is None else SparsityConfig(**kw), torch.bfloat16
            ).cuda()
            for name, (_, kw) in RECIPES.items()
        }
        for tokens in tokens_list:
            x = torch.randn(
                tokens, 1, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True
            )
            times = {name: _time_ms(_optimizer_step(m, x)) for name, m in modules.items()}
            dense_projection = projected.get(("dense bf16", tokens), {})
            for name, (recipe, _) in RECIPES.items():
                if name == "dense":
                    continue
                projection_row = projected.get((recipe, tokens), {})
                row = {
                    "hidden": hidden,
                    "ffn": ffn,
                    "tokens": tokens,
                    "recipe": name,
                    "step_ms": times[name],
                    "projected_step_ms": projection_row.get("step_ms"),
                    "dense_step_ms": times["dense"],
                    "projected_dense_step_ms": dense_projection.get("step_ms"),
                    "measured_ratio": times["dense"] / times[name],
                    "projected_ratio": projection_row.get("ratio_vs_dense"),
                }
                if name == "2:4":
                    row["weight_prep_share"] = (
                        _time_ms(_rebuild_states(modules[name])) / times[name]
                    )
                    row["projected_weight_prep_share"] = projection_row.get("weight_prep_share")
                results["rows"].append(row)
                shown = "-" if row["projected_ratio"] is None else f"{row['projected_ratio']:.2f}x"
                print(
                    f"FFN h={hidden} ffn={ffn} tokens={tokens} {name:>8}: measured {row['measured_ratio']:.2f}x, "
                    f"projected {shown} (vs dense bf16, one step of k={MICROBATCHES})"
                )
                if (hidden, ffn, tokens) == (8192, 28672, 16384) and name == "2:4":
                    results["targets"]["ffn_2:4"] = row["measured_ratio"]
                    results["targets"]["weight_prep"] = row["weight_prep_share"]
        del modules
    hidden, ffn = shapes[-1]
    results.update(bench_activation_path(args.quick, key, hidden, ffn))
    results["te_spec"] = bench_te_spec(hidden, ffn)
    results["targets"]["fp8_2:4"] = _fp8_gemm_ratio(hidden, ffn)
    bandwidth = kernel_bandwidths(hidden, ffn)
    results["kernel_bandwidth"] = bandwidth
    results["mask_bandwidth"] = {
        "1d": bandwidth["mask_1d"]["vs_copy"],
        "transposable": bandwidth["mask_transposable"]["vs_copy"],
    }
    results["targets"]["mask_bandwidth"] = min(results["mask_bandwidth"].values())
    results["fp8_cast"] = _fp8_cast_bandwidth(hidden, bandwidth)
    results["state_memory"] = state_memory(hidden, ffn, "cuda")
    results["targets"]["state_memory_1d"] = results["state_memory"]["1d, W*M rebuilt"]
    return results


def bench_te_spec(hidden, ffn, tokens=16384):
    """The TE spec's sparse linears vs TE dense (bf16 and FP8), one step of k micro-batches each,
    beside te_spec's projection (megasparse.tools.perf.bench_te); skipped without TE."""
    from megasparse.tools.perf import bench_te

    rows = bench_te.te_ffn_rows(_time_ms, hidden, ffn, tokens, MICROBATCHES)
    for row in rows:
        if "skipped" in row:
            print(f"TE spec rows skipped: {row['skipped']}")
            continue
        shown = "-" if row["projected_ratio"] is None else f"{row['projected_ratio']:.2f}x"
        print(
            f"TE spec FFN h={hidden} ffn={ffn} tokens={tokens} {row['recipe']:>8}: measured "
            f"{row['measured_ratio']:.2f}x vs {row['baseline']}, projected {shown}"
        )
    return rows


def bench_activation_path(quick, device_key_, hidden, ffn, tokens=16384):
    """The activation speed path (megasparse.tools.perf.bench_activation) on this GPU: its GEMMs and
    kernels beside cuBLAS and a device copy, and one FFN step per recipe beside the projection."""
    from megasparse.tools import perfmodel
    from megasparse.tools.perf import bench_activation as act

    recipes = act.bench_recipes(quick)
    patterns = tuple(dict.fromkeys(r.activations for r in recipes))
    wgrads = tuple(dict.fromkeys(r.activation_wgrad for r in recipes if r.activation_wgrad))
    gemms = [
        row
        for p in patterns
        for row in act.activation_gemms(hidden, ffn, tokens, p, None, _time_ms)
    ]
    for w in wgrads:  # the both-ways weight gradients and the selection along tokens
        rows = act.activation_gemms(hidden, ffn, tokens, patterns[0], w, _time_ms)
        gemms += [r for r in rows if "both ways" in r["kernel"] or r["kernel"] == "compact_tokens"]
    for row in gemms:
        if "measured_ratio" in row:
            print(
                f"{row['pattern']} {row['wgrad'] or ''} {row['kernel']}: measured "
                f"{row['measured_ratio']:.2f}x vs cuBLAS, projected {row['projected_ratio']:.2f}x"
            )
        else:
            print(f"{row['pattern']} {row['kernel']}: {row['vs_copy']:.2f} of a device copy")

    def projected(recipe):
        if device_key_ is None or (hidden, ffn) != (perfmodel.HIDDEN, perfmodel.FFN):
            return None
        return perfmodel.step_ratio(recipe, "ffn", device_key_, tokens=tokens)

    ffn_rows = act.activation_ffn_rows(
        lambda sparsity: _mlp(hidden, ffn, sparsity, torch.bfloat16).cuda(),
        _optimizer_step,
        _time_ms,
        hidden,
        ffn,
        tokens,
        recipes,
        projected,
    )
    for row in ffn_rows:
        shown = "-" if row["projected_ratio"] is None else f"{row['projected_ratio']:.2f}x"
        print(
            f"FFN h={hidden} ffn={ffn} tokens={tokens} {row['recipe']}: measured "
            f"{row['measured_ratio']:.2f}x, projected {shown} (vs dense bf16, k={MICROBATCHES})"
        )
    return {"activation_gemms": gemms, "activation_rows": ffn_rows}


def copy_ms(nbytes: int, device="cuda") -> float:
    """Time of a device copy that moves `nbytes` in all (reads half, writes half): the baseline
    a memory-bound kernel moving the same bytes is compared with."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return _time_ms(lambda: dst.copy_(src))


def kernel_launches(hidden=8192, ffn=28672, tokens=16384, device="cuda"):
    """Every Triton kernel of megasparse.kernels at the FFN's shapes (bf16) as {name: (launch, bytes
    read + written)}: the weight masks on W [ffn, hidden], the activation kernels on the fc1 output
    [tokens, ffn], the FP8 cast on the input [tokens, hidden]."""
    from megasparse.kernels import (
        activation_compact_triton,
        activation_sparsify_triton,
        compact_tokens_triton,
        compact_triton,
        fp8_cast_triton,
        mask_1d_triton,
        mask_transposable_triton,
        scatter_triton,
        squared_relu_sparsify_backward_triton,
    )
    from megasparse.kernels.activation_2_4 import activation_2_4_triton
    from megasparse.kernels.activation_sparsify import REPORT_PATTERNS

    bf16 = torch.bfloat16
    size = torch.finfo(bf16).bits // 8
    w = torch.randn(ffn, hidden, device=device, dtype=bf16)
    h = torch.randn(tokens, ffn, device=device, dtype=bf16)
    grad = torch.randn_like(h)
    mask = activation_2_4_triton(h, True)[1]
    x = torch.randn(tokens, hidden, device=device, dtype=bf16)
    scale = torch.tensor(3.0, device=device)
    v, m = REPORT_PATTERNS[0]
    values_c, _, columns, _ = activation_compact_triton(h, v, 2, m, True)
    compact_bytes, columns_bytes = values_c.numel() * size, columns.numel() * 2
    return {  # bytes: inputs read once, outputs written once (bool masks and FP8 are one byte)
        "mask_1d": (lambda: mask_1d_triton(w), w.numel() * (size + 1)),
        "mask_transposable": (lambda: mask_transposable_triton(w), w.numel() * (size + 1)),
        "activation_2_4 (squared ReLU)": (
            lambda: activation_2_4_triton(h, True),
            h.numel() * (2 * size + 1),
        ),
        f"activation_sparsify {v}:2:{m} (squared ReLU)": (
            lambda: activation_sparsify_triton(h, v, m, True),
            h.numel() * (2 * size + 1) + (tokens // v) * (ffn // m) * 4 * 2,  # + int16 columns
        ),
        f"activation_compact {v}:2:{m} (squared ReLU)": (  # values_c and preact_c, no dense
            lambda: activation_compact_triton(h, v, 2, m, True),
            h.numel() * size + 2 * compact_bytes + columns_bytes,
        ),
        f"compact {v}:{m}": (
            lambda: compact_triton(h, columns, v, m),
            h.numel() * size + compact_bytes + columns_bytes,
        ),
        f"scatter {v}:{m}": (
            lambda: scatter_triton(values_c, columns, v, m, ffn),
            h.numel() * size + compact_bytes + columns_bytes,
        ),
        f"compact_tokens {v}:4:{m}": (  # the both-ways weight gradients' selection of A^T
            lambda: compact_tokens_triton(h, v, 4, m),
            h.numel() * size + compact_bytes + (ffn // v) * (tokens // m) * 4 * 2,
        ),
        "squared_relu_backward": (
            lambda: squared_relu_sparsify_backward_triton(h, mask, grad),
            h.numel() * (3 * size + 1),
        ),
        **_gather_matmul_launches(values_c, columns, w, v, m, size),
        "fp8_cast": (lambda: fp8_cast_triton(x, scale), x.numel() * (size + 1)),
        "fp8_cast + transpose": (
            lambda: fp8_cast_triton(x, scale, transpose=True),
            x.numel() * (size + 2),
        ),
    }


def _gather_matmul_launches(values_c, columns, w, v, m, size):
    """The compact GEMMs on the compact fc1 output (values_c, columns) and W1 w [ffn, hidden]:
    {name: (launch, bytes of operands and output)}; a GEMM is not memory-bound, its time beside
    the copy shows what it moves."""
    from megasparse.kernels import compact_matmul_triton, gather_k_matmul_triton

    kept, index = values_c.numel() * size, columns.numel() * 2
    dy = values_c.new_ones(values_c.shape[0], w.shape[1])
    return {
        f"gather_matmul gather_k_matmul {v}:2:{m}": (
            lambda: gather_k_matmul_triton(values_c, columns, w, v, m),
            kept + index + (w.numel() + dy.numel()) * size,
        ),
        f"gather_matmul compact_matmul {v}:2:{m}": (
            lambda: compact_matmul_triton(dy, w.t(), columns, v, m),
            (dy.numel() + w.numel()) * size + index + kept,
        ),
    }


def kernel_bandwidths(hidden=8192, ffn=28672, tokens=16384, device="cuda") -> dict:
    """Each Triton kernel against a device copy of the same bytes: {name: {bytes, ms, copy_ms,
    vs_copy}}, vs_copy = copy_ms / ms (1.0: as fast as copying what it reads and writes)."""
    out = {}
    for name, (launch, nbytes) in kernel_launches(hidden, ffn, tokens, device).items():
        kernel, copy = _time_ms(launch), copy_ms(nbytes, device)
        out[name] = {"bytes": nbytes, "ms": kernel, "copy_ms": copy, "vs_copy": copy / kernel}
    return out


def _fp8_cast_bandwidth(hidden, bandwidth, tokens=16384):
    """The fused FP8 cast (+ transpose) kernel of x [tokens, hidden] bf16: its bandwidth against a
    device copy (from `kernel_bandwidths`), and its speed-up over the unfused torch passes it
    replaces."""
    from megasparse.fp8 import gemm as fp8_gemm
    from megasparse.kernels import fp8_cast_reference, fp8_cast_triton

    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    scale = torch.tensor(3.0, device="cuda")
    fused = _time_ms(lambda: fp8_cast_triton(x, scale, transpose=True))

    def unfused():
        q = fp8_cast_reference(x, scale)[0]
        return fp8_gemm.pad_rows(q).t().contiguous()

    return {
        "cast_vs_copy": bandwidth["fp8_cast"]["vs_copy"],
        "cast_transpose_vs_copy": bandwidth["fp8_cast + transpose"]["vs_copy"],
        "cast_transpose_speedup_vs_unfused": _time_ms(unfused) / fused,
    }


def _fp8_gemm_ratio(hidden, ffn, tokens=16384):
    """cuSPARSELt FP8 2:4 (megasparse's path: the GEMM and its scaling epilogue) against
    torch._scaled_mm FP8 dense at the FFN's fc1 shape, or None."""
    from megasparse.fp8 import gemm as fp8_gemm
    from megasparse.fp8.scaling import quantize_with
    from megasparse.core.masks import weight_mask

    if not fp8_gemm.fp8_cusparselt_ok(torch.device("cuda")):
        return None
    one = torch.ones((), device="cuda")
    w = torch.randn(ffn, hidden, device="cuda", dtype=torch.bfloat16)
    w_q = quantize_with(w * weight_mask(w), one)
    x_q = quantize_with(torch.randn(tokens, hidden, device="cuda"), one)
    packed = fp8_gemm.compress(w_q)
    dense = _time_ms(
        lambda: torch._scaled_mm(x_q, w_q.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    )
    sparse = _time_ms(
        lambda: fp8_gemm.sparse_fp8_mm(x_q, one, packed, ffn, one, use_cusparselt=True)
    )
    return dense / sparse


def state_memory(hidden, ffn, device):
    """Bytes the per-step state of fc1 holds / its dense weight bytes, per mask choice (the GPU backend's
    compressed operands on CUDA; on the CPU the dense backend holds W*M instead, so the CPU numbers use
    cuSPARSELt's compressed shape, megasparse.tools.perf.fake_ops.compressed_shape)."""
    from megasparse import SparsityConfig
    from megasparse.core.backends import BACKENDS, DenseBackend
    from megasparse.tools.perf.fake_ops import compressed_shape
    from megasparse.core.weight_state import SparseWeightState

    class CusparseltSized(DenseBackend):
        name = "cusparselt-sized"

        def compress(self, matrix):
            return matrix.new_empty(compressed_shape(*matrix.shape, matrix.dtype))

    backend = BACKENDS["cusparselt"] if device == "cuda" else CusparseltSized()
    weight = torch.randn(ffn, hidden, device=device, dtype=torch.bfloat16)
    out = {}
    for name, kw in (
        ("1d", {"mask": "1d"}),  # the default holds W*M for the dgrad
        ("1d, W*M rebuilt", {"mask": "1d", "hold_backward_weight": False}),
        ("transposable, W^T held", {"mask": "transposable"}),
        ("transposable, W^T rebuilt", {"mask": "transposable", "hold_backward_weight": False}),
    ):
        step = SparseWeightState().step(weight, SparsityConfig(**kw), backend)
        step.compressed()
        if step.transposable:
            step.compressed_t()
        out[name] = sum(step.held_bytes().values()) / (weight.numel() * weight.element_size())
    return out


def verdicts(values: dict, label: str = "") -> bool:
    """Print each target's value and verdict; True if none is missed."""
    ok_all = True
    for key, (what, threshold, higher) in TARGETS.items():
        value = values.get(key)
        if value is None:
            verdict, shown = "not measured", "-"
        else:
            ok = value >= threshold if higher else value <= threshold
            ok_all &= ok
            verdict, shown = (f"{label}met" if ok else f"{label}MISSED"), f"{value:.3f}"
        print(f"  {what:<84} {shown:>7}  target {'>=' if higher else '<='} {threshold}: {verdict}")
    return ok_all


def report(results, out) -> bool:
    os.makedirs(out, exist_ok=True)
    print(
        f"\ndevice: {results['device']} (sm{''.join(map(str, results['capability']))}), measured:"
    )
    ok = verdicts(results["targets"])
    print(
        "  state bytes / dense weight bytes:",
        {k: round(v, 3) for k, v in results["state_memory"].items()},
    )
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}/bench.json")
    return ok


def projected_targets(device="H100") -> dict:
    """The bench's targets on the projection (`device`, 16k tokens, k=4, TP 1) and the state's
    memory."""
    from megasparse.tools import perfmodel

    rows = perfmodel.rows(
        devices={device: perfmodel.DEVICES[device]},
        tokens_list=(16384,),
        tps=(1,),
        ks=(MICROBATCHES,),
        scopes=("ffn",),
    )
    by_recipe = {r["recipe"]: r for r in rows}
    return {
        "ffn_2:4": by_recipe["2:4 (transposable)"]["ratio_vs_dense"],
        "weight_prep": by_recipe["2:4 (transposable)"]["weight_prep_share"],
        "fp8_2:4": by_recipe.get("FP8 2:4", {}).get("ratio_vs_fp8_dense"),  # none without FP8
        "state_memory_1d": state_memory(512, 1024, "cpu")["1d, W*M rebuilt"],
    }  # a ratio: the same at every shape


def smoke():
    """No GPU: check on the CPU that the benchmarked modules compute what they should, and say so."""
    from megasparse import SparsityConfig
    from megasparse.testing import free_port, init_megatron, shutdown_megatron

    init_megatron(0, 1, free_port(), tensor_model_parallel_size=1)
    try:
        dense = _mlp(64, 256, None, torch.float32)
        sparse = _mlp(64, 256, SparsityConfig(weights="2:4", backend="dense"), torch.float32)
        sparse.load_state_dict(dense.state_dict())
        with torch.no_grad():
            dense.linear_fc1.weight.mul_(sparse.linear_fc1.sparsity_mask())
            dense.linear_fc2.weight.mul_(sparse.linear_fc2.sparsity_mask())
        x = torch.randn(32, 1, 64)
        error = (sparse(x)[0] - dense(x)[0]).abs().max().item()
        print(f"smoke: sparse FFN vs dense FFN with masked weights, max |diff| = {error:.2e}")
        if error > 1e-4:
            raise SystemExit("smoke test FAILED")
        print("smoke test passed")
    finally:
        shutdown_megatron()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="only hidden 8192 / ffn 28672 / 16k tokens")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--check", action="store_true", help="exit non-zero if a target is missed")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "megasparse.tools.bench: no CUDA GPU here, so nothing is timed (speed-ups are GPU measurements). "
            "Running a small CPU correctness smoke instead."
        )
        smoke()
        print(
            "state bytes / dense weight bytes (cuSPARSELt sizes):",
            {k: round(v, 3) for k, v in state_memory(512, 1024, "cpu").items()},
        )
        if args.check:
            print("PROJECTED targets (megasparse.tools.perfmodel, H100, no GPU measurement):")
            if not verdicts(projected_targets(), label="PROJECTED "):
                sys.exit(1)
        return
    from megasparse.testing import free_port, init_megatron, shutdown_megatron

    init_megatron(0, 1, free_port(), tensor_model_parallel_size=1)
    try:
        ok = report(bench_gpu(args), args.out)
    finally:
        shutdown_megatron()
    if args.check and not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
