"""megasparse: 2:4 and V:N:M sparse training for Megatron-core.

    from megasparse import SparsityConfig, SparseColumnParallelLinear, SparseRowParallelLinear

The layer classes import Megatron-core on first use, so `import megasparse` stays light.
"""

from megasparse.config import SparsityConfig

__version__ = "0.1.0"

_LAZY = {
    "SparseColumnParallelLinear": "megasparse.megatron.layers",
    "SparseRowParallelLinear": "megasparse.megatron.layers",
    "sparse_linear": "megasparse.core.linear_op",
    "weight_mask": "megasparse.core.masks",
    "SparseMLP": "megasparse.megatron.mlp",
    "SparseSequentialMLP": "megasparse.megatron.experts",
    "SparseGroupedMLP": "megasparse.megatron.experts",
    "SparseTEGroupedMLP": "megasparse.te.experts",
    # built from Megatron's TE classes on first access (Transformer Engine >= 2.5 needed)
    "SparseTEColumnParallelLinear": "megasparse.te.linear",
    "SparseTERowParallelLinear": "megasparse.te.linear",
    "SparseTELayerNormColumnParallelLinear": "megasparse.te.linear",
    "sparsify_spec": "megasparse.specs",
    "SparsitySchedule": "megasparse.megatron.schedule",
    "add_args": "megasparse.megatron.args",
    "Fp8SparseLinear": "megasparse.fp8.layer",
    "weights_changed": "megasparse.interface",
    "stats": "megasparse.statistics",
}

__all__ = ["SparsityConfig", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megasparse' has no attribute {name!r}")
