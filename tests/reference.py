"""Independent float64 references the tests compare against: plain torch, mask applied by hand."""

import torch


def masked_linear_reference(x, weight, bias, mask, gradient="ste", srste_decay=0.0, grad_output=None):
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
