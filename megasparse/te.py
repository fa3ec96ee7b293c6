"""Sparse Transformer Engine linears: under any FP8 recipe, TE quantizes the 2:4-masked weight.

TE's Linear, LayerNormLinear and GroupedLinear take their weights from `_get_weight_tensors()`;
the sparse classes return W*M there (through `masked_weight`, so the dense master weight gets the
gradient of the chosen mode). Everything else - the FP8 recipe (delayed, current/tensorwise,
blockwise, MXFP8), amax bookkeeping, communication, checkpoints - stays TE's and Megatron's.

    SparseTEColumnParallelLinear, SparseTERowParallelLinear, SparseTELayerNormColumnParallelLinear
are built on first access from Megatron's TE classes (Transformer Engine must be installed);
`sparse_te_class(base)` makes the sparse variant of any such class. Not supported (clear errors):
gradient_accumulation_fusion (TE would write the unmasked gradient straight into main_grad) and
FP8 primary weights (fp8_model_init). The GEMM is TE's dense (FP8 or bf16) GEMM on the masked
weight: the speed-up path is megasparse.fp8 / the cuSPARSELt backends.
"""

import dataclasses
import functools

from megasparse.config import SparsityConfig
from megasparse.ops import masked_weight, weight_mask

_TE_BASES = {
    "SparseTEColumnParallelLinear": "TEColumnParallelLinear",
    "SparseTERowParallelLinear": "TERowParallelLinear",
    "SparseTELayerNormColumnParallelLinear": "TELayerNormColumnParallelLinear",
}


class _SparseTEMixin:
    def _setup_sparse_te(self, sparsity):
        if sparsity is not None and not isinstance(sparsity, SparsityConfig):
            raise TypeError(f"sparsity must be a megasparse.SparsityConfig, got {type(sparsity).__name__}")
        self.sparsity = dataclasses.replace(sparsity) if sparsity is not None else SparsityConfig()
        if self.sparsity.activations is not None:
            raise ValueError("megasparse: activation sparsity is not available in TE linears; use activations=None")
        if self.sparsity.mask_refresh_interval != 1:
            raise ValueError("megasparse: sparse TE linears recompute masks every step; use mask_refresh_interval=1")
        if getattr(getattr(self, "config", None), "gradient_accumulation_fusion", False):
            raise NotImplementedError(
                "megasparse: sparse TE linears do not support gradient_accumulation_fusion (TE would accumulate the "
                "unmasked weight gradient into main_grad); disable it (--no-gradient-accumulation-fusion)")
        weight = getattr(self, "weight", None)
        if weight is not None and self.sparsity.weights is not None:
            rows, cols = weight.shape
            if cols % 4 or (self.sparsity.mask == "transposable" and rows % 4):
                raise ValueError(f"megasparse: a sparse TE linear needs its weight shard {tuple(weight.shape)} cut into "
                                 "2:4 groups: input size per rank a multiple of 4 (and output size for transposable)")

    def _get_weight_tensors(self):
        weights = super()._get_weight_tensors()
        if not self.sparsity.prunes_weights:
            return weights
        s = self.sparsity
        sparse = []
        for w in weights:
            if type(w).__name__ != "Parameter" and hasattr(w, "dequantize"):
                raise NotImplementedError("megasparse: FP8 primary weights (fp8_model_init) cannot be pruned; "
                                          "keep high-precision master weights for sparse TE linears")
            sparse.append(masked_weight(w, weight_mask(w, s.mask, s.nonfinite_weights), s.gradient, s.srste_decay))
        return sparse

    def sparsity_mask(self, weight=None):
        weight = self.weight if weight is None else weight
        if not self.sparsity.prunes_weights:
            return weight.detach().new_ones(weight.shape, dtype=bool)
        return weight_mask(weight, self.sparsity.mask, self.sparsity.nonfinite_weights)


@functools.lru_cache(maxsize=None)
def sparse_te_class(base: type) -> type:
    """The sparse variant of a TE linear class (same constructor plus `sparsity=`)."""

    def __init__(self, *args, sparsity=None, **kwargs):
        base.__init__(self, *args, **kwargs)
        self._setup_sparse_te(sparsity)

    name = "Sparse" + base.__name__
    return type(name, (_SparseTEMixin, base), {"__init__": __init__, "__module__": __name__, "__qualname__": name})


def __getattr__(name):
    if name in _TE_BASES:
        from megatron.core.extensions import transformer_engine as mcore_te

        base = getattr(mcore_te, _TE_BASES[name], None) if getattr(mcore_te, "HAVE_TE", False) else None
        if not isinstance(base, type):
            raise ImportError(f"megasparse.{name} needs Transformer Engine (pip install megasparse[te])")
        return sparse_te_class(base)
    raise AttributeError(f"module 'megasparse.te' has no attribute {name!r}")
