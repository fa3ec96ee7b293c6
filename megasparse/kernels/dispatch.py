"""Which implementation of a kernel runs on a tensor: the Triton kernel or its torch reference."""

from .common import HAVE_TRITON


def pick(triton_kernel, reference, tensor):
    """`triton_kernel` for a CUDA tensor when Triton is installed, else the torch `reference`
    (CPU tensors, and CUDA without Triton)."""
    return triton_kernel if tensor.is_cuda and HAVE_TRITON else reference
