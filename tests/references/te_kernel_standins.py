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


class Float8TensorStandIn:
    """TE's Float8 storage class (Float8TensorBase through 2.8, Float8TensorStorage from 2.9):
    keyword-only data, fp8_scale_inv, fp8_dtype, data_transpose, quantizer."""

    def __init__(self, *, data, fp8_scale_inv, fp8_dtype, data_transpose=None, quantizer=None):
        if data is None and data_transpose is None:
            raise ValueError("No data found for FP8 Tensor.")  # TE's NVTE_CHECK
        self._data, self._scale_inv, self._fp8_dtype = data, fp8_scale_inv, fp8_dtype
        self._transpose, self._quantizer = data_transpose, quantizer
        self._transpose_invalid = data_transpose is None


def _columnwise(t):
    """What TE's cuBLAS call reads of an FP8 operand in the "NT" layout on Hopper (TN only, so
    both operands switch to their column-wise data: cublaslt_gemm.cu CanonicalizeGemmInput):
    the transpose [features, tokens], dequantized with its scale_inv."""
    assert not t._transpose_invalid, "the wgrad needs column-wise FP8 data"
    assert t._scale_inv.shape == (1,) and t._scale_inv.dtype == torch.float32
    assert _TORCH[t._fp8_dtype] == t._transpose.dtype
    return t._transpose.float() * t._scale_inv


def general_gemm(
    A,
    B,
    out_dtype=None,
    quantization_params=None,
    gelu=False,
    gelu_in=None,
    alpha=1.0,
    beta=None,
    accumulate=False,
    layout="TN",
    out=None,
    bias=None,
    use_split_accumulator=False,
    grad=False,
    ub=None,
    ub_type=None,
    extra_output=None,
    bulk_overlap=False,
):
    """TE 2.10+ general_gemm on column-wise FP8 operands with the "NT" layout (TE's wgrad):
    out (+)= B^T A in fp32, written into `out` in place; returns (out, None, None, None)."""
    assert layout == "NT" and quantization_params is None and bias is None and ub is None
    calls.append(
        (
            "general_gemm",
            dict(out=out, accumulate=accumulate, layout=layout, out_dtype=out_dtype, grad=grad),
        )
    )
    a, b = _columnwise(A), _columnwise(B)  # [in, tokens], [out, tokens]
    assert a.shape[1] == b.shape[1], "operands padded to different token counts"
    assert out is not None and out.dtype == out_dtype == torch.float32
    out.addmm_(b, a.t(), beta=1.0 if accumulate else 0.0)  # in place: no [out, in] temporary
    return out, None, None, None


def general_gemm_v2_5(
    A,
    B,
    workspace,
    out_dtype=None,
    quantization_params=None,
    gelu=False,
    gelu_in=None,
    accumulate=False,
    layout="TN",
    out=None,
    bias=None,
    use_split_accumulator=False,
    grad=False,
    ub=None,
    ub_type=None,
    extra_output=None,
    bulk_overlap=False,
):
    """TE 2.5-2.9 general_gemm (a cuBLAS workspace third, no alpha / beta)."""
    assert isinstance(workspace, torch.Tensor)
    return general_gemm(
        A,
        B,
        out_dtype,
        quantization_params,
        gelu,
        gelu_in,
        accumulate=accumulate,
        layout=layout,
        out=out,
        bias=bias,
        use_split_accumulator=use_split_accumulator,
        grad=grad,
        ub=ub,
        ub_type=ub_type,
        extra_output=extra_output,
        bulk_overlap=bulk_overlap,
    )


# what megasparse's resolvers return: norm.te_norm_kernels, fp8_route.te_wgrad_kernels (TE 2.10+ /
# TE 2.5-2.9)
NORM_KERNELS = (
    SimpleNamespace(
        layernorm_fwd=layernorm_fwd,
        rmsnorm_fwd=rmsnorm_fwd,
        layernorm_bwd=layernorm_bwd,
        rmsnorm_bwd=rmsnorm_bwd,
    ),
    TE_DType,
)
WGRAD_KERNELS = (general_gemm, Float8TensorStandIn, TE_DType, None)
WGRAD_KERNELS_V2_5 = (
    general_gemm_v2_5,
    Float8TensorStandIn,
    TE_DType,
    torch.empty(4, dtype=torch.uint8),
)
