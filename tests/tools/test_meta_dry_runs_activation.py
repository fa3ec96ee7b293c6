"""The FFN with a compacted V:N:M activation on device="meta" at the reference shape (hidden 8192,
ffn 28672, 16k tokens), TP=1 and TP=8 shard shapes: forward and backward through megasparse's own
ops (2:4 fc1/fc2 weights on cuSPARSELt's fakes), with the GPU kernels of the compact layout stood in
for by their GEMM (the gather-GEMM reduces over the 4F/M chosen columns; compact_matmul computes
only them) and recorded. Asserts every GEMM's (M, N, K): the five activation-side GEMMs run on the
compact shapes, and the weight gradients on 4 of every M tokens with both-ways weight gradients.
"""

import contextlib
from unittest import mock

import pytest
import torch

from megasparse.config import parse_activation_pattern
from megasparse.core import activation_sparsity, compact_activation
from megasparse.kernels import dispatch
from megasparse.tools.perf import meta_model
from megasparse.tools.perf.models import Recipe
from megasparse.tools.perf.recorder import MICROBATCH, OpRecorder

HIDDEN, FFN, TOKENS = 8192, 28672, 16384
BF16 = torch.bfloat16


def _cdiv(a, b):
    return -(-a // b)


class _CompactKernels:
    """Meta stand-ins of the compact layout's kernels (the names of megasparse.kernels), with the
    shapes of their contract; the two GEMM kernels run their GEMM on the gathered operand shape."""

    def __init__(self):
        self.calls = []

    def pick(self, original):
        """kernels.pick with the compact layout's kernels (by name) stood in for and recorded."""

        def pick(triton_fn, reference_fn, tensor):
            name = getattr(triton_fn, "__name__", "").removesuffix("_triton")
            kernel = getattr(self, name, None)
            if kernel is None:
                return original(triton_fn, reference_fn, tensor)

            def record(*args):
                self.calls.append(name)
                return kernel(*args)

            return record

        return pick

    @staticmethod
    def activation_compact(x, v, n, m, squared_relu):
        tokens, ffn = x.shape
        values_c = x.new_empty(tokens, 4 * ffn // m)
        columns = x.new_empty(_cdiv(tokens, v), ffn // m, 4, dtype=torch.int16)
        return values_c, torch.empty_like(values_c), columns, x.new_empty(4, dtype=torch.float64)

    @staticmethod
    def compact(dense, columns, v, m):
        return dense.new_empty(dense.shape[0], 4 * columns.shape[1])

    @staticmethod
    def scatter(values_c, columns, v, m, ffn):
        return values_c.new_empty(values_c.shape[0], ffn)

    @staticmethod
    def gather_k_matmul(a_c, columns, b, v, m):
        assert a_c.shape[1] == 4 * columns.shape[1] and b.shape[0] <= columns.shape[1] * m
        return a_c @ b.new_empty(a_c.shape[1], b.shape[1])  # the gathered rows of b

    @staticmethod
    def compact_matmul(g, b, columns, v, m):
        assert g.shape[1] == b.shape[0] and b.shape[1] == columns.shape[1] * m
        return g @ b.new_empty(b.shape[0], 4 * columns.shape[1])  # the chosen columns of b

    @staticmethod
    def compact_tokens(x, v, n, m):
        tokens, ffn = x.shape
        groups = _cdiv(tokens, m)
        columns = x.new_empty(_cdiv(ffn, v), groups, 4, dtype=torch.int16)
        return x.new_empty(ffn, 4 * groups), columns


@contextlib.contextmanager
def _meta_kernels():
    kernels = _CompactKernels()
    activation_kernel = activation_sparsity._kernel  # compacting patterns: activation_compact
    with (
        meta_model._standins(),  # cuSPARSELt fakes, the weight-mask kernels
        mock.patch.object(activation_sparsity, "_kernel", activation_kernel),
        mock.patch.object(compact_activation.kernels, "pick", kernels.pick(dispatch.pick)),
    ):
        yield kernels


def _ffn_on_meta(activations, wgrad, tp):
    """fc1 (2:4) -> Squared-ReLU sparsified to `activations` -> fc2 (2:4), forward and backward."""
    rec = OpRecorder()
    with _meta_kernels() as kernels, rec:
        x = meta_model._meta(TOKENS, HIDDEN, grad=True)
        recipe = Recipe(weights="1d", activations=activations, activation_wgrad=wgrad)
        fc1, fc2 = meta_model.Linear(recipe, True), meta_model.Linear(recipe, True)
        w1 = meta_model._meta(FFN // tp, HIDDEN, grad=True)
        w2 = meta_model._meta(HIDDEN, FFN // tp, grad=True)
        h = fc1(x, w1, fc1.prepare(w1))
        a, _ = activation_sparsity.squared_relu_sparsify(
            h,
            parse_activation_pattern(activations),
            activation_sparsity.ActivationStats(),
            parse_activation_pattern(wgrad),
        )
        y = fc2(a, w2, fc2.prepare(w2))
        y.backward(torch.empty_like(y))
    assert x.grad.shape == x.shape and w1.grad.shape == w1.shape and w2.grad.shape == w2.shape
    gemms = sorted(r.mnk for r in rec.records if r.kind == "gemm" and r.phase == MICROBATCH)
    return gemms, kernels.calls


@pytest.mark.parametrize("tp", [1, 8])
@pytest.mark.parametrize("wgrad", [None, "64:4:8"])
@pytest.mark.parametrize("activations", ["64:4:16", "64:2:8"])
def test_ffn_gemms_run_on_the_compact_shapes(activations, wgrad, tp):
    ffn = FFN // tp
    compact = 4 * ffn // parse_activation_pattern(activations).m  # the chosen columns
    wgrad_tokens = TOKENS if wgrad is None else 4 * TOKENS // 8  # the kept tokens
    gemms, calls = _ffn_on_meta(activations, wgrad, tp)
    expected = [
        (ffn, TOKENS, HIDDEN),  # fc1 forward: the 2:4 weight (cuSPARSELt, W1 x^T)
        (TOKENS, HIDDEN, compact),  # fc2 forward: gather-GEMM over the chosen columns
        (TOKENS, compact, HIDDEN),  # fc2 input gradient: only the chosen columns of dA
        (TOKENS, HIDDEN, compact),  # fc1 input gradient: gather-GEMM over dH's chosen columns
    ]
    if wgrad is None:  # exact weight gradients: dense GEMMs over all tokens
        expected += [(HIDDEN, ffn, TOKENS), (ffn, HIDDEN, TOKENS)]
    else:  # both ways: dW2^T = A_sel^T dY and dW1 = dH_sel^T X over the kept tokens
        expected += [(ffn, HIDDEN, wgrad_tokens)] * 2
    assert gemms == sorted(expected)
    assert calls.count("activation_compact") == 1
    assert calls.count("compact_tokens") == (0 if wgrad is None else 2)
    assert "compact" not in calls  # dA arrives compact from fc2: nothing re-gathered
