"""GPU benchmark: dense vs sparse linears and a whole FFN, as ratios against dense measured in the same run.

    python -m megasparse.tools.bench [--quick] [--out bench_out]

On a CUDA GPU: forward+backward time of Megatron's dense Column/RowParallelLinear and MLP against
megasparse's (2:4 weights; 2:4 weights + 2:4 Squared-ReLU activations) at Llama-style shapes in
bf16, the prune+compress overhead against the sparse GEMM it feeds, the mask kernels' bandwidth
against the device's copy bandwidth, and the extra memory of a sparse layer. Targets are marked
met or missed. FP8 rows say "not measured" until the native FP8 2:4 path exists.
Without a GPU it says so and runs a small correctness smoke on the CPU.
"""

import argparse
import json
import os

import torch

SHAPES = [(4096, 14336), (8192, 28672)]  # (hidden, ffn)
TOKENS = [4096, 16384, 32768]
TARGETS = {  # name: (what, threshold, higher is better)
    "ffn_2:4": ("FFN fwd+bwd, 2:4 weights vs dense bf16 (hidden 8192, ffn 28672, 16k tokens)", 1.3, True),
    "ffn_2:4+act": ("FFN fwd+bwd, 2:4 weights + 2:4 activations vs dense bf16 (same shape)", 1.5, True),
    "fp8_2:4": ("FP8 with 2:4 weights vs FP8 dense", 1.2, True),
    "prune_compress": ("weight prune + compress per step / sparse GEMM time", 0.10, False),
    "mask_bandwidth": ("mask kernels / device copy bandwidth", 0.70, True),
    "extra_memory": ("extra memory of a sparse layer / dense weight bytes", 0.6, False),
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

    config = TransformerConfig(num_layers=1, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=8,
                               params_dtype=dtype, bf16=dtype == torch.bfloat16, activation_func=squared_relu,
                               add_bias_linear=False, use_cpu_initialization=True)
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    if sparsity is None:
        return MLP(config, submodules, ffn_hidden_size=ffn)
    return SparseMLP(config, with_sparse_linears(submodules, sparsity), ffn_hidden_size=ffn)


def _fwd_bwd(module, x):
    def step():
        out, _ = module(x)
        out.backward(torch.ones_like(out))
    return step


def bench_gpu(args):
    from megasparse import SparsityConfig
    from megasparse.kernels import mask_1d_triton, mask_transposable_triton

    device = torch.cuda.get_device_name()
    results = {"device": device, "capability": list(torch.cuda.get_device_capability()), "rows": [], "targets": {}}
    shapes = SHAPES[-1:] if args.quick else SHAPES
    tokens_list = [16384] if args.quick else TOKENS
    recipes = {"dense": None, "2:4": SparsityConfig(weights="2:4", mask="transposable"),
               "2:4+act": SparsityConfig(weights="2:4", mask="transposable", activations="2:4")}
    for hidden, ffn in shapes:
        modules = {name: _mlp(hidden, ffn, s, torch.bfloat16).cuda() for name, s in recipes.items()}
        for tokens in tokens_list:
            x = torch.randn(tokens, 1, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            times = {name: _time_ms(_fwd_bwd(m, x)) for name, m in modules.items()}
            row = {"hidden": hidden, "ffn": ffn, "tokens": tokens, **{f"{k}_ms": v for k, v in times.items()},
                   "speedup_2:4": times["dense"] / times["2:4"], "speedup_2:4+act": times["dense"] / times["2:4+act"]}
            results["rows"].append(row)
            print(f"FFN h={hidden} ffn={ffn} tokens={tokens}: dense {times['dense']:.2f} ms, 2:4 x{row['speedup_2:4']:.2f}, "
                  f"2:4+act x{row['speedup_2:4+act']:.2f}")
            if (hidden, ffn, tokens) == (8192, 28672, 16384):
                results["targets"]["ffn_2:4"] = row["speedup_2:4"]
                results["targets"]["ffn_2:4+act"] = row["speedup_2:4+act"]
        del modules
    # prune + compress vs the sparse GEMM it feeds (fc1 of the largest shape, 16k tokens)
    hidden, ffn = shapes[-1]
    w = torch.randn(ffn, hidden, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(16384, hidden, device="cuda", dtype=torch.bfloat16)
    prune = _time_ms(lambda: torch._cslt_compress(w * mask_transposable_triton(w)))
    packed = torch._cslt_compress(w * mask_transposable_triton(w))
    gemm = _time_ms(lambda: torch._cslt_sparse_mm(packed, x.t(), transpose_result=True))
    results["targets"]["prune_compress"] = prune / gemm
    # mask kernels' bandwidth (read w, write a byte mask) against a device copy of w
    copy_ms = _time_ms(lambda: w.clone())
    copy_bw = 2 * w.numel() * w.element_size() / copy_ms
    mask_bw = (w.numel() * w.element_size() + w.numel()) / _time_ms(lambda: mask_1d_triton(w))
    tmask_bw = (w.numel() * w.element_size() + w.numel()) / _time_ms(lambda: mask_transposable_triton(w))
    results["targets"]["mask_bandwidth"] = min(mask_bw, tmask_bw) / copy_bw
    results["mask_bandwidth"] = {"1d": mask_bw / copy_bw, "transposable": tmask_bw / copy_bw}
    # extra memory of one sparse layer over its dense parent in a fwd+bwd
    results["targets"]["extra_memory"] = _extra_memory(hidden, ffn)
    results["targets"]["fp8_2:4"] = None  # the native FP8 2:4 path is not part of megasparse yet
    return results


def _extra_memory(hidden, ffn):
    from megasparse import SparsityConfig

    peaks = {}
    for name, sparsity in (("dense", None), ("sparse", SparsityConfig(weights="2:4", mask="transposable"))):
        module = _mlp(hidden, ffn, sparsity, torch.bfloat16).cuda()
        x = torch.randn(4096, 1, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        _fwd_bwd(module, x)()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _fwd_bwd(module, x)()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
        weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        del module, x
    return (peaks["sparse"] - peaks["dense"]) / weight_bytes


def report(results, out):
    os.makedirs(out, exist_ok=True)
    print(f"\ndevice: {results['device']} (sm{''.join(map(str, results['capability']))})")
    for key, (what, threshold, higher) in TARGETS.items():
        value = results["targets"].get(key)
        if value is None:
            verdict, shown = "not measured", "-"
        else:
            ok = value >= threshold if higher else value <= threshold
            verdict, shown = ("met" if ok else "MISSED"), f"{value:.3f}"
        print(f"  {what:<80} {shown:>7}  target {'>=' if higher else '<='} {threshold}: {verdict}")
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}/bench.json")


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
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("megasparse.bench: no CUDA GPU here, so nothing is timed (speed-ups are GPU measurements). "
              "Running a small CPU correctness smoke instead.")
        smoke()
        return
    from megasparse.testing import free_port, init_megatron, shutdown_megatron

    init_megatron(0, 1, free_port(), tensor_model_parallel_size=1)
    try:
        report(bench_gpu(args), args.out)
    finally:
        shutdown_megatron()


if __name__ == "__main__":
    main()
