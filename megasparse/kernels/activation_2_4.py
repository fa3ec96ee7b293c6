"""2:4 activation sparsity: (optional) Squared-ReLU, then the 2 largest |a| of every 4 along ffn.

The 2:4 case of `activation_sparsify` (M = 4: every block keeps all 4 columns, so there is no
V block to reduce over). Groups of 4 never cross rows (ffn % 4 == 0), so the input is one flat
run of groups: a program takes BLOCK consecutive elements, with vector loads and many rows.
Same numerics as the general V:2:M reference: a in float32 (float64 for float64 inputs), ranked
by the NaN rule of kernels.common (NaN as +inf, ties to the lower column), values =
where(mask, a, 0) in x's dtype, so every group has at most 2 nonzeros whatever the input holds.
"""

import torch

from .common import HAVE_TRITON, compile_spec, rank_key

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .common import join4, rank_key_triton, split4, top2_of_4

# Launch: BLOCK elements per program, 16 per thread (128-bit loads of fp32, 2 x 128 of bf16).
BLOCK = 2048
NUM_WARPS = 4


def _top2_of_4(score: torch.Tensor) -> torch.Tensor:
    """[N, 4] rank keys -> keep flags of the 2 largest per row, ties to the lower index."""
    s = score.unbind(1)
    keep = []
    for i in range(4):
        beaten = sum(((s[j] > s[i]) | ((s[j] == s[i]) & (j < i))).int() for j in range(4) if j != i)
        keep.append(beaten < 2)
    return torch.stack(keep, 1)


def activation_2_4_reference(x: torch.Tensor, squared_relu: bool):
    """Pure-torch 2:4 path: the same (values, mask, stats) as the V:2:M reference with M = 4."""
    a = x.double() if x.dtype == torch.float64 else x.float()
    a = torch.relu(a).square() if squared_relu else a
    mask = _top2_of_4(rank_key(a).reshape(-1, 4)).reshape(x.shape)
    magnitude = a.abs().double()
    stats = torch.stack(
        [
            (a == 0).sum().double(),
            magnitude.sum(),
            torch.where(mask, 0.0, magnitude).sum(),
            torch.tensor(float(a.numel()), dtype=torch.float64, device=x.device),
        ]
    )
    return torch.where(mask, a, 0.0).to(x.dtype), mask, stats


if HAVE_TRITON:

    @triton.jit
    def _activation_2_4_kernel(
        x_ptr,
        values_ptr,
        mask_ptr,
        stats_ptr,
        numel,
        BLOCK: tl.constexpr,
        SQUARED_RELU: tl.constexpr,
        FP64: tl.constexpr,
    ):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offsets < numel
        x = tl.load(x_ptr + offsets, mask=valid, other=0.0)
        a = x.to(tl.float64) if FP64 else x.to(tl.float32)
        if SQUARED_RELU:
            a = tl.where(a < 0.0, 0.0, a)  # relu that keeps NaN, as torch.relu
            a = a * a
        mag = tl.abs(a)
        m0, m1, m2, m3 = split4(tl.reshape(rank_key_triton(a), [BLOCK // 4, 4]))
        k0, k1, k2, k3 = top2_of_4(m0, m1, m2, m3)
        keep = tl.reshape(join4(k0, k1, k2, k3), [BLOCK])
        # where, not a * keep: a dropped NaN/inf becomes 0, so the output is exactly 2:4
        tl.store(
            values_ptr + offsets, tl.where(keep, a, 0.0).to(values_ptr.dtype.element_ty), mask=valid
        )
        tl.store(mask_ptr + offsets, keep.to(tl.int8), mask=valid)
        stats_ptr += tl.program_id(0) * 3
        tl.store(stats_ptr, tl.sum(((a == 0.0) & valid).to(tl.float32), axis=0))
        tl.store(stats_ptr + 1, tl.sum(mag, axis=0))
        tl.store(stats_ptr + 2, tl.sum(tl.where(keep, 0.0, mag), axis=0))


def activation_2_4_triton(x: torch.Tensor, squared_relu: bool):
    """Triton kernel: (values, mask, per-program stats [programs, 3] float32) of a contiguous x."""
    values = torch.empty_like(x)
    mask = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    programs = triton.cdiv(x.numel(), BLOCK)
    partial = torch.empty(programs, 3, dtype=torch.float32, device=x.device)
    if programs:
        _activation_2_4_kernel[(programs,)](
            x,
            values,
            mask,
            partial,
            x.numel(),
            BLOCK=BLOCK,
            SQUARED_RELU=squared_relu,
            FP64=x.dtype == torch.float64,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
    return values, mask.view(torch.bool), partial


def compile_specs(dtype: torch.dtype) -> list:
    """The launches above (fused Squared-ReLU and plain), described for the offline compile report."""
    arguments = "x_ptr:*T/16 values_ptr:*T/16 mask_ptr:*i8/16 stats_ptr:*fp32/16 numel:i32/16"
    specs = []
    for squared_relu in (True, False):
        name = "activation_2_4" + ("_squared_relu" if squared_relu else "")
        constexprs = {"BLOCK": BLOCK, "SQUARED_RELU": squared_relu, "FP64": False}
        kernel = _activation_2_4_kernel
        specs.append(compile_spec(name, kernel, dtype, arguments, constexprs, BLOCK, NUM_WARPS))
    return specs
