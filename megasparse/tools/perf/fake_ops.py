"""Meta (fake) kernels for the GPU-only ops megasparse calls, so its GPU paths run on device="meta".

They follow torch 2.13's own meta registration and the CUDA binding it describes
(aten/src/ATen/native/sparse/cuda/cuSPARSELtOps.cpp), and enforce the binding's rules up front,
so that a dry run fails where the GPU would fail or read the wrong memory:

- `_cslt_compress(A [m, k])` has no meta kernel in torch. The binding returns a 2-D blob
  `[m, ceil(compressed_size / (m * itemsize))]` of A's dtype (cuSPARSELtOps.cpp: `orig_m`,
  `new_n = (compressed_size + div - 1) / div`). `compressed_size` comes from
  cusparseLtSpMMACompressedSize2; the fake uses the kept values plus 2 bits of metadata per kept
  value: 9/16 of A's elements for 16-bit dtypes, 10/16 for 8-bit (e4m3, int8). cuSPARSELt may
  pad small matrices beyond that.
- `_cslt_sparse_mm(cA, B [k, n])`: m is `cA.size(0)` (cuSPARSELtOps.cpp asserts `cA.dim() == 2`;
  torch/_meta_registrations.py `meta__cslt_sparse_mm` reads the same). The output is torch's
  own meta kernel's, called here. Checked on top:
  * cA is the blob `_cslt_compress` makes of an [m, k] matrix (the binding trusts k from B);
  * B's layout. The binding describes B from `B.is_contiguous()` alone: row-major [k, n] with
    leading dimension n, else the transpose of a row-major [n, k] with leading dimension k. Any
    other layout (an expanded dY, a column slice of x) is read with the wrong leading dimension.
    8-bit B must be the transpose (column-major): what torch's meta check asks of `_scaled_mm`'s
    e4m3 mat2 (`_check_scaled_mm_sizes`: "mat2 must be col_major") and the only layout
    PyTorch's FP8 and int8 cuSPARSELt tests run (test/test_sparse_semi_structured.py);
  * out_dtype as the binding accepts it; bias [m];
  * alpha: one element is read with `alpha_tensor.item<float>()` (a host sync per call):
    `alpha_item_calls` counts those; more elements are cuSPARSELt's per-row vector (m contiguous
    float32 values on the device).
  `sparse_mm_calls` logs each call's arguments.
- `semi_structured::cusparselt_mm` (PyTorch's op behind SparseSemiStructuredTensorCUSPARSELT's
  matmuls) runs its own Python body on meta, so `_cslt_sparse_mm` sees the operands it gets on
  the GPU (its registered fake would return a shape without calling it).

`SparseSemiStructuredTensor.from_dense` refuses any non-CUDA tensor before its dim, contiguity,
dtype and shape checks; `meta_device_checks()` lets meta tensors through to those same checks.

Use `with fake_gpu_ops():` - the registrations last only inside the block.
"""

import contextlib

import torch
from torch.library import Library

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
_EIGHT_BIT = (torch.float8_e4m3fn, torch.int8)
# cuSPARSELtOps.cpp, cslt 0.6.2+: e4m3 -> {e4m3, fp16, bf16, fp32}; int8 -> {fp16, bf16, int32}
_OUT_DTYPES = {
    torch.float8_e4m3fn: (torch.float8_e4m3fn, torch.float16, torch.bfloat16, torch.float32),
    torch.int8: (torch.float16, torch.bfloat16, torch.int32),
}

alpha_item_calls = 0
# every faked _cslt_sparse_mm call: dict(m, k, n, dtype, dense_layout ("row-major" or
# "column-major"), alpha (shape, dtype) or None, out_dtype, transpose_result)
sparse_mm_calls = []


def compressed_shape(rows: int, cols: int, dtype: torch.dtype) -> tuple:
    """The shape of `_cslt_compress` of a [rows, cols] 2:4 matrix (see the module docstring)."""
    if dtype not in _SIXTEEN_BIT + _EIGHT_BIT:
        raise RuntimeError(
            f"_cslt_compress: megasparse models cuSPARSELt's compressed size for fp16, bf16, e4m3 "
            f"and int8, not {dtype}"
        )
    itemsize = torch.empty((), dtype=dtype).element_size()
    kept_bytes = rows * cols // 2 * itemsize
    metadata_bytes = rows * cols // 8  # a 2-bit index per kept value
    row_bytes = rows * itemsize
    return rows, (kept_bytes + metadata_bytes + row_bytes - 1) // row_bytes


def cslt_compress_meta(sparse_input):
    if sparse_input.dim() != 2:
        raise RuntimeError(f"_cslt_compress: a 2-D input, got {sparse_input.dim()}-D")
    return sparse_input.new_empty(compressed_shape(*sparse_input.shape, sparse_input.dtype))


def dense_layout(dense_b):
    """How the binding reads B [k, n]: "row-major", "column-major", or None (neither: it would read
    B with the wrong leading dimension)."""
    if dense_b.is_contiguous():
        return "row-major"
    if dense_b.t().is_contiguous():
        return "column-major"
    return None


def _is_col_major(t) -> bool:
    """torch/_meta_registrations.py `_check_scaled_mm_sizes`: is_col_major (or a zero dim)."""
    stride = t.stride()
    return (stride[0] == 1 and stride[1] > 1) or 0 in t.shape


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
    from torch._meta_registrations import meta__cslt_sparse_mm

    if compressed_A.dim() != 2:
        raise RuntimeError(
            f"_cslt_sparse_mm: compressed_A must be the 2-D [m, ...] blob of _cslt_compress, got "
            f"{compressed_A.dim()}-D"
        )
    if dense_B.dim() != 2 or dense_B.dtype != compressed_A.dtype:
        raise RuntimeError(
            f"_cslt_sparse_mm: dense_B must be 2-D with A's dtype {compressed_A.dtype}, "
            f"got {dense_B.dim()}-D {dense_B.dtype}"
        )
    (k, n), m = dense_B.shape, compressed_A.shape[0]
    if tuple(compressed_A.shape) != compressed_shape(m, k, compressed_A.dtype):
        raise RuntimeError(
            f"_cslt_sparse_mm: compressed_A {tuple(compressed_A.shape)} is not the compressed "
            f"[{m}, {k}] matrix: the reduction dims of A and B disagree"
        )
    layout = dense_layout(dense_B)
    if layout is None:
        raise RuntimeError(
            f"_cslt_sparse_mm: dense_B {tuple(dense_B.shape)} with strides {dense_B.stride()} is "
            "neither row-major nor column-major; cuSPARSELt would read it with the wrong leading "
            "dimension. Pass a contiguous tensor or the transpose of one."
        )
    if compressed_A.dtype in _EIGHT_BIT and not _is_col_major(dense_B):
        raise RuntimeError(
            f"_cslt_sparse_mm: an 8-bit dense_B must be column-major (the transpose of a "
            f"contiguous [n, k] tensor), got strides {dense_B.stride()}"
        )
    if out_dtype is not None and out_dtype not in _OUT_DTYPES.get(compressed_A.dtype, ()):
        raise RuntimeError(
            f"_cslt_sparse_mm: out_dtype {out_dtype} is not supported for {compressed_A.dtype}"
        )
    if alpha is not None and alpha.numel() == 1:
        alpha_item_calls += 1  # cuSPARSELtOps.cpp: alpha = alpha_tensor.item<float>()
    elif alpha is not None and (
        alpha.dtype != torch.float32 or alpha.numel() != m or not alpha.is_contiguous()
    ):
        # vector alpha (CUSPARSELT_MATMUL_ALPHA_VECTOR_SCALING): m contiguous floats, read on device
        raise RuntimeError(
            f"_cslt_sparse_mm: a vector alpha must be {m} contiguous float32 values, "
            f"got {tuple(alpha.shape)} {alpha.dtype}"
        )
    sparse_mm_calls.append(
        dict(
            m=m,
            k=k,
            n=n,
            dtype=compressed_A.dtype,
            dense_layout=layout,
            alpha=None if alpha is None else (tuple(alpha.shape), alpha.dtype),
            out_dtype=out_dtype,
            transpose_result=transpose_result,
        )
    )
    return meta__cslt_sparse_mm(
        compressed_A,
        dense_B,
        bias,
        alpha,
        out_dtype,
        transpose_result,
        alg_id,
        split_k,
        split_k_mode,
    )


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


def _cusparselt_mm_body():
    """The Python body of PyTorch's semi_structured::cusparselt_mm custom op."""
    from torch._library.custom_ops import _maybe_get_opdef
    from torch.sparse.semi_structured import _ensure_cusparselt_mm_registered

    _ensure_cusparselt_mm_registered()
    return _maybe_get_opdef("semi_structured::cusparselt_mm")._init_fn


@contextlib.contextmanager
def fake_gpu_ops():
    """Register the meta kernels above (and meta_device_checks) for the duration of the block."""
    aten_lib = Library("aten", "IMPL")
    semi_structured_lib = Library("semi_structured", "IMPL")
    try:
        aten_lib.impl("_cslt_compress", cslt_compress_meta, "Meta")
        aten_lib.impl("_cslt_sparse_mm", cslt_sparse_mm_meta, "Meta")
        semi_structured_lib.impl("cusparselt_mm", _cusparselt_mm_body(), "Meta")
        with meta_device_checks():
            yield
    finally:
        semi_structured_lib._destroy()
        aten_lib._destroy()
