"""PyTorch's cuSPARSELt binding modelled on the CPU, so tests can run megasparse's cuSPARSELt code
paths on real numbers. Inside `with cusparselt_on_cpu():`, `torch._cslt_compress` and
`torch._cslt_sparse_mm` of CPU tensors compute what cusparseLtMatmul computes from the operands
as torch's binding (aten/src/ATen/native/sparse/cuda/cuSPARSELtOps.cpp) describes them:

- the compressed blob has the binding's 2-D shape (megasparse.tools.perf.fake_ops.compressed_shape); the
  matrix it stands for is kept beside it (the blob's own format is cuSPARSELt's);
- every call first passes megasparse.tools.perf.fake_ops' checks (layout, dtypes, out_dtype, alpha) on meta
  copies with the same strides, and is logged in fake_ops.sparse_mm_calls;
- B is read as the binding's descriptor says: row-major [k, n] if `B.is_contiguous()`, else the
  transpose of a row-major [n, k];
- products accumulate in fp32 (exact for e4m3 products), alpha (one value, or one per row of A)
  and bias apply in fp32, the result is rounded once to the output dtype.
"""

import contextlib

import torch
from torch.library import Library

from megasparse.tools.perf import fake_ops


def _meta_copy(t):
    if t is None:
        return None
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


@contextlib.contextmanager
def cusparselt_on_cpu():
    matrix_of = {}  # data_ptr of a compressed blob -> the matrix it was compressed from

    def compress(a):
        blob = a.new_empty(fake_ops.compressed_shape(*a.shape, a.dtype))
        matrix_of[blob.data_ptr()] = a.clone()
        return blob

    def sparse_mm(
        compressed_a,
        b,
        bias=None,
        alpha=None,
        out_dtype=None,
        transpose_result=False,
        alg_id=0,
        split_k=1,
        split_k_mode=-1,
    ):
        meta_args = [_meta_copy(t) for t in (compressed_a, b, bias, alpha)]
        fake_ops.cslt_sparse_mm_meta(*meta_args, out_dtype, transpose_result)
        a = matrix_of[compressed_a.data_ptr()]
        k, n = b.shape
        read = b.as_strided((k, n), (n, 1) if b.is_contiguous() else (1, k))
        acc = a.float() @ read.float()
        if alpha is not None:
            acc = acc * alpha.float().reshape(-1, 1)
        if bias is not None:
            acc = acc + bias.float().reshape(-1, 1)
        return (acc.t() if transpose_result else acc).to(out_dtype or b.dtype).contiguous()

    lib = Library("aten", "IMPL")
    try:
        lib.impl("_cslt_compress", compress, "CPU")
        lib.impl("_cslt_sparse_mm", sparse_mm, "CPU")
        yield
    finally:
        lib._destroy()
