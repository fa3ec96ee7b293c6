"""Backward of sparsify(relu(x)^2): dx = where(mask, 2 * relu(x) * grad, 0) in one pass.

x is the pre-activation the forward saw, mask its bool sparsity mask, grad the gradient of the
sparse values. The product is taken in float32 (float64 if x or grad is float64) and rounded
once to grad's dtype: for bf16/fp16 operands that is the exact product rounded, as torch's
bf16/fp16 multiply does. relu keeps NaN (as torch.relu), so a kept NaN input gives a NaN grad.
"""

import torch

from .common import HAVE_TRITON, compile_spec, require_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

# Launch: BLOCK elements per program, 16 per thread (128-bit loads of the mask and of fp32).
BLOCK = 2048
NUM_WARPS = 4


def _check(x: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor) -> None:
    if not (x.shape == mask.shape == grad.shape) or mask.dtype != torch.bool:
        raise ValueError(
            "megasparse: squared_relu_sparsify_backward needs x, a bool mask and grad of one shape, got "
            f"{tuple(x.shape)}, {tuple(mask.shape)} {mask.dtype}, {tuple(grad.shape)}"
        )


def _compute_dtype(x: torch.Tensor, grad: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (x.dtype, grad.dtype) else torch.float32


def squared_relu_sparsify_backward_reference(
    x: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    """Pure-torch reference: dx (grad's dtype and shape) of values = relu(x)^2 * mask."""
    _check(x, mask, grad)
    dtype = _compute_dtype(x, grad)
    dx = 2 * torch.relu(x.to(dtype)) * grad.to(dtype)
    return torch.where(mask, dx, 0).to(grad.dtype)


if HAVE_TRITON:

    @triton.jit
    def _squared_relu_backward_kernel(
        x_ptr, mask_ptr, grad_ptr, dx_ptr, numel, BLOCK: tl.constexpr, FP64: tl.constexpr
    ):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offsets < numel
        keep = tl.load(mask_ptr + offsets, mask=valid, other=0) != 0
        x = tl.load(x_ptr + offsets, mask=valid, other=0.0)
        grad = tl.load(grad_ptr + offsets, mask=valid, other=0.0)
        dtype = tl.float64 if FP64 else tl.float32
        x = x.to(dtype)
        relu = tl.where(x < 0.0, 0.0, x)  # keeps NaN, as torch.relu
        dx = tl.where(keep, 2.0 * relu * grad.to(dtype), 0.0)
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=valid)


def squared_relu_sparsify_backward_triton(
    x: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    """Triton kernel (GPU, or CPU under TRITON_INTERPRET=1); same result as the reference."""
    require_triton()
    _check(x, mask, grad)
    x, mask, grad = x.contiguous(), mask.contiguous(), grad.contiguous()
    dx = torch.empty_like(grad)
    if x.numel():
        _squared_relu_backward_kernel[(triton.cdiv(x.numel(), BLOCK),)](
            x,
            mask.view(torch.int8),
            grad,
            dx,
            x.numel(),
            BLOCK=BLOCK,
            FP64=_compute_dtype(x, grad) == torch.float64,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
    return dx


def compile_specs(dtype: torch.dtype) -> list:
    """The launch above (x and grad in `dtype`), described for the offline compile report."""
    arguments = "x_ptr:*T/16 mask_ptr:*i8/16 grad_ptr:*T/16 dx_ptr:*T/16 numel:i32/16"
    spec = compile_spec(
        "squared_relu_sparsify_backward", _squared_relu_backward_kernel, dtype, arguments,
        {"BLOCK": BLOCK, "FP64": False}, BLOCK, NUM_WARPS, reads=("x_ptr", "mask_ptr", "grad_ptr"),
    )  # fmt: skip
    return [spec]
