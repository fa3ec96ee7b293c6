"""Projected GPU time of recorded ops: a per-op roofline per device, sparse GEMMs by a cited table.

Nothing here is a measurement. Every number is either a vendor datasheet peak, a published
measurement (cited where it is used), or marked "assumed".
- memory-bound op: bytes / (HBM bandwidth * MEMORY_EFFICIENCY);
- dense GEMM: max(FLOPs / (dense peak * GEMM_EFFICIENCY), bytes / bandwidth);
- sparse GEMM (one 2:4 operand): the dense GEMM's time / sparse_speedup(device, dtype, tokens);
- compact GEMM (a gather- or compact-GEMM over the kept 4/M of the activation's columns or tokens,
  Triton on dense tensor-core tiles): its own (compact) FLOPs at the dense GEMM's efficiency times
  GATHER_EFFICIENCY[bound];
- attention (flash attention fwd/bwd): FLOPs / (dense peak * ATTENTION_EFFICIENCY).
"""

from dataclasses import dataclass
from typing import Optional

import torch

from megasparse.tools.perf.recorder import COMPACT

GEMM_EFFICIENCY = 0.70  # assumed: large cuBLAS(Lt) GEMMs reach ~70% of the dense datasheet peak
MEMORY_EFFICIENCY = 0.80  # assumed: elementwise kernels reach ~80% of HBM bandwidth
# assumed: FlashAttention-3 (Shah et al. 2024, arXiv:2407.08608) reaches up to 75% of H100 peak in
# the # forward in bf16; the backward is lower, so 50% for forward + backward together.
ATTENTION_EFFICIENCY = 0.50
# assumed: a Triton gather-GEMM (the A operand's K columns gathered through an index table, dense
# tensor-core tiles of V rows) reaches this share of the dense cuBLAS GEMM's throughput on its own
# (compact) FLOPs. Anchor: MegaBlocks / stk (Gale et al., MLSys 2023) reach about cuBLAS throughput
# on block-sparse GEMMs with 128 x 128 blocks (high); gathered K rows cost extra address
# arithmetic and less regular loads than stk's contiguous blocks, and Triton GEMMs trail cuBLAS on
# H100 (no TMA/warp-specialized pipeline in a gathered load), hence the lower bounds.
GATHER_EFFICIENCY = {"low": 0.6, "mid": 0.7, "high": 0.8}


@dataclass(frozen=True)
class Device:
    name: str
    arch: str
    bf16_tflops: float  # dense (not the 2:4 "sparse" datasheet figure)
    fp8_tflops: Optional[float]
    hbm_tb_s: float


# NVIDIA datasheets (dense tensor-core peaks): A100 SXM4 80GB, H100 SXM5, H200 SXM, HGX B200.
DEVICES = {
    "A100": Device("A100 SXM 80GB", "sm80", 312.0, None, 2.039),
    "H100": Device("H100 SXM", "sm90", 989.4, 1978.9, 3.35),
    "H200": Device("H200 SXM", "sm90", 989.4, 1978.9, 4.8),
    "B200": Device("B200 (HGX)", "sm100", 2250.0, 4500.0, 8.0),
}

# Sparse GEMM speed-up over the dense GEMM of the same dtype, (low, high), for token counts
# (the dense operand's free dim) >= 4096.
SPEEDUPS = {
    # TorchAO 2:4 training, A100: 1.24-1.27x per MLP linear (ViT-L; pytorch/ao
    # torchao/sparsity/training README, and PyTorch blog "Accelerating Neural Network Training with
    # Semi-Structured (2:4) Sparsity", 2024).
    ("sm80", torch.bfloat16): (1.24, 1.27, "TorchAO, A100, per MLP linear"),
    # low: H100 SXM (HGX, 700 W), cuSPARSELt's matmul example at m = n = k = 8192 (16-bit), about
    # 1.20-1.22x over dense, reported by NVIDIA's maintainer and confirmed by the user in
    # NVIDIA/CUDALibrarySamples#203 (2024-07-31): the lower end, 1.20, is the SXM evidence.
    # high: cuSPARSELt 0.8.1 vs cuBLASLt on H100 PCIe with tuned algorithms, GEMMs with M >= 4096
    # (github.com/bcacdwk/vllmbench): BF16 0.97-1.59x; its upper end, 1.59, is the high bound.
    ("sm90", torch.bfloat16): (
        1.20,
        1.59,
        "low: H100 SXM 8192^3, NVIDIA/CUDALibrarySamples#203; "
        "high: bcacdwk/vllmbench, cuSPARSELt 0.8.1, H100 PCIe",
    ),
    # vllmbench, same card and library: FP8 1.53-1.73x (no SXM report found; applied to SXM, assumed)
    ("sm90", torch.float8_e4m3fn): (1.53, 1.73, "bcacdwk/vllmbench, cuSPARSELt 0.8.1, H100 PCIe"),
    # assumed: no published cuSPARSELt training-shape measurement on B200; H100's range reused.
    ("sm100", torch.bfloat16): (1.20, 1.59, "assumed (H100 values)"),
    ("sm100", torch.float8_e4m3fn): (1.53, 1.73, "assumed (H100 values)"),
}
# pytorch#111339 (0.11x at small M) and ao#1460 (slower until batch > 1280): below this many tokens
# the sparse GEMM is assumed to be no faster than dense.
SMALL_M_TOKENS = 4096
SMALL_M_SPEEDUP = 1.0  # assumed


def sparse_speedup(device: Device, dtype, tokens: int, bound: str = "mid") -> float:
    if tokens < SMALL_M_TOKENS:
        return SMALL_M_SPEEDUP
    low, high, _ = SPEEDUPS[(device.arch, dtype)]
    return {"low": low, "high": high, "mid": (low + high) / 2}[bound]


def peak_tflops(device: Device, dtype) -> float:
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        if device.fp8_tflops is None:
            raise ValueError(f"{device.name} has no FP8 tensor cores")
        return device.fp8_tflops
    if dtype == torch.float32:
        return device.bf16_tflops / 2  # TF32 (assumed: the fp32 GEMMs run in TF32)
    return device.bf16_tflops


def memory_time(nbytes: int, device: Device) -> float:
    return nbytes / (device.hbm_tb_s * 1e12 * MEMORY_EFFICIENCY)


def op_time(record, device: Device, bound: str = "mid") -> float:
    """Projected seconds for one OpRecord on `device`."""
    if record.kind == "attention":
        return record.flops / (device.bf16_tflops * 1e12 * ATTENTION_EFFICIENCY)
    if record.kind != "gemm":
        return memory_time(record.bytes, device)
    efficiency = GEMM_EFFICIENCY
    if record.sparse_operand == COMPACT:
        efficiency *= GATHER_EFFICIENCY[bound]
    compute = record.flops / (peak_tflops(device, record.dtype) * 1e12 * efficiency)
    dense = max(compute, memory_time(record.bytes, device))
    if record.sparse_operand == COMPACT:
        return dense
    if record.sparse_operand is None:
        return dense
    tokens = record.mnk[1]  # the dense operand's free dim (the sparse operand is A [M, K])
    return dense / sparse_speedup(device, record.dtype, tokens, bound)


@dataclass
class Projection:
    prep_s: float  # once per optimizer step
    microbatch_s: float  # each micro-batch (forward + backward)

    def step_s(self, k: int) -> float:
        return self.prep_s + k * self.microbatch_s

    def prep_share(self, k: int) -> float:
        return self.prep_s / self.step_s(k)


def project(records, device: Device, bound: str = "mid") -> Projection:
    prep = sum(op_time(r, device, bound) for r in records if r.phase == "weight_prep")
    micro = sum(op_time(r, device, bound) for r in records if r.phase != "weight_prep")
    return Projection(prep, micro)
