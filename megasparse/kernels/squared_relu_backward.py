"""Backward of sparsify(relu(x)^2): dx = where(mask, 2 * relu(x) * grad, 0) in one pass.

x is the pre-activation the forward saw, mask its bool sparsity mask, grad the gradient of the
sparse values. The compact form (squared_relu_compact_backward) has no mask: its preact_c holds 0
where the pattern dropped, so it keeps where preact_c != 0. The product is taken in float32
(float64 if x or grad is float64) and rounded once to grad's dtype: for bf16/fp16 operands that is
the exact product rounded, as torch's bf16/fp16 multiply does. relu keeps NaN (as torch.relu), so
a kept NaN input gives a NaN grad.
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


def _check_compact(preact_c: torch.Tensor, grad_c: torch.Tensor) -> None:
    if preact_c.shape != grad_c.shape:
        raise ValueError(
            "megasparse: squared_relu_compact_backward needs preact_c and grad_c of one shape (the "
            f"same compact layout), got {tuple(preact_c.shape)} and {tuple(grad_c.shape)}"
        )


def squared_relu_sparsify_backward_reference(
    x: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    """Pure-torch reference: dx (grad's dtype and shape) of values = relu(x)^2 * mask."""
    _check(x, mask, grad)
    dtype = _compute_dtype(x, grad)
    dx = 2 * torch.relu(x.to(dtype)) * grad.to(dtype)
    return torch.where(mask, dx, 0).to(grad.dtype)


def squared_relu_compact_backward_reference(
    preact_c: torch.Tensor, grad_c: torch.Tensor
) -> torch.Tensor:
    """Pure-torch reference: dH_c (grad_c's dtype) = where(preact_c != 0, 2 relu(preact_c) grad_c, 0)."""
    _check_compact(preact_c, grad_c)
    dtype = _compute_dtype(preact_c, grad_c)
    preact = preact_c.to(dtype)
    dh = 2 * torch.relu(preact) * grad_c.to(dtype)
    return torch.where(preact != 0, dh, 0).to(grad_c.dtype)


if HAVE_TRITON:

    @triton.jit
    def _grad_where(keep, x, grad, FP64: tl.constexpr):
        """where(keep, 2 relu(x) grad, 0) in float32 (float64), the reference's order of operations."""
        dtype = tl.float64 if FP64 else tl.float32
        x = x.to(dtype)
        relu = tl.where(x < 0.0, 0.0, x)  # keeps NaN, as torch.relu
        return tl.where(keep, 2.0 * relu * grad.to(dtype), 0.0)

    @triton.jit
    def _squared_relu_backward_kernel(
        x_ptr, mask_ptr, grad_ptr, dx_ptr, numel, BLOCK: tl.constexpr, FP64: tl.constexpr
    ):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offsets < numel
        keep = tl.load(mask_ptr + offsets, mask=valid, other=0) != 0
        x = tl.load(x_ptr + offsets, mask=valid, other=0.0)
        grad = tl.load(grad_ptr + offsets, mask=valid, other=0.0)
        dx = _grad_where(keep, x, grad, FP64)
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def _squared_relu_compact_backward_kernel(
        preact_ptr, grad_ptr, dh_ptr, numel, BLOCK: tl.constexpr, FP64: tl.constexpr
    ):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offsets < numel
        preact = tl.load(preact_ptr + offsets, mask=valid, other=0.0)
        grad = tl.load(grad_ptr + offsets, mask=valid, other=0.0)
        # compared after the exact widening (the CPU interpreter compares bf16 as raw bits, -0.0 too)
        preact = preact.to(tl.float64 if FP64 else tl.float32)
        dh = _grad_where(preact != 0.0, preact, grad, FP64)  # NaN != 0: a NaN stays NaN
        tl.store(dh_ptr + offsets, dh.to(dh_ptr.dtype.element_ty), mask=valid)


def _run(kernel, x: torch.Tensor, grad: torch.Tensor, *operands) -> torch.Tensor:
    """dx (grad's dtype and shape) by one pass of `kernel` over the flat, contiguous `operands`."""
    dx = torch.empty_like(grad)
    if grad.numel():
        kernel[(triton.cdiv(grad.numel(), BLOCK),)](
            *operands,
            dx,
            grad.numel(),
            BLOCK=BLOCK,
            FP64=_compute_dtype(x, grad) == torch.float64,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
    return dx


def squared_relu_sparsify_backward_triton(
    x: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    """Triton kernel (GPU, or CPU under TRITON_INTERPRET=1); same result as the reference."""
    require_triton()
    _check(x, mask, grad)
    x, mask, grad = x.contiguous(), mask.contiguous(), grad.contiguous()
    return _run(_squared_relu_backward_kernel, x, grad, x, mask.view(torch.int8), grad)


def squared_relu_compact_backward_triton(
    preact_c: torch.Tensor, grad_c: torch.Tensor
) -> torch.Tensor:
    """Triton kernel (GPU, or CPU under TRITON_INTERPRET=1): the reference's dH_c in one pass
    (reads preact_c and grad_c once, writes dH_c once), bit for bit."""
    require_triton()
    _check_compact(preact_c, grad_c)
    preact_c, grad_c = preact_c.contiguous(), grad_c.contiguous()
    return _run(_squared_relu_compact_backward_kernel, preact_c, grad_c, preact_c, grad_c)


def compile_specs(dtype: torch.dtype) -> list:
    """Both launches above (inputs in `dtype`), described for the offline compile report."""
    arguments = "x_ptr:*T/16 mask_ptr:*i8/16 grad_ptr:*T/16 dx_ptr:*T/16 numel:i32/16"
    spec = compile_spec(
        "squared_relu_sparsify_backward", _squared_relu_backward_kernel, dtype, arguments,
        {"BLOCK": BLOCK, "FP64": False}, BLOCK, NUM_WARPS, reads=("x_ptr", "mask_ptr", "grad_ptr"),
    )  # fmt: skip
    compact_spec = compile_spec(
        "squared_relu_compact_backward", _squared_relu_compact_backward_kernel, dtype,
        "preact_ptr:*T/16 grad_ptr:*T/16 dh_ptr:*T/16 numel:i32/16", {"BLOCK": BLOCK, "FP64": False},
        BLOCK, NUM_WARPS, reads=("preact_ptr", "grad_ptr"),
    )  # fmt: skip
    return [spec, compact_spec]
