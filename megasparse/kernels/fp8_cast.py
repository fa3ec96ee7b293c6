"""FP8 cast (and transpose) of a 2-D tensor in one pass: q = fp8(saturate(t * scale)).

Exactly what `(t.float() * scale).clamp(-fmax, fmax).to(fp8)` gives in torch, bit for bit:
the product is one float32 multiply (round to nearest even), saturated to the format's largest
finite value (+-Inf too), and converted to float8_e4m3fn / float8_e5m2 by torch's own algorithm
(c10 `fp8e4m3fn_from_fp32_value` / `fp8e5m2_from_fp32_value`, which torch runs on the CPU and in
its CUDA copy kernel): round to nearest even, subnormals through one float32 add of a magic
number, NaN -> 0x7F with t's sign bit. The kernel does that conversion in integer arithmetic, so
it is the same on every GPU (sm_80 has no FP8 convert instruction) and under TRITON_INTERPRET=1.

With `transpose`, the kernel also writes q_t [cols, rows_padded]: q transposed, tokens zero-padded
to a multiple of 16 (`fp8_gemm.pad_rows(q).t().contiguous()`, the weight-gradient GEMM's operand),
from the same read of t. The scale is a one-element float32 device tensor read by the kernel from
its pointer (no host sync).

With `amax` (a one-element float32 device tensor the caller zeroes), the same pass also records
max |t| for delayed scaling, where the scale comes from past amaxes and this tensor's amax is only
recorded: each program max-reduces |t| over its tile as float32 bit patterns (|t| >= 0, so the bits
ordered as int32 order the values: -0 becomes +0, +Inf is above every finite value) and combines
it into `amax` with one int32 atomic max. A NaN anywhere gives NaN, as torch's NaN (0x7FC00000,
whose bits exceed those of every non-NaN |t|). So the result is bitwise
`torch.linalg.vector_norm(t, inf).float()` (megasparse's `amax_of`) max-combined with what `amax`
held (zeros: nothing), except that a NaN is always 0x7FC00000 (torch's CPU reduction may keep a
payload of t's NaN). Integer max is exact and order-free: no dependence on the launch order.
"""

import torch

from .common import HAVE_TRITON, compile_spec, require_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

PAD_MULTIPLE = 16  # rows of q_t are padded to this (fp8_gemm.TOKEN_MULTIPLE)

# Per format: (largest finite value as float32 bits, smallest normal as float32 bits,
# the subnormal magic number's float32 bits, mantissa shift, rounding bias) - c10's constants.
FORMATS = {
    torch.float8_e4m3fn: (0x43E00000, 121 << 23, 141 << 23, 20, ((7 - 127) << 23) + 0x7FFFF),
    torch.float8_e5m2: (0x47600000, 113 << 23, 134 << 23, 21, ((15 - 127) << 23) + 0xFFFFF),
}

# Launch: one program per BLOCK_R x BLOCK_C tile, 16 elements per thread at 8 warps: 128-bit loads
# along cols, 128-bit stores of q (16 cols) and of q_t (16 rows, through 4 KiB of shared memory).
BLOCK_R, BLOCK_C = 64, 64
NUM_WARPS = 8


def _check(t: torch.Tensor, dtype) -> None:
    if t.dim() != 2 or t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            "megasparse: fp8_cast needs a 2-D float32/bfloat16/float16 tensor, got "
            f"{tuple(t.shape)} {t.dtype}"
        )
    if dtype not in FORMATS:
        raise ValueError(f"megasparse: fp8_cast casts to {tuple(FORMATS)}, got {dtype}")


def padded_rows(rows: int) -> int:
    return -(-rows // PAD_MULTIPLE) * PAD_MULTIPLE


NAN_BITS = 0x7FC00000  # torch's (and CUDA's) canonical float32 NaN


def _check_amax(amax, t) -> None:
    if amax is not None and (
        amax.dtype != torch.float32 or amax.numel() != 1 or amax.device != t.device
    ):
        raise ValueError(
            "megasparse: fp8_cast's amax is a one-element float32 tensor on t's device, got "
            f"{tuple(amax.shape)} {amax.dtype} {amax.device}"
        )


def amax_reference(t: torch.Tensor) -> torch.Tensor:
    """max |t| of a non-empty t as a float32 scalar, NaN as torch's NaN: what the kernel records."""
    a = torch.linalg.vector_norm(t.detach(), float("inf")).float()
    return torch.where(torch.isnan(a), torch.full_like(a, float("nan")), a)


def fp8_cast_reference(
    t: torch.Tensor, scale: torch.Tensor, dtype=torch.float8_e4m3fn, transpose=False, amax=None
):
    """Pure-torch reference: (q, q_t) with q_t = pad_rows(q).t().contiguous(), or (q, None);
    with `amax`, amax = max(amax, max |t|) in place (NaN propagates)."""
    _check(t, dtype)
    _check_amax(amax, t)
    if amax is not None and t.numel():
        amax.copy_(torch.maximum(amax, amax_reference(t).reshape(amax.shape)))
    fmax = float(torch.finfo(dtype).max)
    q = (t.float() * scale.float().reshape(())).clamp(-fmax, fmax).to(dtype)
    if not transpose:
        return q, None
    pad = padded_rows(q.shape[0]) - q.shape[0]
    q_pad = torch.cat([q, q.new_zeros(pad, q.shape[1])]) if pad else q
    return q, q_pad.t().contiguous()


if HAVE_TRITON:

    @triton.jit
    def _to_fp8_bits(y, FMAX_BITS, MIN_NORMAL_BITS, MAGIC_BITS, SHIFT, BIAS):
        """float32 -> fp8 bits (int32 0..255), saturating: c10's algorithm in integer arithmetic."""
        bits = y.to(tl.int32, bitcast=True)
        sign = (bits >> 24) & 0x80
        a = bits & 0x7FFFFFFF
        nan = a > 0x7F800000
        a = tl.minimum(a, FMAX_BITS)  # clamp(-fmax, fmax): |y| as bits is monotonic in |y|
        # subnormal: one float32 add of the magic number rounds the mantissa to nearest even
        magic = tl.full(a.shape, MAGIC_BITS, tl.int32)
        small = (a.to(tl.float32, bitcast=True) + magic.to(tl.float32, bitcast=True)).to(
            tl.int32, bitcast=True
        ) - MAGIC_BITS
        # normal: rebias the exponent, round to nearest even by adding the bias and the odd bit
        normal = (a + BIAS + ((a >> SHIFT) & 1)) >> SHIFT
        out = tl.where(a < MIN_NORMAL_BITS, small, normal)
        return tl.where(nan, 0x7F, out) | sign

    @triton.jit
    def _fp8_cast_kernel(
        t_ptr,
        scale_ptr,
        q_ptr,
        qt_ptr,
        amax_ptr,
        rows,
        cols,
        rows_pad,
        FMAX_BITS: tl.constexpr,
        MIN_NORMAL_BITS: tl.constexpr,
        MAGIC_BITS: tl.constexpr,
        SHIFT: tl.constexpr,
        BIAS: tl.constexpr,
        TRANSPOSE: tl.constexpr,
        AMAX: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        valid = (r[:, None] < rows) & (c[None, :] < cols)
        x = tl.load(t_ptr + r[:, None] * cols + c[None, :], mask=valid, other=0.0)
        scale = tl.load(scale_ptr)
        y = x.to(tl.float32) * scale
        q = _to_fp8_bits(y, FMAX_BITS, MIN_NORMAL_BITS, MAGIC_BITS, SHIFT, BIAS)
        q = tl.where(valid, q, 0).to(tl.uint8)  # padding rows are zeros whatever the scale
        tl.store(q_ptr + r[:, None] * cols + c[None, :], q, mask=valid)
        if TRANSPOSE:
            c64 = c.to(tl.int64)
            valid_t = (c64[:, None] < cols) & (r[None, :] < rows_pad)
            tl.store(qt_ptr + c64[:, None] * rows_pad + r[None, :], tl.trans(q), mask=valid_t)
        if AMAX:  # |x| as float32 bits (masked-off elements are 0), NaN as torch's NaN
            a = x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF
            a = tl.where(a > 0x7F800000, 0x7FC00000, a)
            tl.atomic_max(amax_ptr, tl.max(tl.max(a, axis=1), axis=0), sem="relaxed")


def _launch_args(dtype):
    fmax, min_normal, magic, shift, bias = FORMATS[dtype]
    return dict(
        FMAX_BITS=fmax, MIN_NORMAL_BITS=min_normal, MAGIC_BITS=magic, SHIFT=shift, BIAS=bias
    )


def fp8_cast_triton(
    t: torch.Tensor, scale: torch.Tensor, dtype=torch.float8_e4m3fn, transpose=False, amax=None
):
    """Triton kernel (GPU, or CPU under TRITON_INTERPRET=1); bitwise the reference's (q, q_t),
    and its amax update (in place, one atomic max per program, no host sync)."""
    require_triton()
    _check(t, dtype)
    _check_amax(amax, t)
    t = t.detach().contiguous()
    scale = scale.detach().reshape(1).to(device=t.device, dtype=torch.float32)
    rows, cols = t.shape
    rows_pad = padded_rows(rows)
    q = torch.empty((rows, cols), dtype=dtype, device=t.device)
    q_t = torch.empty((cols, rows_pad), dtype=dtype, device=t.device) if transpose else None
    grid_rows = rows_pad if transpose else rows
    if grid_rows and cols:
        grid = (triton.cdiv(grid_rows, BLOCK_R), triton.cdiv(cols, BLOCK_C))
        _fp8_cast_kernel[grid](
            t,
            scale,
            q.view(torch.uint8),
            (q_t if transpose else q).view(torch.uint8),
            (scale if amax is None else amax).view(torch.int32),
            rows,
            cols,
            rows_pad,
            **_launch_args(dtype),
            TRANSPOSE=transpose,
            AMAX=amax is not None,
            BLOCK_R=BLOCK_R,
            BLOCK_C=BLOCK_C,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
    return q, q_t


def compile_specs(dtype: torch.dtype) -> list:
    """The launches above (t in `dtype`; e4m3 and e5m2, with and without the transpose, with and
    without the fused amax of delayed scaling)."""
    arguments = (
        "t_ptr:*T/16 scale_ptr:*fp32/16 q_ptr:*u8/16 qt_ptr:*u8/16 amax_ptr:*i32/16 "
        "rows:i32 cols:i32/16 rows_pad:i32/16"
    )
    specs = []
    for fp8, name in ((torch.float8_e4m3fn, "e4m3"), (torch.float8_e5m2, "e5m2")):
        for transpose, amax in ((False, False), (True, False), (False, True), (True, True)):
            variant = ("_transpose" if transpose else "") + ("_amax" if amax else "")
            constexprs = {**_launch_args(fp8), "TRANSPOSE": transpose, "AMAX": amax}
            constexprs.update(BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
            spec = compile_spec(
                f"fp8_cast{variant}_{name}", _fp8_cast_kernel, dtype, arguments, constexprs,
                BLOCK_R * BLOCK_C, NUM_WARPS, scalar_reads=("scale_ptr",),
            )  # fmt: skip
            specs.append(spec)
    return specs
