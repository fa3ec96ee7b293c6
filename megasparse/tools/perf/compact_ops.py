"""Stand-ins of the activation speed path's kernels, and the FFN that the path runs, for meta recording.

On device="meta", `kernels.pick` would choose the torch references (scatter, then a dense matmul):
the wrong cost. Each of the seven kernels (activation_compact, compact, scatter, compact_tokens,
gather_k_matmul, compact_matmul, squared_relu_compact_backward) is stood in for here by one op
with the kernel's own inputs and outputs, so the recorder counts the compact GEMMs by their compact FLOPs (registered in
COMPACT_GEMMS) and the memory kernels by their bytes. `redirected_pick` sends `kernels.pick` calls
for those kernels (megasparse.core.compact_activation makes them) to the stand-ins.
"""

import contextlib
import math
from unittest import mock

import torch

from megasparse import kernels
from megasparse.kernels import dispatch
from megasparse.tools.perf.recorder import COMPACT_GEMMS

_lib = torch.library.Library("megasparse_perf", "FRAGMENT")
_lib.define(
    "activation_compact(Tensor x, int v, int n, int m, bool squared_relu)"
    " -> (Tensor, Tensor, Tensor, Tensor)"
)
_lib.define("compact(Tensor dense, Tensor columns, int v, int m) -> Tensor")
_lib.define("scatter(Tensor values_c, Tensor columns, int v, int m, int ffn) -> Tensor")
_lib.define("compact_tokens(Tensor x, int v, int n, int m) -> (Tensor, Tensor)")
_lib.define("gather_k_matmul(Tensor a_c, Tensor columns, Tensor b, int v, int m) -> Tensor")
_lib.define("compact_matmul(Tensor g, Tensor b, Tensor columns, int v, int m) -> Tensor")
_lib.define("squared_relu_compact_backward(Tensor preact_c, Tensor grad_c) -> Tensor")


def _columns(x, blocks, groups):
    return x.new_empty((blocks, groups, 4), dtype=torch.int16)


def _activation_compact_meta(x, v, n, m, squared_relu):
    tokens, ffn = x.shape
    kept = 4 * ffn // m
    return (
        x.new_empty(tokens, kept),
        x.new_empty(tokens, kept),
        _columns(x, math.ceil(tokens / v), ffn // m),
        x.new_empty(4, dtype=torch.float64),
    )


def _compact_tokens_meta(x, v, n, m):
    tokens, ffn = x.shape
    groups = math.ceil(tokens / m)
    return x.new_empty(ffn, 4 * groups), _columns(x, math.ceil(ffn / v), groups)


_lib.impl("activation_compact", _activation_compact_meta, "Meta")
_lib.impl(
    "compact",
    lambda dense, columns, v, m: dense.new_empty(dense.shape[0], 4 * dense.shape[1] // m),
    "Meta",
)
_lib.impl(
    "scatter", lambda values, columns, v, m, ffn: values.new_empty(values.shape[0], ffn), "Meta"
)
_lib.impl("compact_tokens", _compact_tokens_meta, "Meta")
_lib.impl(
    "gather_k_matmul", lambda a_c, columns, b, v, m: a_c.new_empty(a_c.shape[0], b.shape[1]), "Meta"
)
_lib.impl(
    "compact_matmul",
    lambda g, b, columns, v, m: g.new_empty(g.shape[0], 4 * b.shape[1] // m),
    "Meta",
)
_lib.impl(
    "squared_relu_compact_backward", lambda preact_c, grad_c: torch.empty_like(grad_c), "Meta"
)

# (M, N, K) each kernel computes: the gather-GEMM reduces over the kept 4K/M, the compact GEMM
# writes only the kept 4F/M output columns
COMPACT_GEMMS["megasparse_perf::gather_k_matmul"] = lambda a_c, columns, b, v, m: (
    a_c.shape[0],
    b.shape[1],
    a_c.shape[1],
    a_c.dtype,
)
COMPACT_GEMMS["megasparse_perf::compact_matmul"] = lambda g, b, columns, v, m: (
    g.shape[0],
    4 * b.shape[1] // m,
    g.shape[1],
    g.dtype,
)


# --- the stand-ins, with the kernels' Python signatures --------------------------------------


def activation_compact(x, v, n, m, squared_relu):
    return torch.ops.megasparse_perf.activation_compact(x, v, n, m, squared_relu)


def compact(dense, columns, v, m):
    return torch.ops.megasparse_perf.compact(dense, columns, v, m)


def scatter(values_c, columns, v, m, ffn):
    return torch.ops.megasparse_perf.scatter(values_c, columns, v, m, ffn)


def compact_tokens(x, v, n, m):
    return torch.ops.megasparse_perf.compact_tokens(x, v, n, m)


def gather_k_matmul(a_c, columns, b, v, m):
    return torch.ops.megasparse_perf.gather_k_matmul(a_c, columns, b, v, m)


def compact_matmul(g, b, columns, v, m):
    return torch.ops.megasparse_perf.compact_matmul(g, b, columns, v, m)


def squared_relu_compact_backward(preact_c, grad_c):
    return torch.ops.megasparse_perf.squared_relu_compact_backward(preact_c, grad_c)


# kernel name (Triton function or its reference) -> stand-in
STANDINS = {
    "activation_compact_triton": activation_compact,
    "activation_compact_reference": activation_compact,
    "compact_triton": compact,
    "compact": compact,
    "scatter_triton": scatter,
    "scatter": scatter,
    "compact_tokens_triton": compact_tokens,
    "compact_tokens_reference": compact_tokens,
    "gather_k_matmul_triton": gather_k_matmul,
    "gather_k_matmul_reference": gather_k_matmul,
    "compact_matmul_triton": compact_matmul,
    "compact_matmul_reference": compact_matmul,
    "squared_relu_compact_backward_triton": squared_relu_compact_backward,
    "squared_relu_compact_backward_reference": squared_relu_compact_backward,
}


@contextlib.contextmanager
def redirected_pick():
    """`kernels.pick(triton, reference, t)` returns the stand-in for the seven kernels above."""
    original = dispatch.pick

    def pick(triton_fn, reference_fn, tensor):
        for fn in (triton_fn, reference_fn):
            standin = STANDINS.get(getattr(fn, "__name__", None))
            if standin is not None:
                return standin
        return original(triton_fn, reference_fn, tensor)

    with mock.patch.object(kernels, "pick", pick), mock.patch.object(dispatch, "pick", pick):
        yield
