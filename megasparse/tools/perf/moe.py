"""Projected MoE expert rows: dense grouped GEMMs vs per-expert cuSPARSELt above the speed-gate bucket.

One micro-batch of an MoE layer's experts (non-gated Squared-ReLU, the reference h8192/ffn28672
expert shape, TP 1) at a fixed uneven load vector, forward + backward, priced by the roofline
(megasparse.tools.perf.roofline) GEMM by GEMM; the per-step weight preparation is megasparse's own
(recorded on meta through te_spec's linears) and divided over k micro-batches. Host costs are
assumed per call (`LAUNCH_US`, `CSLT_CALL_US`, `FP8_EXPERT_HOST_US`) and added on the critical
path where they exceed the GPU time they sit behind. Nothing here is a measurement.
"""

import functools

import torch

from megasparse.tools.perf import te_spec
from megasparse.tools.perf.models import REFERENCE
from megasparse.tools.perf.recorder import OpRecord
from megasparse.tools.perf.roofline import DEVICES, op_time, sparse_speedup

BF16, E4M3 = torch.bfloat16, torch.float8_e4m3fn
TOKENS = 32768  # tokens per micro-batch entering the MoE layer
SPREAD = 0.5  # the load vector runs linearly from (1 - SPREAD) to (1 + SPREAD) of the mean
CASES = ((8, 2), (64, 8))  # (experts, top-k): 8 experts top-2; 64 fine-grained experts top-8
# assumed host costs (not measured): one kernel launch through PyTorch's dispatcher
LAUNCH_US = 5.0
# one _cslt_sparse_mm call: the launch plus a fresh cuSPARSELt matmul plan (alg 0, no plan cache)
CSLT_CALL_US = 15.0
# TE's FP8 expert loop per expert and linear call: per-expert Python quantizer setup and
# allocations (before) against one launch's worth of host work (after)
FP8_EXPERT_HOST_US = {"before": 40.0, "after": LAUNCH_US}
GEMMS_PER_EXPERT = 6  # fc1, fc2: forward, input gradient, weight gradient
SPARSE_GEMMS_PER_EXPERT = 4  # forward and input gradient of both (transposable masks)


def uneven_loads(experts: int, top_k: int, tokens: int = TOKENS, spread: float = SPREAD):
    """Tokens per expert: a fixed linear ramp from (1 - spread) to (1 + spread) of the mean,
    summing to tokens * top_k (deterministic: the same vector every run)."""
    total = tokens * top_k
    if experts == 1:
        return (total,)
    weights = [1 - spread + 2 * spread * i / (experts - 1) for i in range(experts)]
    loads = [int(total * w / sum(weights)) for w in weights]
    loads[-1] += total - sum(loads)
    return tuple(loads)


def _gemm(m, n, k, dtype, sparse: bool) -> OpRecord:
    """A GEMM record [m, k] x [k, n]; with `sparse`, A is the 2:4 weight and n the tokens."""
    size = torch.empty((), dtype=dtype).element_size()
    return OpRecord(
        "expert_gemm",
        "microbatch",
        "gemm",
        2 * m * n * k,
        (m * k + k * n) * size,
        m * n * 2,
        "A" if sparse else None,
        dtype,
        (m, n, k),
    )


def expert_gemms(tokens: int, sparse: bool, dtype=BF16, shape=REFERENCE):
    """The six GEMMs of one expert's micro-batch; with `sparse` the forward and input-gradient
    GEMMs take the 2:4 weight (n = the expert's tokens), the weight gradients stay dense."""
    h, f = shape.hidden, shape.ffn
    return [
        _gemm(f, tokens, h, dtype, sparse),  # fc1 forward
        _gemm(h, tokens, f, dtype, sparse),  # fc2 forward
        _gemm(f, tokens, h, dtype, sparse),  # fc2 input gradient ((W2*M)^T is 2:4 too)
        _gemm(h, tokens, f, dtype, sparse),  # fc1 input gradient
        _gemm(f, h, tokens, dtype, False),  # fc1 weight gradient
        _gemm(h, f, tokens, dtype, False),  # fc2 weight gradient
    ]


def _activation(tokens: int, shape=REFERENCE) -> OpRecord:
    """Squared ReLU forward (read h, write a) and backward (read h and da, write dh), bf16."""
    nbytes = tokens * shape.ffn * 2
    return OpRecord(
        "squared_relu", "microbatch", "memory", tokens * shape.ffn, 3 * nbytes, 2 * nbytes
    )


@functools.lru_cache(maxsize=None)
def prep_seconds(route: str, device: str, bound: str, shape=REFERENCE) -> float:
    """Per-step preparation of one expert's fc1 + fc2 (mask and W*M for `route` "te_gemm"; mask
    and both compressed operands for "cusparselt"), recorded through te_spec's linears."""
    case = te_spec.TeCase("transposable", route=route)
    records = [
        r
        for part in ("fc1", "fc2")
        for r in te_spec.te_records(case, part, 8192, 1, shape)
        if r.phase == te_spec.WEIGHT_PREP
    ]
    return sum(op_time(r, DEVICES[device], bound) for r in records)


def _seconds(records, device, bound):
    return sum(op_time(r, device, bound) for r in records)


def gated(loads, device, bound, dtype=BF16):
    """Which experts the speed gate keeps sparse (projected: the table's speed-up above 1)."""
    return [sparse_speedup(device, dtype, t, bound) > 1.0 for t in loads]


def experts_seconds(loads, device, bound, k=te_spec.K, shape=REFERENCE) -> dict:
    """Seconds per micro-batch (per-step preparation / k included) of the experts at `loads`:
    "dense" (grouped GEMMs on W, the dense model), "before" (grouped GEMMs on stacked W*M),
    "after" (per-expert cuSPARSELt above the bucket, the rest and every weight gradient grouped),
    "after_host" (its launch and plan host cost, in "after"), "batched" (one cuSPARSELt call per
    role over every expert padded to the largest load; assumed: the batch keeps the table's
    speed-up of one GEMM at the padded per-expert tokens)."""
    sparse = gated(loads, device, bound)
    act = _seconds([_activation(t, shape) for t in loads], device, bound)
    grouped_host = GEMMS_PER_EXPERT * LAUNCH_US * 1e-6  # one grouped call per GEMM role
    dense = _seconds([g for t in loads for g in expert_gemms(t, False, shape=shape)], device, bound)
    dense += act + grouped_host
    name = [key for key, dev in DEVICES.items() if dev == device][0]
    masked_prep = prep_seconds("te_gemm", name, bound, shape)
    sparse_prep = sum(
        prep_seconds("cusparselt" if s else "te_gemm", name, bound, shape) for s in sparse
    )
    after_gemms = [g for t, s in zip(loads, sparse) for g in expert_gemms(t, s, shape=shape)]
    after_host = grouped_host + sum(sparse) * SPARSE_GEMMS_PER_EXPERT * CSLT_CALL_US * 1e-6
    padded = max(loads)
    batched = _seconds(
        [g for _ in loads for g in expert_gemms(padded, True, shape=shape)[:4]]
        + [g for t in loads for g in expert_gemms(t, False, shape=shape)[4:]],
        device,
        bound,
    )
    return {
        "dense": dense,
        "before": dense + len(loads) * masked_prep / k,
        "after": _seconds(after_gemms, device, bound) + act + after_host + sparse_prep / k,
        "after_host": after_host,
        "batched": batched + act + grouped_host + 4 * CSLT_CALL_US * 1e-6 + sparse_prep / k,
        "sparse_experts": sum(sparse),
    }


def moe_row(experts, top_k, device="H100", bound="mid", k=te_spec.K, loads=None, shape=REFERENCE):
    """Projected ms per micro-batch of the experts (`experts_seconds`) at a load vector (default:
    the fixed uneven ramp), the batched binding at even loads, and the FP8 TE expert loop's host
    cost before/after."""
    dev = DEVICES[device]
    loads = tuple(loads or uneven_loads(experts, top_k))
    t = experts_seconds(loads, dev, bound, k, shape)
    even = experts_seconds(uneven_loads(experts, top_k, spread=0.0), dev, bound, k, shape)
    return {
        "section": "moe",
        "projected": True,
        "device": device,
        "bound": bound,
        "experts": experts,
        "top_k": top_k,
        "tokens": TOKENS,
        "microbatches": k,
        "loads": list(loads),
        "sparse_experts": t["sparse_experts"],
        **{
            f"{key}_ms": t[key] * 1e3
            for key in ("dense", "before", "after", "after_host", "batched")
        },
        "before_vs_dense": t["dense"] / t["before"],
        "after_vs_dense": t["dense"] / t["after"],
        "batched_vs_after": t["after"] / t["batched"],
        "batched_padding_waste": experts * max(loads) / sum(loads) - 1,
        "batched_vs_after_even_loads": even["after"] / even["batched"],
        **fp8_loop(loads, dev, bound, shape),
    }


def fp8_loop(loads, device, bound, shape=REFERENCE):
    """Host ms per micro-batch of TE's FP8 expert loop (fc1 and fc2, forward and backward, per
    expert) before/after, against the experts' projected FP8 GPU time; host time is exposed where
    it exceeds the GPU work it sits behind (per expert, the loop waits for neither)."""
    calls = 4  # fc1 and fc2, forward and backward
    sparse = gated(loads, device, bound, E4M3)
    out = {}
    gpu_per_expert = [
        _seconds(expert_gemms(t, s, E4M3, shape), device, bound) for t, s in zip(loads, sparse)
    ]
    for when, us in FP8_EXPERT_HOST_US.items():
        host = calls * us * 1e-6
        out[f"fp8_host_{when}_ms"] = len(loads) * host * 1e3
        out[f"fp8_host_exposed_{when}_ms"] = sum(max(0.0, host - g) for g in gpu_per_expert) * 1e3
    out["fp8_gpu_ms"] = sum(gpu_per_expert) * 1e3
    return out


def moe_rows(device="H100", bounds=te_spec.BOUNDS, cases=CASES):
    return [moe_row(e, top_k, device, bound) for e, top_k in cases for bound in bounds]
