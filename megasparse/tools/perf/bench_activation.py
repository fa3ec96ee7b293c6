"""The activation speed path on a GPU: its kernels timed beside the dense cuBLAS GEMMs they replace.

`activation_gemms`: at one FFN shape and pattern, each activation-side GEMM as the path runs it
(megasparse.core.compact_activation: Triton on CUDA) against the dense GEMM of the same product,
and each compact memory kernel against a device copy of its bytes; every timed pair is checked to
compute the same product first. `activation_ffn_rows`: one optimizer step of megasparse's
SparseMLP per recipe against Megatron's dense MLP, beside perfmodel's projection for that recipe.
`timer(fn) -> ms` and `device` are parameters, so the plumbing runs on the CPU in the tests.
"""

import torch

from megasparse.config import parse_activation_pattern
from megasparse.tools.perf.models import ACTIVATION_PATTERNS, WGRAD_PATTERNS, Recipe
from megasparse.tools.perf.roofline import GATHER_EFFICIENCY


def projected_gemm_ratio(m: int, bound: str = "mid") -> float:
    """perfmodel's dense / compact GEMM time: M/4 of the work at efficiency e."""
    return m / 4 * GATHER_EFFICIENCY[bound]


def _same(got, want, what):
    if want.numel() == 0:
        return
    scale = want.abs().max().item() or 1.0
    error = (got.float() - want.float()).abs().max().item() / scale
    tolerance = 1e-2 if want.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if error > tolerance:
        raise AssertionError(
            f"{what}: the timed kernel differs from its dense product ({error:.2e})"
        )


def activation_gemms(hidden, ffn, tokens, pattern, wgrad, timer, device="cuda", dtype=None):
    """Rows {kernel, pattern, wgrad, ms, dense_ms, measured_ratio, projected_ratio} for the GEMMs and
    {kernel, ms, copy_ms, vs_copy} for the memory kernels at [tokens, hidden] x [ffn, hidden]."""
    from megasparse.core import compact_activation as ca

    dtype = dtype or torch.bfloat16
    p = parse_activation_pattern(pattern)
    wp = parse_activation_pattern(wgrad, "activation_wgrad")
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    x, w1, w2, dy = (
        randn(tokens, hidden),
        randn(ffn, hidden),
        randn(hidden, ffn),
        randn(tokens, hidden),
    )
    h = x @ w1.t()
    w2t = w2.t().contiguous()  # the layout the layer holds per step (linear_op._transposed_weight)
    a_c, h_c, columns, _ = ca.activation_compact(h, p, True)
    a = ca.scatter(a_c, columns, p, ffn)
    dh_c = ca.squared_relu_grad(h_c, ca.compact_matmul(dy, w2t.t(), columns, p))
    dh = ca.scatter(dh_c, columns, p, ffn)
    gemms = {  # name: (the path's kernel, the dense GEMM it replaces, what they must agree on)
        "fc2 forward Y = A W2^T (gather_k_matmul)": (
            lambda: ca.gather_k_matmul(a_c, columns, w2t, p),
            lambda: a @ w2.t(),
            None,
        ),
        "fc2 dgrad dA_c (compact_matmul)": (
            lambda: ca.compact_matmul(dy, w2t.t(), columns, p),
            lambda: dy @ w2,
            lambda dense: ca.compact(dense, columns, p),
        ),
        "fc1 dgrad dX = dH W1 (gather_k_matmul)": (
            lambda: ca.gather_k_matmul(dh_c, columns, w1, p),
            lambda: dh @ w1,
            None,
        ),
    }
    if wp is not None:  # both ways: an approximation, so timed beside the exact GEMM, not compared
        gemms["fc2 wgrad dW2^T = A_sel^T dY (both ways)"] = (
            lambda: ca.BothWaysWgrad(wp, "input")(dy, a),
            lambda: dy.t() @ a,
            False,
        )
        gemms["fc1 wgrad dW1 = dH_sel^T X (both ways)"] = (
            lambda: ca.BothWaysWgrad(wp, "grad_output")(dh, x),
            lambda: dh.t() @ x,
            False,
        )
    rows = []
    for name, (sparse, dense, compare) in gemms.items():
        if compare is not False:
            want = dense()
            _same(sparse(), want if compare is None else compare(want), name)
        ms, dense_ms = timer(sparse), timer(dense)
        m = wp.m if "both ways" in name else p.m
        rows.append(
            {
                "kernel": name,
                "pattern": pattern,
                "wgrad": wgrad,
                "ms": ms,
                "dense_ms": dense_ms,
                "measured_ratio": dense_ms / ms,
                "projected_ratio": projected_gemm_ratio(m),
            }
        )
    size = torch.finfo(dtype).bits // 8
    kept = a_c.numel()
    memory = {  # name: (launch, bytes read + written)
        "activation_compact": (
            lambda: ca.activation_compact(h, p, True),
            h.numel() * size + 2 * kept * size + columns.numel() * 2,
        ),
        "scatter": (lambda: ca.scatter(a_c, columns, p, ffn), kept * size + a.numel() * size),
    }
    if wp is not None:
        memory["compact_tokens"] = (
            lambda: ca.compact_tokens(a, wp),
            a.numel() * size + ffn * 4 * -(-tokens // wp.m) * size,
        )
    for name, (launch, nbytes) in memory.items():
        ms = timer(launch)
        copy = _copy_ms(nbytes, device, timer)
        rows.append(
            {"kernel": name, "pattern": pattern, "ms": ms, "copy_ms": copy, "vs_copy": copy / ms}
        )
    return rows


def _copy_ms(nbytes, device, timer):
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return timer(lambda: dst.copy_(src))


def bench_recipes(quick=False):
    """The recipes the GPU bench times: every pattern with and without both-ways weight gradients
    (2:4 transposable weights; the 1d mask costs the same on this path); --quick: two."""
    patterns = ("64:2:8", "64:4:16") if quick else ACTIVATION_PATTERNS
    return [Recipe("transposable", p, w) for p in patterns for w in (None, *WGRAD_PATTERNS)]


def activation_ffn_rows(mlp, step, timer, hidden, ffn, tokens, recipes, projected=None):
    """One optimizer step per recipe (modules built one at a time) against the dense MLP:
    rows {recipe, step_ms, dense_step_ms, measured_ratio, projected_ratio}.

    mlp(sparsity or None) -> module; step(module, x) -> the step function; projected(recipe) -> the
    projection's ratio or None."""
    from megasparse import SparsityConfig

    x = torch.randn(tokens, 1, hidden, dtype=torch.bfloat16, requires_grad=True)
    dense = mlp(None)
    x = x.to(next(dense.parameters()).device)
    dense_ms = timer(step(dense, x))
    del dense
    rows = []
    for r in recipes:
        sparsity = SparsityConfig(
            weights="2:4" if r.weights else None,
            mask=r.weights or "1d",
            activations=r.activations,
            activation_wgrad=r.activation_wgrad,
        )
        module = mlp(sparsity)
        ms = timer(step(module, x))
        del module
        rows.append(
            {
                "recipe": r.name,
                "hidden": hidden,
                "ffn": ffn,
                "tokens": tokens,
                "step_ms": ms,
                "dense_step_ms": dense_ms,
                "measured_ratio": dense_ms / ms,
                "projected_ratio": None if projected is None else projected(r),
            }
        )
    return rows
