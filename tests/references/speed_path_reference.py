"""Float64 reference of the FFN on the activation speed path: V:N:M activation, optional both-ways
weight gradients, each selection on its own ffn shard (as every tensor-parallel rank selects).

Plain torch with every gradient written out: the activation mask comes from the (independently
tested) torch sparsifier, the token masks of the both-ways weight gradients from the same rule
applied to the operand's transpose (blocks of V neurons x M tokens, 4 tokens kept, N = 2 then 2 per
neuron; tokens past T are zeros, never preferred to a real token).
"""

import torch

from megasparse.kernels import activation_sparsify_reference


def token_mask(t: torch.Tensor, pattern) -> torch.Tensor:
    """bool [T, F]: what the both-ways rule keeps of t [T, F]: per V neurons 4 of every M tokens
    (N = 2: of those, the 2 largest |t| of each neuron)."""
    v, n, m = pattern
    tokens, ffn = t.shape
    if tokens == 0:
        return torch.zeros_like(t, dtype=torch.bool)
    padded = t.new_zeros(ffn, -(-tokens // m) * m)
    padded[:, :tokens] = t.t()
    return activation_sparsify_reference(padded, v, m, False, n=n)[1][:, :tokens].t()


def _per_shard(t: torch.Tensor, shards: int, select) -> torch.Tensor:
    return torch.cat([select(part) for part in t.chunk(shards, dim=-1)], dim=-1)


def speed_path_mlp_reference(
    x,
    w1,
    b1,
    w2,
    b2,
    m1,
    m2,
    pattern,
    wgrad_pattern=None,
    shards=1,
    grad_output=None,
    probs=None,
):
    """y = (relu(x W1s^T + b1)^2 * Ma * p) W2s^T + b2 p and its gradients (W1s = M1*W1, ...).

    x [..., hidden]; pattern (v, n, m) or None; wgrad_pattern (v, n, m) or None: dW2 = dY^T (As *
    Ta) and dW1 = (dH * Th)^T X with Ta, Th the token masks of As = A p and dH, else exact.
    shards: the ffn shards (tensor-parallel ranks) that select on their own columns.
    Returns y, dx, dw1, db1, dw2, db2 (the dense master weights' gradients, ste) and the masks.
    """
    lead = x.shape[:-1]
    x = x.detach().double().reshape(-1, x.shape[-1])
    w1s, w2s = w1.detach().double() * m1, w2.detach().double() * m2
    pre = x @ w1s.t() + (0.0 if b1 is None else b1.detach().double())
    a = torch.relu(pre).square()
    if pattern is None:
        mask = torch.ones_like(a, dtype=torch.bool)
    else:
        v, n, m = pattern
        mask = _per_shard(
            pre, shards, lambda part: activation_sparsify_reference(part, v, m, True, n=n)[1]
        )
    scale = torch.ones(x.shape[0], 1, dtype=torch.float64)
    if probs is not None:
        scale = probs.detach().double().reshape(-1, 1)
    a_in = a * mask * scale  # fc2's input
    y = a_in @ w2s.t() + (0.0 if b2 is None else b2.detach().double() * scale)
    dy = torch.randn_like(y) if grad_output is None else grad_output.double().reshape(y.shape)
    d_a = (dy @ w2s) * scale * mask
    d_h = d_a * 2 * torch.relu(pre)
    a_w, d_h_w = a_in, d_h
    if wgrad_pattern is not None:
        a_w = a_in * _per_shard(a_in, shards, lambda part: token_mask(part, wgrad_pattern))
        d_h_w = d_h * _per_shard(d_h, shards, lambda part: token_mask(part, wgrad_pattern))
    out_shape = (*lead, y.shape[-1])
    return {
        "y": y.reshape(out_shape),
        "dx": (d_h @ w1s).reshape(*lead, x.shape[-1]),
        "dw1": d_h_w.t() @ x,
        "db1": d_h.sum(0),
        "dw2": dy.t() @ a_w,
        "db2": (dy * scale).sum(0),
        "dy": dy.reshape(out_shape),
        "mask": mask,
    }
