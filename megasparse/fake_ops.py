"""Meta (fake) kernels for the GPU-only ops megasparse calls, so its GPU paths run on device="meta".

PyTorch has no meta kernel for `aten::_cslt_compress`, and the one it has for
`aten::_cslt_sparse_mm` (torch/_meta_registrations.py, torch 2.13) reads m from
`compressed_A.size(0)`, which does not match the 1-D tensor `_cslt_compress` returns. Both fakes
below follow aten/src/ATen/native/sparse/cuda/cuSPARSELtOps.cpp:
- `_cslt_compress(A [m, k])` returns a 1-D tensor of `A.numel() * factor / 16` elements of A's
  dtype (kept values + metadata), factor 10 for int8 and 9 otherwise (fp16, bf16, fp32, e4m3);
- `_cslt_sparse_mm(cA, B [k, n])` recovers `m = cA.numel() * 16 / factor / k` and returns
  [m, n], or [n, m] with `transpose_result`; out_dtype only for 8-bit inputs.
A one-element `alpha` is read with `.item()` there (a host sync per call): `alpha_item_calls`
counts those calls so a dry run can assert the hot path has none; a longer alpha is cuSPARSELt's
per-row vector (m float32 values on the device), checked here. `sparse_mm_calls` logs each call.

`SparseSemiStructuredTensor.from_dense` refuses any non-CUDA tensor before its dim, contiguity,
dtype and shape checks; `meta_device_checks()` lets meta tensors through to those same checks.

Use `with fake_gpu_ops():` - the registrations last only inside the block.
"""

import contextlib

import torch
from torch.library import Library

_SIXTEEN_BIT_AND_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn)
_CSLT_DTYPES = _SIXTEEN_BIT_AND_FLOAT + (torch.int8,)
# cslt 0.6.2+: e4m3 x e4m3 -> {e4m3, fp16, bf16, fp32}; int8 -> {fp16, bf16, int32}
_OUT_DTYPES = {
    torch.float8_e4m3fn: (torch.float8_e4m3fn, torch.float16, torch.bfloat16, torch.float32),
    torch.int8: (torch.float16, torch.bfloat16, torch.int32),
}

alpha_item_calls = 0
# every faked _cslt_sparse_mm call: dict(m, k, n, dtype, dense_contiguous, alpha (shape, dtype) or
# None, out_dtype, transpose_result), so dry runs can check each call's arguments
sparse_mm_calls = []


def compression_factor(dtype: torch.dtype) -> int:
    if dtype not in _CSLT_DTYPES:
        raise RuntimeError(f"Unsupported dtype for cuSPARSELt compressed matrix: {dtype}")
    return 10 if dtype == torch.int8 else 9


def compressed_numel(rows: int, cols: int, dtype: torch.dtype) -> int:
    return rows * cols * compression_factor(dtype) // 16


def cslt_compress_meta(sparse_input):
    if sparse_input.dim() != 2:
        raise RuntimeError(f"_cslt_compress: a 2-D input, got {sparse_input.dim()}-D")
    rows, cols = sparse_input.shape
    return sparse_input.new_empty(compressed_numel(rows, cols, sparse_input.dtype))


def cslt_sparse_mm_meta(
    compressed_A,
    dense_B,
    bias=None,
    alpha=None,
    out_dtype=None,
    transpose_result=False,
    alg_id=0,
    split_k=1,
    split_k_mode=-1,
):
    global alpha_item_calls
    if compressed_A.dim() != 1:
        raise RuntimeError("_cslt_sparse_mm: compressed_A must be the 1-D tensor of _cslt_compress")
    if dense_B.dim() != 2 or dense_B.dtype != compressed_A.dtype:
        raise RuntimeError(
            f"_cslt_sparse_mm: dense_B must be 2-D with A's dtype {compressed_A.dtype}, "
            f"got {dense_B.dim()}-D {dense_B.dtype}"
        )
    k, n = dense_B.shape
    m = compressed_A.numel() * 16 // compression_factor(compressed_A.dtype) // k
    if compressed_numel(m, k, compressed_A.dtype) != compressed_A.numel():
        raise RuntimeError(
            f"_cslt_sparse_mm: compressed_A ({compressed_A.numel()} elements) is not an "
            f"[m, {k}] matrix: the reduction dims of A and B disagree"
        )
    if out_dtype is not None and out_dtype not in _OUT_DTYPES.get(compressed_A.dtype, ()):
        raise RuntimeError(
            f"_cslt_sparse_mm: out_dtype {out_dtype} is not supported for {compressed_A.dtype}"
        )
    if bias is not None and bias.shape != (m,):
        raise RuntimeError(f"_cslt_sparse_mm: bias must be [{m}], got {tuple(bias.shape)}")
    if alpha is not None and alpha.numel() == 1:
        alpha_item_calls += 1  # cuSPARSELtOps.cpp: alpha = alpha_tensor.item<float>()
    elif alpha is not None and (
        alpha.dtype != torch.float32 or alpha.numel() != m or not alpha.is_contiguous()
    ):
        # vector alpha (CUSPARSELT_MATMUL_ALPHA_VECTOR_SCALING): m contiguous floats, read on device
        raise RuntimeError(
            f"_cslt_sparse_mm: a vector alpha must be {m} contiguous float32 "
            "values, "
            f"got {tuple(alpha.shape)} {alpha.dtype}"
        )
    sparse_mm_calls.append(
        dict(
            m=m,
            k=k,
            n=n,
            dtype=compressed_A.dtype,
            dense_contiguous=dense_B.is_contiguous(),
            alpha=None if alpha is None else (tuple(alpha.shape), alpha.dtype),
            out_dtype=out_dtype,
            transpose_result=transpose_result,
        )
    )
    shape = (n, m) if transpose_result else (m, n)
    return dense_B.new_empty(shape, dtype=out_dtype or dense_B.dtype)


class _CudaLooking:
    """A meta tensor that PyTorch's from_dense validation sees as a CUDA tensor."""

    is_cuda = True

    def __init__(self, tensor):
        self._tensor = tensor

    def __getattr__(self, name):
        return getattr(self._tensor, name)


@contextlib.contextmanager
def meta_device_checks():
    """from_dense accepts meta tensors; every other check of PyTorch's still runs on them."""
    base = torch.sparse.SparseSemiStructuredTensor
    original = base.__dict__["_validate_device_dim_dtype_shape"]

    def validate(cls, tensor):
        checked = _CudaLooking(tensor) if tensor.device.type == "meta" else tensor
        return original.__func__(cls, checked)

    base._validate_device_dim_dtype_shape = classmethod(validate)
    try:
        yield
    finally:
        base._validate_device_dim_dtype_shape = original


@contextlib.contextmanager
def fake_gpu_ops():
    """Register the meta kernels above (and meta_device_checks) for the duration of the block."""
    lib = Library("aten", "IMPL")
    try:
        lib.impl("_cslt_compress", cslt_compress_meta, "Meta")
        lib.impl("_cslt_sparse_mm", cslt_sparse_mm_meta, "Meta")  # replaces torch's size(0) one
        with meta_device_checks():
            yield
    finally:
        lib._destroy()
