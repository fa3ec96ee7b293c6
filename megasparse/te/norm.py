"""The normalization of TE LayerNormLinear on megasparse's routes: TE's own norm kernels, forward and
backward (tex.layernorm_fwd / rmsnorm_fwd / layernorm_bwd / rmsnorm_bwd), as TE's
_LayerNormLinear runs them; a torch fallback only where TE's kernels are absent (CPU tests).

Numerics (TE's): x, gamma and beta in the activation dtype (TE's cast_if_needed), fp32 math inside
the kernel, gamma + 1 with zero_centered_gamma, output in the activation dtype; mu and rsigma
(fp32, one per row) saved for the backward kernel, which returns dx, dgamma (and dbeta) in the
activation dtype.

Under FP8 the norm writes the activation dtype and the GEMM's fused cast (the module's own TE
quantizer state, megasparse.fp8.scaling.TeQuantizerScaler / CurrentScaler) writes e4m3 x and its
padded transpose in one pass: TE's unfused order for current scaling (norm, amax, cast), and one
more read + write of the bf16 norm output than TE's fused delayed-scaling norm + cast, whose FP8
output would have to cross into megasparse's op as TE's Float8Tensor (and be all-gathered in FP8
under sequence parallelism, with an unpadded transpose).

Sequence parallelism: gamma / beta gradients are this rank's partial sums, as in TE; TE marks
layer_norm_weight / layer_norm_bias with `sequence_parallel`, and Megatron's finalize_model_grads
all-reduces them over the tensor-parallel group.
"""

import torch

# TE's kernels, in TE 2.5, 2.8, 2.12, 2.18 and main (transformer_engine/pytorch/csrc/extensions/
# pybind.cpp, extensions.h, normalization.cpp; module/_common.py apply_normalization;
# module/layernorm_linear.py _LayerNormLinear forward / backward), same in all:
#   layernorm_fwd(input, weight, bias, eps, ln_out, quantizer, otype, sm_margin,
#                 zero_centered_gamma) -> [out, mu, rsigma]
#   rmsnorm_fwd(input, weight, eps, ln_out, quantizer, otype, sm_margin, zero_centered_gamma)
#       -> [out, None, rsigma]
#   layernorm_bwd(dz, x, mu, rsigma, gamma, sm_margin, zero_centered_gamma) -> [dx, dgamma, dbeta]
#   rmsnorm_bwd(dz, x, rsigma, gamma, sm_margin, zero_centered_gamma) -> [dx, dgamma]
# input 2-D [N, H]; otype a tex.DType (constants.TE_DType[torch dtype]); ln_out / quantizer None:
# an unquantized output, allocated by the kernel.
NORMALIZATIONS = ("LayerNorm", "RMSNorm")


def te_norm_kernels(device):
    """(transformer_engine_torch, TE_DType) where TE is installed and `device` is CUDA, else None."""
    if torch.device(device).type != "cuda":
        return None
    try:
        import transformer_engine_torch as tex
        from transformer_engine.pytorch.constants import TE_DType
    except ImportError:
        return None
    return tex, TE_DType


def _cast_if_needed(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)


class _TeNorm(torch.autograd.Function):
    """TE's norm kernels on [N, H] x (activation dtype): y, and dx / dgamma / dbeta."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, kernels, normalization, eps, zero_centered, margins):
        tex, te_dtype = kernels
        gamma, beta = _cast_if_needed(weight, x2d.dtype), _cast_if_needed(bias, x2d.dtype)
        fwd_margin, bwd_margin = margins
        otype = te_dtype[x2d.dtype]
        if normalization == "LayerNorm":
            y, mu, rsigma = tex.layernorm_fwd(
                x2d, gamma, beta, eps, None, None, otype, fwd_margin, zero_centered
            )
        else:
            y, mu, rsigma = tex.rmsnorm_fwd(
                x2d, gamma, eps, None, None, otype, fwd_margin, zero_centered
            )
        ctx.save_for_backward(x2d, gamma, mu, rsigma)
        ctx.tex, ctx.normalization = tex, normalization
        ctx.bwd_margin, ctx.zero_centered = bwd_margin, zero_centered
        ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, gamma, mu, rsigma = ctx.saved_tensors
        tex, margin, zero_centered = ctx.tex, ctx.bwd_margin, ctx.zero_centered
        dy = dy.contiguous()
        if ctx.normalization == "LayerNorm":
            dx, dgamma, dbeta = tex.layernorm_bwd(dy, x2d, mu, rsigma, gamma, margin, zero_centered)
        else:
            (dx, dgamma), dbeta = (
                tex.rmsnorm_bwd(dy, x2d, rsigma, gamma, margin, zero_centered),
                None,
            )
        weight_dtype, bias_dtype = ctx.param_dtypes
        dgamma = dgamma.to(weight_dtype)
        dbeta = None if bias_dtype is None or dbeta is None else dbeta.to(bias_dtype)
        return dx, dgamma, dbeta, None, None, None, None, None


def _torch_normalization(x, gamma, beta, normalization, eps, zero_centered):
    """Where TE's kernels are absent (CPU, stand-ins): TE's numerics in eager torch ops."""
    gamma = gamma.to(x.dtype).float()
    gamma = gamma + 1 if zero_centered else gamma
    xf = x.float()
    if normalization == "RMSNorm":
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * gamma
    else:
        beta = beta.to(x.dtype).float()
        y = torch.nn.functional.layer_norm(xf, (xf.shape[-1],), gamma, beta, eps)
    return y.to(x.dtype)


def te_normalization(module, x):
    """TE LayerNormLinear's norm of x (already in the activation dtype), with TE's kernels on CUDA,
    forward and backward; the module's normalization, eps, zero_centered_gamma and SM margins
    (NVTE_FWD/BWD_LAYERNORM_SM_MARGIN; inference margin without grad, as TE)."""
    normalization = getattr(module, "normalization", "LayerNorm")
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"megasparse: TE normalization {normalization!r} is not one of {NORMALIZATIONS}; "
            "use normalization='LayerNorm' or 'RMSNorm'"
        )
    gamma = module.layer_norm_weight
    beta = getattr(module, "layer_norm_bias", None) if normalization == "LayerNorm" else None
    if normalization == "LayerNorm" and beta is None:
        raise ValueError("megasparse: LayerNorm needs layer_norm_bias; the module has none")
    eps, zero_centered = module.eps, bool(getattr(module, "zero_centered_gamma", False))
    kernels = te_norm_kernels(x.device)
    if kernels is None:
        return _torch_normalization(x, gamma, beta, normalization, eps, zero_centered)
    if x.shape[-1] != gamma.shape[0]:
        raise ValueError(
            f"megasparse: the norm input has {x.shape[-1]} features, layer_norm_weight "
            f"{gamma.shape[0]}"
        )
    grad = torch.is_grad_enabled()
    fwd_margin = getattr(module, "fwd_ln_sm_margin" if grad else "inf_ln_sm_margin", 0)
    margins = (int(fwd_margin or 0), int(getattr(module, "bwd_ln_sm_margin", 0) or 0))
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[0] == 0:  # no rows: no kernel launch; zero parameter gradients through autograd
        return _torch_normalization(x, gamma, beta, normalization, eps, zero_centered)
    y = _TeNorm.apply(
        x2d.contiguous(), gamma, beta, kernels, normalization, eps, zero_centered, margins
    )
    return y.view(x.shape)
