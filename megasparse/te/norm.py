"""The normalization of TE LayerNormLinear on megasparse's routes (megasparse.te.forward)."""

import torch


def te_normalization(module, x):
    """TE LayerNormLinear's norm of x (already in the activation dtype): fp32 math, gamma and beta
    cast to x's dtype first, gamma + 1 with zero_centered_gamma, output rounded to x's dtype."""
    gamma = module.layer_norm_weight.to(x.dtype).float()
    if getattr(module, "zero_centered_gamma", False):
        gamma = gamma + 1
    xf, eps = x.float(), module.eps
    normalization = getattr(module, "normalization", "LayerNorm")
    if normalization == "RMSNorm":
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * gamma
    elif normalization == "LayerNorm":
        beta = module.layer_norm_bias.to(x.dtype).float()
        y = torch.nn.functional.layer_norm(xf, (xf.shape[-1],), gamma, beta, eps)
    else:
        raise ValueError(f"megasparse: TE normalization {normalization!r} is not LayerNorm/RMSNorm")
    return y.to(x.dtype)
