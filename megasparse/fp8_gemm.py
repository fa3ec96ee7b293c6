"""FP8 (e4m3) GEMMs with one 2:4 operand, no host syncs: cuSPARSELt on sm90, emulated elsewhere.

y = (x_q * x_scale_inv) @ (w_q * w_scale_inv)^T, fp32 accumulation, one rounding to `out_dtype`.

Sync-free scaling. `torch._cslt_sparse_mm(A, B, alpha=...)` (aten/.../cuSPARSELtOps.cpp) reads a
one-element alpha with `alpha_tensor.item<float>()`: a host sync per GEMM, which also breaks
CUDA graphs. An alpha of more than one element switches cuSPARSELt to
CUSPARSELT_MATMUL_ALPHA_VECTOR_SCALING and passes its device pointer: one float per row of the
sparse operand A (m of them). So the per-tensor scale x_scale_inv * w_scale_inv is expanded to an
[m] float32 vector on the device (`alpha_vector`) - no sync. PyTorch tests vector alpha with int8
only (its fp16/bf16 alpha test is skipped: "cuSPARSELt v0.6.x does not support bfloat/float16
alpha scaling"); for e4m3 it is untested there, so `ALPHA_MODES` also has "output": no alpha,
an fp32 result, and the scale applied as one multiply on the output (also sync-free, one more
pass over the output). The gpu-marked tests check both against the emulation.

Shapes (PyTorch's `_DTYPE_SHAPE_CONSTRAINTS` for e4m3 cuSPARSELt): the sparse operand is a
multiple of (32, 32); the dense one of (16, 16). Token counts are padded with zero rows to a
multiple of 16 and the result unpadded (`pad_rows`); the padding adds zeros to nothing.

Layout: cuSPARSELt's FP8 kernels want B transposed (PyTorch's own `semi_sparse_scaled_mm` passes
`B.contiguous().t()`); with A = W [out, in] and B = x^T, x [tokens, in] row-major gives exactly
that, and `transpose_result=True` returns y as [tokens, out].

Emulation (any device without the kernel, CPU in CI): `torch._scaled_mm` with the same e4m3
operands (the 2:4 weight as a dense e4m3 matrix with its zeros), the same scales, fp32
accumulation and the same output rounding; on the CPU the same math in torch (`scaled_mm`).
"""

import os
from typing import Optional

import torch

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
TOKEN_MULTIPLE = 16  # dense_min_rows / dense_min_cols for e4m3 in PyTorch's cuSPARSELt table
WEIGHT_MULTIPLE = 32  # sparse_min_rows / sparse_min_cols for e4m3
ALPHA_MODES = ("vector", "output")


def alpha_mode() -> str:
    mode = os.environ.get("MEGASPARSE_FP8_ALPHA", "vector")
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
    a_q, a_scale_inv, sparse_b, rows_b, b_scale_inv, out_dtype=torch.bfloat16, use_cusparselt=False
):
    """(a_q a_scale_inv) @ (B b_scale_inv)^T with B [rows_b, k] 2:4 e4m3, a_q [tokens, k] e4m3.

    sparse_b: `compress(B)` when use_cusparselt, else B itself (dense e4m3 with its zeros).
    Returns [tokens, rows_b] in out_dtype; no host sync on either path.
    """
    tokens = a_q.shape[0]
    a_pad = pad_rows(a_q)
    if use_cusparselt:
        if alpha_mode() == "vector":
            alpha = alpha_vector(a_scale_inv, b_scale_inv, rows_b)
            y = torch._cslt_sparse_mm(
                sparse_b, a_pad.t(), alpha=alpha, out_dtype=out_dtype, transpose_result=True
            )
        else:
            y = torch._cslt_sparse_mm(
                sparse_b, a_pad.t(), out_dtype=torch.float32, transpose_result=True
            )
            y = (y * (a_scale_inv.float() * b_scale_inv.float())).to(out_dtype)
    else:
        y = scaled_mm(a_pad, sparse_b.t(), a_scale_inv, b_scale_inv, out_dtype)
    return y if y.shape[0] == tokens else y[:tokens]


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
