"""CPU stand-ins of the Transformer Engine kernels megasparse calls, with TE's exact call signatures
(keyword names, return lists) in TE 2.5, 2.8, 2.12, 2.18 and main, computed in float32 torch.

- Norm kernels (transformer_engine_torch, csrc/extensions/pybind.cpp + normalization.cpp):
  layernorm_fwd / rmsnorm_fwd / layernorm_bwd / rmsnorm_bwd; DType and TE_DType
  (transformer_engine/pytorch/constants.py) stand for tex.DType and its torch map.
- general_gemm (transformer_engine/pytorch/cpp_extensions/gemm.py) on Float8Tensor-like operands
  (`Float8TensorStandIn`: _data, _transpose, _scale_inv, _fp8_dtype), with a call log.
"""

import enum
from types import SimpleNamespace

import torch


class DType(enum.Enum):  # tex.DType members megasparse passes
    kByte = 0
    kInt32 = 2
    kFloat32 = 4
    kFloat16 = 5
    kBFloat16 = 6
    kFloat8E4M3 = 7
    kFloat8E5M2 = 8


TE_DType = {
    torch.uint8: DType.kByte,
    torch.float8_e4m3fn: DType.kFloat8E4M3,
    torch.float8_e5m2: DType.kFloat8E5M2,
    torch.int32: DType.kInt32,
    torch.float32: DType.kFloat32,
    torch.half: DType.kFloat16,
    torch.bfloat16: DType.kBFloat16,
}
_TORCH = {v: k for k, v in TE_DType.items()}

calls = []  # (kernel name, kwargs-like dict) of every call, for tests that count them


def _check_2d(name, t):
    if t.dim() != 2:  # TE reads input_cu.size(0), size(1)
        raise ValueError(f"{name}: TE's norm kernels take a 2-D input, got {tuple(t.shape)}")


def _gamma(weight, zero_centered_gamma):
    g = weight.float()
    return g + 1 if zero_centered_gamma else g


def layernorm_fwd(
    input, weight, bias, eps, ln_out, quantizer, otype, sm_margin, zero_centered_gamma
):
    _check_2d("layernorm_fwd", input)
    assert ln_out is None and quantizer is None, "stand-in: unquantized, kernel-allocated output"
    calls.append(("layernorm_fwd", dict(otype=otype, sm_margin=sm_margin)))
    x = input.float()
    mu = x.mean(-1)
    rsigma = torch.rsqrt(x.var(-1, unbiased=False) + eps)
    y = (x - mu[:, None]) * rsigma[:, None] * _gamma(weight, zero_centered_gamma) + bias.float()
    return [y.to(_TORCH[otype]), mu, rsigma]


def rmsnorm_fwd(input, weight, eps, ln_out, quantizer, otype, sm_margin, zero_centered_gamma):
    _check_2d("rmsnorm_fwd", input)
    assert ln_out is None and quantizer is None, "stand-in: unquantized, kernel-allocated output"
    calls.append(("rmsnorm_fwd", dict(otype=otype, sm_margin=sm_margin)))
    x = input.float()
    rsigma = torch.rsqrt(x.square().mean(-1) + eps)
    y = x * rsigma[:, None] * _gamma(weight, zero_centered_gamma)
    return [y.to(_TORCH[otype]), None, rsigma]


def layernorm_bwd(dz, x, mu, rsigma, gamma, sm_margin, zero_centered_gamma):
    calls.append(("layernorm_bwd", dict(sm_margin=sm_margin)))
    dzf, xhat = dz.float(), (x.float() - mu[:, None]) * rsigma[:, None]
    dxhat = dzf * _gamma(gamma, zero_centered_gamma)
    dx = rsigma[:, None] * (
        dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True)
    )
    dgamma, dbeta = (dzf * xhat).sum(0), dzf.sum(0)
    return [dx.to(x.dtype), dgamma.to(gamma.dtype), dbeta.to(gamma.dtype)]


def rmsnorm_bwd(dz, x, rsigma, gamma, sm_margin, zero_centered_gamma):
    calls.append(("rmsnorm_bwd", dict(sm_margin=sm_margin)))
    dzf, xhat = dz.float(), x.float() * rsigma[:, None]
    dxhat = dzf * _gamma(gamma, zero_centered_gamma)
    dx = rsigma[:, None] * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return [dx.to(x.dtype), (dzf * xhat).sum(0).to(gamma.dtype)]


KERNELS = (
    SimpleNamespace(
        **{
            k: globals()[k]
            for k in ("layernorm_fwd", "rmsnorm_fwd", "layernorm_bwd", "rmsnorm_bwd")
        }
    ),
    TE_DType,
)
