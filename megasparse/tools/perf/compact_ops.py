"""Stand-ins of the activation speed path's kernels, and the FFN that the path runs, for meta recording.

On device="meta", `kernels.pick` would choose the torch references (scatter, then a dense matmul):
the wrong cost. Each of the six kernels (activation_compact, compact, scatter, compact_tokens,
gather_k_matmul, compact_matmul) is stood in for here by one op with the kernel's own inputs and
outputs, so the recorder counts the compact GEMMs by their compact FLOPs (registered in
COMPACT_GEMMS) and the memory kernels by their bytes. `redirected_pick` sends `kernels.pick` calls
for those kernels to the stand-ins; `compact_ffn` is the FFN of the path's contract (fc1 with its
weight's 2:4 path, the fused Squared-ReLU selection and compaction, gather/compact GEMMs for the
activation-side GEMMs, exact or both-ways weight gradients) composed of the same stand-ins.
"""

import contextlib
import math
from unittest import mock

import torch

from megasparse import kernels
from megasparse.core import linear_op as ops
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
}


@contextlib.contextmanager
def redirected_pick():
    """`kernels.pick(triton, reference, t)` returns the stand-in for the six kernels above."""
    original = dispatch.pick

    def pick(triton_fn, reference_fn, tensor):
        for fn in (triton_fn, reference_fn):
            standin = STANDINS.get(getattr(fn, "__name__", None))
            if standin is not None:
                return standin
        return original(triton_fn, reference_fn, tensor)

    with mock.patch.object(kernels, "pick", pick), mock.patch.object(dispatch, "pick", pick):
        yield


# --- the FFN of the activation speed path ----------------------------------------------------


class _CompactFFN(torch.autograd.Function):
    """Y = compact-path FFN(X) with fc1's step state (2:4 forward where pruned) and fc2's W*M.

    pattern: the activation's V:N:M (M >= 8); wgrad: None (dW exact, dense GEMM on the scattered
    operand) or the V:N:M applied along tokens to A and dH for the weight gradients."""

    @staticmethod
    def forward(ctx, x, w1, w2, fc1_step, fc2_step, plan, pattern, wgrad):
        v, n, m = pattern
        x2d = x.reshape(-1, x.shape[-1])
        h = ops._forward_gemm(x, x2d, fc1_step, None, plan)
        a_c, h_c, columns, _stats = activation_compact(h, v, n, m, True)
        w2m = fc2_step.dense(hold=True)
        y = gather_k_matmul(a_c, columns, w2m.t(), v, m)
        ctx.save_for_backward(x2d, a_c, h_c, columns)
        ctx.args = (fc1_step, fc2_step, pattern, wgrad, h.shape[1], x.shape)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2d, a_c, h_c, columns = ctx.saved_tensors
        fc1_step, fc2_step, (v, n, m), wgrad, ffn, x_shape = ctx.args
        dy = dy.reshape(-1, dy.shape[-1])
        w1m, w2m = fc1_step.dense(hold=True), fc2_step.dense(hold=True)
        da_c = compact_matmul(dy, w2m, columns, v, m)
        dw2 = _weight_grad(scatter(a_c, columns, v, m, ffn), dy, wgrad, transposed=True)
        dh_c = da_c * (2 * torch.relu(h_c))
        dx = gather_k_matmul(dh_c, columns, w1m, v, m)
        dw1 = _weight_grad(scatter(dh_c, columns, v, m, ffn), x2d, wgrad)
        return dx.reshape(x_shape), dw1, dw2, None, None, None, None, None


def _weight_grad(operand, other, wgrad, transposed=False):
    """operand^T @ other over tokens (its transpose if `transposed`): a dense GEMM, or a gather-GEMM
    over the tokens `wgrad` keeps (then transposed as a view)."""
    if wgrad is None:
        return other.t() @ operand if transposed else operand.t() @ other
    v, n, m = wgrad
    values_t, token_columns = compact_tokens(operand, v, n, m)
    grad = gather_k_matmul(values_t, token_columns, other, v, m)
    return grad.t() if transposed else grad


def compact_ffn(x, w1, w2, fc1_step, fc2_step, plan, pattern, wgrad=None):
    """fc2(compact(sqrelu(fc1(x)))) on the activation speed path; `plan` runs fc1's forward."""
    return _CompactFFN.apply(x, w1, w2, fc1_step, fc2_step, plan, tuple(pattern), wgrad)
