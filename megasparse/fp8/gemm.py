"""The 2:4 FP8 GEMM (cuSPARSELt's e4m3 kernel on sm90, no host syncs) and its CPU emulation.

y = (x_q * x_scale_inv) @ (w_q * w_scale_inv)^T, fp32 accumulation, rounded to `out_dtype`
(once in the emulation and in "vector" mode, twice in "output" mode: see Scaling).

Scaling (the `alpha_mode` argument; default `configured_alpha_mode()`). torch._cslt_sparse_mm
(aten/.../cuSPARSELtOps.cpp) reads a one-element alpha with `alpha_tensor.item<float>()`: a host
sync per GEMM, which also breaks CUDA graphs. So the scale never goes in as a one-element alpha:
- "output" (default): no alpha. The GEMM writes its unscaled result in `out_dtype` as
  [rows_b, tokens] (transpose_result=False), and one elementwise pass, the epilogue, transposes,
  scales and adds the bias (`torch.addcmul(..., out=)`: fp32 math, rounded to `out_dtype`). This
  is the e4m3 combination PyTorch runs itself (torch/sparse/_semi_structured_ops.py
  `semi_sparse_scaled_mm`: column-major e4m3 B, bf16/fp16 out, transpose_result=False; tested
  by test/test_sparse_semi_structured.py `test_sparse_semi_structured_scaled_mm`), minus its
  one-element alpha. Numerics: two roundings to `out_dtype` (the GEMM's, then the epilogue's),
  so a bf16 result is within 2^-7 of the exact scaled product instead of 2^-8, far below the
  e4m3 operands' own 2^-4. Cost: one read and one write of the bf16 result more than in
  "vector" mode (an fp32 result would be 2.5x that traffic; megasparse.tools.perfmodel projects
  it).
- "vector" (opt-in: `MEGASPARSE_FP8_ALPHA=vector` or `alpha_mode="vector"`, until a GPU run
  has checked it): the per-tensor scale as an [m] float32 device vector, which switches cuSPARSELt
  to CUSPARSELT_MATMUL_ALPHA_VECTOR_SCALING; bf16 straight out of the GEMM, transpose_result=True,
  no epilogue pass. PyTorch tests vector alpha with int8 only (its fp16/bf16 alpha test is
  skipped: "cuSPARSELt v0.6.x does not support bfloat/float16 alpha scaling"). The gpu-marked
  tests check both modes against the emulation.

Shapes (PyTorch's `_DTYPE_SHAPE_CONSTRAINTS` for e4m3 cuSPARSELt): the sparse operand is a
multiple of (32, 32); the dense one of (16, 16). Token counts are padded with zero rows to a
multiple of 16 and the result unpadded (`pad_rows`); the padding adds zeros to nothing.

Layout: the e4m3 dense operand B = x^T must be column-major, the transpose of a contiguous
[tokens, k] x (torch's meta check of e4m3 `_scaled_mm`: "mat2 must be col_major"; PyTorch's FP8
cuSPARSELt tests pass `B.t()` of a contiguous B). `sparse_fp8_mm` passes `x.contiguous().t()`.

Emulation (any device without the kernel, CPU in CI): `torch._scaled_mm` with the same e4m3
operands (the 2:4 weight as a dense e4m3 matrix with its zeros), the same scales, fp32
accumulation and the same output rounding; on the CPU the same math in torch (`scaled_mm`).
"""

import os
from typing import Optional

import torch

from megasparse.core import cusparselt_search

TOKEN_MULTIPLE = 16  # dense_min_rows / dense_min_cols for e4m3 in PyTorch's cuSPARSELt table
WEIGHT_MULTIPLE = 32  # sparse_min_rows / sparse_min_cols for e4m3
ALPHA_MODES = ("output", "vector")


def configured_alpha_mode() -> str:
    """How the cuSPARSELt FP8 GEMM applies the scale: MEGASPARSE_FP8_ALPHA, default "output"."""
    mode = os.environ.get("MEGASPARSE_FP8_ALPHA", "output")
    if mode not in ALPHA_MODES:
        raise ValueError(
            f"megasparse: MEGASPARSE_FP8_ALPHA must be one of {ALPHA_MODES}, got {mode!r}"
        )
    return mode


def fp8_cusparselt_reason(device) -> Optional[str]:
    """Why cuSPARSELt's e4m3 2:4 GEMM cannot run on `device` (None: it can).

    sm90 only. sm89: PyTorch marks its own FP8 cuSPARSELt tests `xfailIfSM89`
    (test/test_sparse_semi_structured.py). sm100+: PyTorch's test file registers the cuSPARSELt
    backend for sm8x and sm9x only, so nothing there runs FP8 2:4; refused until it is tested.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return f"cuSPARSELt FP8 needs a CUDA device, got {device.type}"
    if not torch.backends.cusparselt.is_available():
        return "this PyTorch build has no cuSPARSELt"
    version = torch.backends.cusparselt.version()
    if version is None or version < 602:
        return f"cuSPARSELt FP8 needs cuSPARSELt 0.6.2+, found {version}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) == (8, 9):
        return "sm89: PyTorch expects its FP8 cuSPARSELt tests to fail there (xfailIfSM89)"
    if major != 9:
        return (
            f"sm{major}{minor}: PyTorch tests cuSPARSELt on sm8x/sm9x only; FP8 2:4 needs sm90 "
            "(Hopper)"
        )
    return None


def fp8_cusparselt_ok(device) -> bool:
    return fp8_cusparselt_reason(device) is None


def pad_rows(t: torch.Tensor, multiple: int = TOKEN_MULTIPLE) -> torch.Tensor:
    """t [rows, cols] with zero rows appended up to a multiple of `multiple` (t itself if none)."""
    pad = (-t.shape[0]) % multiple
    if pad == 0:
        return t
    return torch.cat([t, t.new_zeros(pad, t.shape[1])])


def alpha_vector(scale_inv_a: torch.Tensor, scale_inv_b: torch.Tensor, rows: int) -> torch.Tensor:
    """The per-tensor product scale as an [rows] float32 device vector (cuSPARSELt vector alpha)."""
    return (scale_inv_a.float() * scale_inv_b.float()).reshape(1).expand(rows).contiguous()


def compress(w_q: torch.Tensor):
    """A 2:4 e4m3 matrix as cuSPARSELt's compressed operand (weight prep: once per step)."""
    return torch._cslt_compress(w_q.contiguous())


def sparse_fp8_mm(
    a_q,
    a_scale_inv,
    sparse_b,
    rows_b,
    b_scale_inv,
    out_dtype=torch.bfloat16,
    use_cusparselt=False,
    bias=None,
    alpha_mode=None,
):
    """(a_q a_scale_inv) @ (B b_scale_inv)^T + bias: B [rows_b, k] 2:4 e4m3, a_q [tokens, k] e4m3.

    sparse_b: `compress(B)` when use_cusparselt, else B itself (dense e4m3 with its zeros).
    alpha_mode: "output" or "vector" (the module docstring; None: `configured_alpha_mode()`).
    Returns [tokens, rows_b] in out_dtype; no host sync on either path.
    """
    tokens = a_q.shape[0]
    a_pad = pad_rows(a_q).contiguous()  # B = a_pad^T: column-major, as the e4m3 kernels want
    if not use_cusparselt:
        y = scaled_mm(a_pad, sparse_b.t(), a_scale_inv, b_scale_inv, out_dtype)[:tokens]
        return y if bias is None else y + bias.to(y.dtype)
    mode = alpha_mode or configured_alpha_mode()
    if mode not in ALPHA_MODES:
        raise ValueError(f"megasparse: alpha_mode must be one of {ALPHA_MODES}, got {mode!r}")
    if mode == "vector":
        alpha = alpha_vector(a_scale_inv, b_scale_inv, rows_b)
        y = torch._cslt_sparse_mm(
            sparse_b,
            a_pad.t(),
            alpha=alpha,
            out_dtype=out_dtype,
            transpose_result=True,
            **cusparselt_search.fp8_arguments(sparse_b, a_pad.t(), rows_b, alpha, out_dtype, True),
        )[:tokens]
        return y if bias is None else y + bias.to(y.dtype)
    unscaled = torch._cslt_sparse_mm(
        sparse_b,
        a_pad.t(),
        out_dtype=out_dtype,
        **cusparselt_search.fp8_arguments(sparse_b, a_pad.t(), rows_b, None, out_dtype),
    )  # [rows_b, padded]
    return scale_epilogue(
        unscaled.t()[:tokens], a_scale_inv.float() * b_scale_inv.float(), bias, out_dtype
    )


def scale_epilogue(acc, scale, bias, out_dtype):
    """acc * scale (+ bias) rounded once to out_dtype, in one elementwise pass (fp32 math; on CUDA
    the cast is fused into the kernel) that also writes the result contiguous. acc may be the
    GEMM's bf16 result: its elements are widened to fp32 inside the same pass."""
    out = torch.empty(acc.shape, dtype=out_dtype, device=acc.device)
    # One element, one dim: PyTorch's type promotion (torch._prims_common.elementwise_dtypes, c10
    # result_type) lets a 0-dim tensor raise the result dtype only if it is of a higher category
    # (bool < integer < float < complex) than every dimensioned operand, so a 0-dim fp32 scale
    # with a bf16 acc gives bf16, and CUDA would read the scale rounded to bf16. A dimensioned
    # fp32 scale makes fp32 the common dtype: fp32 math, one cast to out_dtype.
    scale = scale.float().reshape(1)
    if bias is None:
        return torch.mul(acc, scale, out=out)
    return torch.addcmul(bias, acc, scale, out=out)


def scaled_mm(a_q, b_q, scale_a_inv, scale_b_inv, out_dtype):
    """`torch._scaled_mm` (a [m, k] row-major, b [k, n] column-major, per-tensor scales); on the
    CPU the same math in torch: the e4m3/e5m2 products are exact in fp32, accumulated in fp32,
    scaled once, rounded once to out_dtype (PyTorch's CPU _scaled_mm is a slow reference
    implementation: 1,400x slower at 1024x512x512 on one core; tests check the two agree)."""
    scale_a, scale_b = scale_a_inv.float().reshape(()), scale_b_inv.float().reshape(())
    if a_q.device.type != "cpu":
        return torch._scaled_mm(a_q, b_q, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    return ((a_q.float() @ b_q.float()) * (scale_a * scale_b)).to(out_dtype)


def dense_fp8_mm(a_q, a_scale_inv, b_q_t, b_scale_inv, out_dtype=torch.bfloat16):
    """(a_q a_scale_inv) @ (b_q_t.t() b_scale_inv): a [m, k] row-major, b_q_t [n, k] row-major
    (so b is column-major, as `torch._scaled_mm` wants). m is padded to 16, k must be."""
    rows = a_q.shape[0]
    y = scaled_mm(pad_rows(a_q), b_q_t.t(), a_scale_inv, b_scale_inv, out_dtype)
    return y if y.shape[0] == rows else y[:rows]
