"""megasparse: 2:4 and V:N:M sparse training for Megatron-core.

    from megasparse import SparsityConfig, SparseColumnParallelLinear, SparseRowParallelLinear

The layer classes import Megatron-core on first use, so `import megasparse` stays light.
"""

from megasparse.config import SparsityConfig

__version__ = "0.1.0"

_LAZY = {
    "SparseColumnParallelLinear": "megasparse.layers",
    "SparseRowParallelLinear": "megasparse.layers",
    "sparse_linear": "megasparse.ops",
    "weight_mask": "megasparse.ops",
    "SparseMLP": "megasparse.mlp",
    "SparseSequentialMLP": "megasparse.experts",
    "SparseGroupedMLP": "megasparse.experts",
    "SparseTEGroupedMLP": "megasparse.experts",
    "sparsify_spec": "megasparse.specs",
    "SparsitySchedule": "megasparse.schedule",
    "add_args": "megasparse.args",
    "Fp8SparseLinear": "megasparse.fp8",
    "weights_changed": "megasparse.interface",
}

__all__ = ["SparsityConfig", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megasparse' has no attribute {name!r}")
