"""The meta-device model perfmodel records: megasparse's real ops on the FFN / layer of a recipe,
with one stand-in op per GPU kernel whose CPU reference would otherwise be recorded (mask,
activation, FP8 cast and compact kernels; flash attention), and the stand-in of TE's dense FP8
linear. `record_case` gives the recorded ops of one case; megasparse.tools.perfmodel prices them
and megasparse.tools.perf.te_spec builds the Transformer Engine cases from the same pieces.
"""

import contextlib
import functools
from dataclasses import dataclass
from types import SimpleNamespace
from unittest import mock

import torch
import torch.nn.functional as F

from megasparse.core import activation_sparsity, compact_activation


from megasparse.fp8 import linear as fp8_linear

from megasparse.fp8 import scaling as fp8_recipe

from megasparse.core import masks

from megasparse.core import linear_op as ops
from megasparse.config import SparsityConfig, parse_activation_pattern
from megasparse.core.weight_state import SparseWeightState
from megasparse.core.backends import BACKENDS
from megasparse.tools.perf import compact_ops
from megasparse.tools.perf.fake_ops import fake_gpu_ops
from megasparse.tools.perf.models import (
    SCOPES,
    Recipe,
)
from megasparse.tools.perf.models import recipe as recipe_spec
from megasparse.tools.perf.recorder import COMPUTE_KERNELS, WEIGHT_PREP, OpRecorder

BF16 = torch.bfloat16

# --- stand-ins for GPU kernels: one op with the kernel's inputs and outputs ------------------

_lib = torch.library.Library("megasparse_perf", "DEF")
_lib.define("mask_2_4(Tensor weight, str kind) -> Tensor")
_lib.define("act_sparsify(Tensor x, bool squared_relu) -> (Tensor, Tensor, Tensor)")
_lib.define("squared_relu_sparse_bwd(Tensor x, Tensor mask, Tensor grad) -> Tensor")
_lib.define("fp8_cast_transpose(Tensor x, ScalarType dtype) -> (Tensor, Tensor, Tensor)")
_lib.define(
    "fp8_cast(Tensor t, Tensor scale, ScalarType dtype, bool transpose, Tensor(a!)? amax=None)"
    " -> (Tensor, Tensor)"
)
_lib.define("attention_fwd(Tensor q, Tensor k, Tensor v) -> (Tensor, Tensor)")
_lib.define(
    "attention_bwd(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse)"
    " -> (Tensor, Tensor, Tensor)"
)
_lib.impl("mask_2_4", lambda w, kind: torch.empty_like(w, dtype=torch.bool), "Meta")
_lib.impl("squared_relu_sparse_bwd", lambda x, mask, grad: torch.empty_like(grad), "Meta")
_lib.impl(
    "act_sparsify",
    lambda x, sq: (
        torch.empty_like(x),
        torch.empty_like(x, dtype=torch.bool),
        x.new_empty(4, dtype=torch.float64),
    ),
    "Meta",
)
_lib.impl(
    "fp8_cast_transpose",
    lambda x, dtype: (
        torch.empty_like(x, dtype=dtype),
        torch.empty_like(x.t(), dtype=dtype).contiguous(),
        x.new_empty((), dtype=torch.float32),
    ),
    "Meta",
)
_lib.impl(
    "fp8_cast",  # megasparse.kernels.fp8_cast: q, and q_t [cols, rows padded to 16] (or empty);
    # with `amax`, max |t| atomically max-combined into it from the same pass
    lambda t, scale, dtype, transpose, amax=None: (
        torch.empty_like(t, dtype=dtype),
        t.new_empty((t.shape[1], -(-t.shape[0] // 16) * 16) if transpose else (0,), dtype=dtype),
    ),
    "Meta",
)
_lib.impl(
    "attention_fwd",
    lambda q, k, v: (torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)),
    "Meta",
)
_lib.impl(
    "attention_bwd",
    lambda do, q, k, v, o, lse: (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)),
    "Meta",
)


def _attention_flops(q, *rest):
    """Causal attention [batch*heads, seq, head_dim]: QK^T and PV, half the square (causal)."""
    bh, s, d = q.shape
    return 2 * 2 * bh * s * s * d // 2


COMPUTE_KERNELS["megasparse_perf::attention_fwd"] = _attention_flops
# FlashAttention-2 paper (Dao 2023): the backward does 2.5x the forward's matmul FLOPs.
COMPUTE_KERNELS["megasparse_perf::attention_bwd"] = lambda do, q, *rest: (
    5 * _attention_flops(q) // 2
)


def _mask_kernel(weight):
    return torch.ops.megasparse_perf.mask_2_4(weight, "2:4")


def _act_backward_kernel(x, mask, grad):
    return torch.ops.megasparse_perf.squared_relu_sparse_bwd(x, mask, grad)


def _cast_kernel(t, scale, dtype, transpose, amax=None):
    with torch.no_grad():  # a cast of the operand, not a differentiable op
        q, q_t = torch.ops.megasparse_perf.fp8_cast(t, scale, dtype, transpose, amax)
    return q, q_t if transpose else None


def _act_kernel(x2d, pattern, squared_relu):
    if pattern.compacts:  # the compact form: its kernel is stood in for through kernels.pick
        return compact_activation.activation_compact(x2d, pattern, squared_relu)
    values, mask, stats = torch.ops.megasparse_perf.act_sparsify(x2d, squared_relu)
    return values, mask, None, stats


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        o, lse = torch.ops.megasparse_perf.attention_fwd(q, k, v)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        return torch.ops.megasparse_perf.attention_bwd(do, *ctx.saved_tensors)


@contextlib.contextmanager
def _standins():
    """GPU kernels (Triton masks, fused activation sparsifier, FP8 cast, cuSPARSELt FP8, the
    activation speed path's compact kernels) for the CPU paths."""
    kernels = {"1d": (_mask_kernel, _mask_kernel), "transposable": (_mask_kernel, _mask_kernel)}
    with (
        fake_gpu_ops(),
        mock.patch.dict(masks._MASK_KERNELS, kernels),
        mock.patch.object(activation_sparsity, "_kernel", _act_kernel),
        mock.patch.object(activation_sparsity, "_backward_kernel", _act_backward_kernel),
        mock.patch.object(fp8_recipe, "_CAST_KERNEL", (_cast_kernel, _cast_kernel)),
        compact_ops.redirected_pick(),
    ):
        yield


# --- FP8 dense baseline (Transformer Engine's recipe: all three GEMMs in FP8) -----------------


def _fp8_cast(t, dtype=fp8_recipe.E4M3):
    """TE's fused cast + transpose + amax: one read of t, the FP8 copy and its transpose written."""
    with torch.no_grad():  # a cast of the operand, not a differentiable op
        q, q_t, amax = torch.ops.megasparse_perf.fp8_cast_transpose(t, dtype)
    return q, q_t, fp8_recipe.scale_from_amax(amax)


class _Fp8DenseLinear(torch.autograd.Function):
    """y = x W^T with e4m3 x and W, e5m2 dy in dgrad/wgrad (TE's HYBRID format), bf16 outputs."""

    @staticmethod
    def forward(ctx, x, weight, w_q, w_q_t, w_scale):
        x2d = x.reshape(-1, x.shape[-1])
        x_q, x_q_t, x_scale = _fp8_cast(x2d)
        one = x_scale.new_ones(())
        y = torch._scaled_mm(
            x_q, w_q.t(), scale_a=one / x_scale, scale_b=one / w_scale, out_dtype=BF16
        )
        ctx.save_for_backward(x_q_t, x_scale, w_q_t, w_scale)
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x_q_t, x_scale, w_q_t, w_scale = ctx.saved_tensors
        dy_q, dy_q_t, dy_scale = _fp8_cast(dy.reshape(-1, dy.shape[-1]), torch.float8_e5m2)
        one = dy_scale.new_ones(())
        dx = torch._scaled_mm(
            dy_q, w_q_t.t(), scale_a=one / dy_scale, scale_b=one / w_scale, out_dtype=BF16
        )
        dw = torch._scaled_mm(
            dy_q_t, x_q_t.t(), scale_a=one / dy_scale, scale_b=one / x_scale, out_dtype=BF16
        )
        return dx.reshape(ctx.x_shape), dw, None, None, None


# --- FP8 2:4: Megatron's default recipe (--fp8-recipe delayed, HYBRID) ----------------------


def delayed_plan(device):
    """The scalers megasparse.te.forward builds for a TE linear under DelayedScaling (HYBRID): x and dY
    (e5m2) with the module's TE quantizer state (scale from TE's amax history; this tensor's amax
    recorded into TE's amax buffer by the cast itself), and the e4m3 dY of the sparse dgrad (the
    cuSPARSELt binding is e4m3-only) with current scaling: its amax, then its cast."""

    def state():
        return SimpleNamespace(
            scale=torch.ones(1, device=device), amax=torch.zeros(1, device=device)
        )

    return fp8_linear.Fp8LinearPlan(
        fp8_recipe.TeQuantizerScaler(state(), fp8_recipe.E4M3),
        fp8_recipe.TeQuantizerScaler(state(), fp8_recipe.E5M2),
        fp8_recipe.CurrentScaler(fp8_recipe.E4M3),
        use_cusparselt=True,
    )


# --- recipes: how one linear runs, and what is prepared per optimizer step --------------------


@dataclass
class Linear:
    recipe: Recipe
    sparse: bool  # whether this linear is one megasparse sparsifies (fc1, fc2)

    @property
    def pruned(self):
        return self.sparse and self.recipe.weights is not None

    def prepare(self, weight):
        """Per-optimizer-step state of this weight (run in the weight-prep phase): megasparse's own
        SparseWeightState, with every operand the step holds built here, as at a step's first use."""
        fp8 = self.recipe.fp8
        if fp8 and not self.pruned:
            return _fp8_cast(weight)
        sparsity = SparsityConfig(
            weights="2:4" if self.pruned else None, mask=self.recipe.weights or "1d"
        )
        step = SparseWeightState().step(weight, sparsity, self.plan().backend)
        if fp8:  # the e4m3 W*M and its compressed operands, once per step
            fp8_linear.fp8_weight(step, use_cusparselt=True)
            return step
        if step.pruned and not self.recipe.compacts:
            step.compressed()
            if step.transposable and step.hold_backward:
                step.compressed_t()
        return step

    def plan(self):
        if not self.sparse or (self.recipe.weights is None and self.recipe.activations is None):
            return ops.LinearPlan(backend=BACKENDS["dense"])
        return ops.LinearPlan(
            backend=BACKENDS["cusparselt"], transposable=self.recipe.weights == "transposable"
        )

    def __call__(self, x, weight, state):
        if self.recipe.fp8 and not self.pruned:
            return _Fp8DenseLinear.apply(x, weight, *state)
        if self.recipe.fp8:  # megasparse.fp8.linear: what sparse TE linears run under FP8
            return fp8_linear.fp8_sparse_linear_step(x, weight, None, state, delayed_plan(x.device))
        return ops.sparse_linear_step(x, weight, None, state, self.plan())


def _meta(*shape, dtype=BF16, grad=False):
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)


def _ffn(rec, recipe: Recipe, x, tp, shape):
    """fc1 -> squared ReLU (sparsified as the recipe says) -> fc2, at Megatron's TP shard shapes."""
    fc1, fc2 = Linear(recipe, True), Linear(recipe, True)
    w1, w2 = (
        _meta(shape.ffn // tp, shape.hidden, grad=True),
        _meta(shape.hidden, shape.ffn // tp, grad=True),
    )
    rec.mark_weight(w1, w2)
    with rec.phase(WEIGHT_PREP):
        s1, s2 = fc1.prepare(w1), fc2.prepare(w2)
        if recipe.compacts:  # W*M of both held for the gather GEMMs; fc1's forward on the 2:4 path
            s1.dense(hold=True), s2.dense(hold=True)
            if s1.pruned:
                s1.compressed()
    if recipe.activations is None:
        from megatron.core.activations import squared_relu

        return fc2(squared_relu(fc1(x, w1, s1)), w2, s2)
    # the activation and its gradient dH come out marked (megasparse.core.sparse_operand): 2:4, or
    # carrying their compact form (M >= 8), which fc2's and fc1's GEMMs then gather
    h = fc1(x, w1, s1)
    a, _ = activation_sparsity.squared_relu_sparsify(
        h,
        parse_activation_pattern(recipe.activations),
        activation_sparsity.ActivationStats(),
        parse_activation_pattern(recipe.activation_wgrad, "activation_wgrad"),
    )
    return fc2(a, w2, s2)


def _attention_block(rec, recipe: Recipe, x, tp, shape):
    """QKV -> causal flash attention -> proj, dense in every recipe (megasparse's default
    targets are fc1/fc2; FP8 recipes run them in FP8)."""
    qkv, proj = Linear(recipe, False), Linear(recipe, False)
    hidden, seq, head_dim = shape.hidden, shape.seq, shape.head_dim
    w_qkv, w_proj = (
        _meta(3 * hidden // tp, hidden, grad=True),
        _meta(hidden, hidden // tp, grad=True),
    )
    rec.mark_weight(w_qkv, w_proj)
    with rec.phase(WEIGHT_PREP):
        s_qkv, s_proj = qkv.prepare(w_qkv), proj.prepare(w_proj)
    tokens, heads = x.shape[0], shape.heads // tp
    q, k, v = qkv(x, w_qkv, s_qkv).reshape(tokens // seq, seq, 3, heads, head_dim).unbind(2)
    o = _Attention.apply(*(t.transpose(1, 2).reshape(-1, seq, head_dim) for t in (q, k, v)))
    o = (
        o.reshape(tokens // seq, heads, seq, head_dim)
        .transpose(1, 2)
        .reshape(tokens, heads * head_dim)
    )
    return proj(o, w_proj, s_proj)


@functools.lru_cache(maxsize=None)
def _record(recipe: Recipe, scope: str, tokens: int, tp: int) -> OpRecorder:
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    kind, shape = SCOPES[scope]
    rec = OpRecorder()
    with _standins(), rec:
        x = _meta(tokens, shape.hidden, grad=True)
        if kind == "ffn":
            out = _ffn(rec, recipe, x, tp, shape)
        else:
            ln_w = _meta(shape.hidden, grad=True)
            norm = (shape.hidden,)
            h = x + _attention_block(rec, recipe, F.layer_norm(x, norm, ln_w), tp, shape)
            out = h + _ffn(rec, recipe, F.layer_norm(h, norm, ln_w), tp, shape)
        out.backward(torch.empty_like(out))
    return rec


def record_case(recipe, scope: str, tokens: int, tp: int) -> OpRecorder:
    """Forward + backward of one FFN or layer (scope: megasparse.tools.perf.models.SCOPES) at
    per-rank shard shapes, recorded op by op; recipe: a Recipe or its name. Cached per case.

    No sequence parallelism: LayerNorm and residual adds see all tokens on every rank.
    Communication is not modeled (the same in every recipe).
    """
    return _record(recipe_spec(recipe), scope, tokens, tp)


# --- the table -----------------------------------------------------------------------------
