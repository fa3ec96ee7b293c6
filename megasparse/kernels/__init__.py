"""megasparse.kernels: Triton kernels, each beside its pure-torch reference. Knows nothing of Megatron."""

from . import activation_2_4 as _activation_2_4
from . import activation_compact as _activation_compact
from . import activation_sparsify as _activation_sparsify
from . import compact as _compact
from . import fp8_cast as _fp8_cast
from . import gather_matmul as _gather_matmul
from . import mask_1d as _mask_1d
from . import mask_transposable as _mask_transposable
from . import squared_relu_backward as _squared_relu_backward
from .activation_compact import (
    activation_compact_reference,
    activation_compact_triton,
    compact_tokens_reference,
    compact_tokens_triton,
)
from .activation_sparsify import activation_sparsify_reference, activation_sparsify_triton
from .common import HAVE_TRITON, magnitude
from .compact import (
    compact,
    compact_matmul_reference,
    compact_triton,
    gather_k_matmul_reference,
    scatter,
    scatter_triton,
)
from .dispatch import pick
from .fp8_cast import amax_reference, fp8_cast_reference, fp8_cast_triton
from .gather_matmul import SUPPORTED_V as GATHER_MATMUL_V
from .gather_matmul import compact_matmul_triton, gather_k_matmul_triton
from .mask_1d import mask_1d_reference, mask_1d_triton
from .mask_transposable import (
    N_PATTERNS,
    PATTERNS,
    mask_transposable_greedy,
    mask_transposable_reference,
    mask_transposable_triton,
)
from .squared_relu_backward import (
    squared_relu_compact_backward_reference,
    squared_relu_compact_backward_triton,
    squared_relu_sparsify_backward_reference,
    squared_relu_sparsify_backward_triton,
)


def compile_specs(dtype):
    """Every kernel launch at `dtype`, described for the offline compile report."""
    modules = (
        _mask_1d,
        _mask_transposable,
        _activation_2_4,
        _activation_sparsify,
        _activation_compact,
        _compact,
        _squared_relu_backward,
        _fp8_cast,
        _gather_matmul,
    )
    return [spec for module in modules for spec in module.compile_specs(dtype)]


__all__ = [
    "HAVE_TRITON",
    "compile_specs",
    "pick",
    "magnitude",
    "mask_1d_reference",
    "mask_1d_triton",
    "mask_transposable_reference",
    "mask_transposable_triton",
    "mask_transposable_greedy",
    "PATTERNS",
    "N_PATTERNS",
    "activation_sparsify_reference",
    "activation_sparsify_triton",
    "activation_compact_reference",
    "activation_compact_triton",
    "compact_tokens_reference",
    "compact_tokens_triton",
    "compact",
    "compact_triton",
    "scatter",
    "scatter_triton",
    "gather_k_matmul_reference",
    "compact_matmul_reference",
    "GATHER_MATMUL_V",
    "gather_k_matmul_triton",
    "compact_matmul_triton",
    "squared_relu_sparsify_backward_reference",
    "squared_relu_sparsify_backward_triton",
    "squared_relu_compact_backward_reference",
    "squared_relu_compact_backward_triton",
    "amax_reference",
    "fp8_cast_reference",
    "fp8_cast_triton",
]
