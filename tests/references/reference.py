"""Independent float64 references the tests compare against: plain torch, mask applied by hand."""

import torch


def masked_linear_reference(
    x, weight, bias, mask, gradient="ste", srste_decay=0.0, grad_output=None
):
    """Output and gradients of y = x (M*W)^T + b in float64, with the expected dense-weight gradient.

    The weight gradient of the masked product is dY^T X w.r.t. W*M; the gradient modes then say
    what the dense master weight receives: ste -> that, masked -> that * M,
    srste -> that + decay * (1 - M) * W.
    """
    x = x.detach().double().requires_grad_(True)
    w = weight.detach().double()
    m = mask.detach().bool()
    w_sparse = (w * m).requires_grad_(True)
    b = None if bias is None else bias.detach().double().requires_grad_(True)
    y = torch.nn.functional.linear(x, w_sparse, b)
    dy = torch.randn_like(y) if grad_output is None else grad_output.double()
    y.backward(dy)
    gw = w_sparse.grad
    if gradient == "masked":
        gw = gw * m
    elif gradient == "srste":
        gw = gw + srste_decay * (~m) * w
    return {"y": y.detach(), "dx": x.grad, "dw": gw, "db": None if b is None else b.grad, "dy": dy}


def _valid_tile_patterns():
    """Every 16-bit pattern of a 4x4 tile with exactly 2 ones per row and per column."""
    patterns = []
    for bits in range(1 << 16):
        rows = [(bits >> (4 * r)) & 0xF for r in range(4)]
        cols = [sum((bits >> (4 * r + c)) & 1 for r in range(4)) for c in range(4)]
        if all(bin(row).count("1") == 2 for row in rows) and all(c == 2 for c in cols):
            patterns.append(bits)
    return patterns


_VALID = None


def brute_force_transposable(tile_abs) -> float:
    """Best kept |w| sum (float64) over all 2-per-row-and-column patterns, enumerated independently."""
    global _VALID
    if _VALID is None:
        _VALID = _valid_tile_patterns()
    values = [float(v) for v in tile_abs.flatten()]
    return max(sum(values[k] for k in range(16) if (bits >> k) & 1) for bits in _VALID)


def sparse_mlp_reference(
    x, w1, b1, w2, b2, m1, m2, pattern, activation, grad_output=None, probs=None
):
    """Float64 MLP y = (act(x (M1*W1)^T + b1) * Ma) (M2*W2)^T + b2, Ma the activation mask.

    Ma comes from the (independently tested) torch reference sparsifier; everything else, and
    every gradient, is plain autograd. `probs` (MoE) scales each token's activation and fc2 bias.
    Returns outputs, gradients of x, W1, b1, W2, b2 (ste) and
    the activation before sparsification.
    """
    from megasparse.kernels import activation_sparsify_reference

    f = torch.nn.functional
    leaf = lambda t: t.detach().double().clone().requires_grad_(True)  # noqa: E731
    x = leaf(x)
    b1, b2 = (None if b is None else leaf(b) for b in (b1, b2))
    w1s, w2s = leaf(w1.double() * m1), leaf(w2.double() * m2)
    pre = f.linear(x, w1s, b1)
    squared = activation == "squared_relu"
    a = torch.relu(pre).square() if squared else activation(pre)
    source = pre if squared else a
    if pattern is None:  # dense activation
        mask = torch.ones_like(pre, dtype=torch.bool)
    else:
        v, n, m = pattern
        mask = activation_sparsify_reference(
            source.detach().reshape(-1, pre.shape[-1]), v, m, squared, n=n
        )[1].reshape(pre.shape)
    scale = 1.0 if probs is None else probs.detach().double().unsqueeze(-1)
    y = f.linear(a * mask * scale, w2s) + (0.0 if b2 is None else b2 * scale)
    dy = torch.randn_like(y) if grad_output is None else grad_output.double()
    y.backward(dy)
    grad = lambda t: None if t is None else t.grad  # noqa: E731
    return {
        "y": y.detach(),
        "dx": x.grad,
        "dw1": w1s.grad,
        "db1": grad(b1),
        "dw2": w2s.grad,
        "db2": grad(b2),
        "dy": dy,
        "activation": a.detach(),
        "mask": mask,
    }


def soft_threshold_reference(w):
    """S-STE's S(W) by a Python loop in float64: per group of 4, sign(w) max(|w| - t, 0), t = the
    3rd largest |w|."""
    out = torch.zeros_like(w, dtype=torch.float64)
    for r in range(w.shape[0]):
        for g in range(0, w.shape[1], 4):
            vals = [float(v) for v in w[r, g : g + 4]]
            t = sorted(abs(v) for v in vals)[1]
            for j, v in enumerate(vals):
                out[r, g + j] = max(abs(v) - t, 0.0) * (1 if v > 0 else -1)
    return out


def sste_beta_reference(w):
    """S-STE's beta = <W, S(W)> / <S(W), S(W)> in float64."""
    s = soft_threshold_reference(w)
    return float((w.double() * s).sum() / (s * s).sum())


def norm64(x, gamma, beta, normalization, eps, zero_centered):
    """TE's LayerNorm / RMSNorm in float64 (TE's own test references, tests/pytorch/test_numerics.py)."""
    g = gamma + 1 if zero_centered else gamma
    if normalization == "RMSNorm":
        return x * (x.square().mean(-1, keepdim=True) + eps).rsqrt() * g
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).square().mean(-1, keepdim=True)
    return (x - mu) * (var + eps).rsqrt() * g + beta
