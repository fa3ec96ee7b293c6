"""Where Triton kernels run in tests: the GPU when there is one, else the CPU under TRITON_INTERPRET=1."""

import functools

import torch

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on_triton_device(kernel):
    """Wrap a kernel so CPU test tensors go to the Triton device and results come back to the CPU."""

    def to(value, device):
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, tuple):
            return tuple(to(v, device) for v in value)
        return value

    @functools.wraps(kernel)
    def run(*args, **kwargs):
        return to(kernel(*(to(a, TRITON_DEVICE) for a in args), **kwargs), "cpu")

    return run
