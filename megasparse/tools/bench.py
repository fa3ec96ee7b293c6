"""GPU benchmark: dense vs sparse FFNs per optimizer step, as ratios against dense measured in the
same run, printed beside the projection of megasparse.tools.perfmodel for the same case.

    python -m megasparse.tools.bench [--quick] [--out bench_out] [--check]

On a CUDA GPU: the time of one optimizer step of k=4 micro-batches (forward + backward; the
per-step weight state is rebuilt once per step, as in training) of Megatron's dense MLP against
megasparse's (2:4 weights 1d / transposable; 2:4 weights + 2:4 Squared-ReLU activations) in bf16;
the share of the step spent preparing weights (masks, compression); the FP8 2:4 cuSPARSELt GEMM
against the FP8 dense GEMM (torch._scaled_mm) at the FFN's shape; the mask kernels' (and the fused
FP8 cast's) bandwidth against the device's copy bandwidth; and the bytes the per-step state holds per layer against the
dense weight. Targets are marked met or MISSED; `--check` exits non-zero if one is missed.
Without a GPU it says so, runs a small CPU correctness smoke, prints the state's memory and the
projected targets (labelled projected), and `--check` applies the targets to the projection.
"""

import argparse
import json
import os
import sys

import torch

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
    "state_memory_1d": ("per-step state of a 1d-mask layer / dense weight bytes", 0.65, False),
}
RECIPES = {  # bench name: (perfmodel recipe, SparsityConfig keywords or None for dense)
    "dense": ("dense bf16", None),
    "2:4 1d": ("2:4 (1d)", {"weights": "2:4", "mask": "1d"}),
    "2:4": ("2:4 (transposable)", {"weights": "2:4", "mask": "transposable"}),
    "2:4+act": ("2:4 + 2:4 act", {"weights": "2:4", "mask": "transposable", "activations": "2:4"}),
}


def _time_ms(fn, warmup=3, iters=10):
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _mlp(hidden, ffn, sparsity, dtype):
    from megatron.core.activations import squared_relu
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megasparse.compat import with_sparse_linears
    from megasparse.mlp import SparseMLP

    config = TransformerConfig(
        num_layers=1,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=8,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        activation_func=squared_relu,
        add_bias_linear=False,
        use_cpu_initialization=True,
    )
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
    from megasparse.backends import BACKENDS

    def prep():
        for linear in (module.linear_fc1, module.linear_fc2):
            state = getattr(linear, "weight_state", None)
            if state is not None and linear.sparsity.prunes_weights:
                state.invalidate()
                backend = (
                    linear._backend_for(linear.weight) if linear._backends else BACKENDS["dense"]
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


def projected_ratio(device, recipe, tokens, k=MICROBATCHES):
    """perfmodel's projected step-time ratio vs dense bf16 for one FFN case (TP 1)."""
    from megasparse.tools import perfmodel

    if device is None:
        return None
    (row,) = [
        r
        for r in perfmodel.rows(
            devices={device: perfmodel.DEVICES[device]},
            tokens_list=(tokens,),
            tps=(1,),
            ks=(k,),
            scopes=("ffn",),
            recipes=("dense bf16", recipe),
        )
        if r["recipe"] == recipe
    ]
    return row["ratio_vs_dense"]


def bench_gpu(args):
    from megasparse import SparsityConfig
    from megasparse.kernels import mask_1d_triton, mask_transposable_triton

    device = torch.cuda.get_device_name()
    key = device_key(device)
    results = {
        "device": device,
        "capability": list(torch.cuda.get_device_capability()),
        "rows": [],
        "targets": {},
    }
    shapes = SHAPES[-1:] if args.quick else SHAPES
    tokens_list = [16384] if args.quick else TOKENS
    for hidden, ffn in shapes:
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
            for name, (recipe, _) in RECIPES.items():
                if name == "dense":
                    continue
                row = {
                    "hidden": hidden,
                    "ffn": ffn,
                    "tokens": tokens,
                    "recipe": name,
                    "step_ms": times[name],
                    "measured_ratio": times["dense"] / times[name],
                    "projected_ratio": projected_ratio(key, recipe, tokens)
                    if hidden == 8192
                    else None,
                }
                if name == "2:4":
                    row["weight_prep_share"] = (
                        _time_ms(_rebuild_states(modules[name])) / times[name]
                    )
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
    results["targets"]["fp8_2:4"] = _fp8_gemm_ratio(hidden, ffn)
    # mask kernels' bandwidth (read w, write a byte mask) against a device copy of w
    w = torch.randn(ffn, hidden, device="cuda", dtype=torch.bfloat16)
    copy_bw = 2 * w.numel() * w.element_size() / _time_ms(lambda: w.clone())
    mask_bw = (w.numel() * w.element_size() + w.numel()) / _time_ms(lambda: mask_1d_triton(w))
    tmask_bw = (w.numel() * w.element_size() + w.numel()) / _time_ms(
        lambda: mask_transposable_triton(w)
    )
    results["targets"]["mask_bandwidth"] = min(mask_bw, tmask_bw) / copy_bw
    results["mask_bandwidth"] = {"1d": mask_bw / copy_bw, "transposable": tmask_bw / copy_bw}
    results["fp8_cast"] = _fp8_cast_bandwidth(hidden, copy_bw)
    results["state_memory"] = state_memory(hidden, ffn, "cuda")
    results["targets"]["state_memory_1d"] = results["state_memory"]["1d"]
    return results


def _fp8_cast_bandwidth(hidden, copy_bw, tokens=16384):
    """The fused FP8 cast (+ transpose) kernel of x [tokens, hidden] bf16: its bandwidth against a
    device copy, and its speed-up over the unfused torch passes it replaces."""
    from megasparse import fp8_gemm
    from megasparse.kernels import fp8_cast_reference, fp8_cast_triton

    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    scale = torch.tensor(3.0, device="cuda")
    cast_bytes = x.numel() * (x.element_size() + 1)
    fused = _time_ms(lambda: fp8_cast_triton(x, scale, transpose=True))

    def unfused():
        q = fp8_cast_reference(x, scale)[0]
        return fp8_gemm.pad_rows(q).t().contiguous()

    return {
        "cast_vs_copy": cast_bytes / _time_ms(lambda: fp8_cast_triton(x, scale)) / copy_bw,
        "cast_transpose_vs_copy": (cast_bytes + x.numel()) / fused / copy_bw,
        "cast_transpose_speedup_vs_unfused": _time_ms(unfused) / fused,
    }


def _fp8_gemm_ratio(hidden, ffn, tokens=16384):
    """cuSPARSELt FP8 2:4 (megasparse's path: the GEMM and its scaling epilogue) against
    torch._scaled_mm FP8 dense at the FFN's fc1 shape, or None."""
    from megasparse import fp8, fp8_gemm
    from megasparse.ops import weight_mask

    if not fp8._fp8_cusparselt_ok(torch.device("cuda")):
        return None
    w = torch.randn(ffn, hidden, device="cuda", dtype=torch.bfloat16)
    w_q = fp8.quantize(w * weight_mask(w), torch.ones((), device="cuda"))
    x_q = fp8.quantize(torch.randn(tokens, hidden, device="cuda"), torch.ones((), device="cuda"))
    one = torch.ones((), device="cuda")
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
    cuSPARSELt's compressed shape, megasparse.fake_ops.compressed_shape)."""
    from megasparse import SparsityConfig
    from megasparse.backends import BACKENDS, DenseBackend
    from megasparse.fake_ops import compressed_shape
    from megasparse.weight_state import SparseWeightState

    class CusparseltSized(DenseBackend):
        name = "cusparselt-sized"

        def compress(self, matrix):
            return matrix.new_empty(compressed_shape(*matrix.shape, matrix.dtype))

    backend = BACKENDS["cusparselt"] if device == "cuda" else CusparseltSized()
    weight = torch.randn(ffn, hidden, device=device, dtype=torch.bfloat16)
    out = {}
    for name, kw in (
        ("1d", {"mask": "1d"}),
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


def projected_targets() -> dict:
    """The bench's targets on the projection (H100, 16k tokens, k=4, TP 1) and the state's memory."""
    from megasparse.tools import perfmodel

    rows = perfmodel.rows(
        devices={"H100": perfmodel.DEVICES["H100"]},
        tokens_list=(16384,),
        tps=(1,),
        ks=(MICROBATCHES,),
        scopes=("ffn",),
    )
    by_recipe = {r["recipe"]: r for r in rows}
    return {
        "ffn_2:4": by_recipe["2:4 (transposable)"]["ratio_vs_dense"],
        "weight_prep": by_recipe["2:4 (transposable)"]["weight_prep_share"],
        "fp8_2:4": by_recipe["FP8 2:4"].get("ratio_vs_fp8_dense"),
        "state_memory_1d": state_memory(512, 1024, "cpu")["1d"],
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
            "megasparse.bench: no CUDA GPU here, so nothing is timed (speed-ups are GPU measurements). "
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
