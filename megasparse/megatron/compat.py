"""The few places where supported megatron-core versions differ in how modules are specified."""

import dataclasses
import functools

from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec

# megatron-core 0.16 builds an MLP's linears with build_module (a class or a ModuleSpec);
# 0.19 calls them as builders (a class or a functools.partial). MLP.as_mlp_submodule marks 0.19.
LINEARS_ARE_BUILDERS = hasattr(MLP, "as_mlp_submodule")


def linear_entry(cls, sparsity):
    """`cls` with `sparsity=` bound, in the form this megatron-core's MLP accepts for fc1/fc2 (and qkv/proj)."""
    if LINEARS_ARE_BUILDERS:
        return functools.partial(cls, sparsity=sparsity)
    return ModuleSpec(module=cls, params={"sparsity": sparsity})


def with_sparse_linears(submodules, sparsity):
    """MLPSubmodules whose fc1 / fc2 are megasparse's sparse linears with `sparsity`."""
    from megasparse.megatron.layers import SparseColumnParallelLinear, SparseRowParallelLinear

    return dataclasses.replace(
        submodules,
        linear_fc1=linear_entry(SparseColumnParallelLinear, sparsity),
        linear_fc2=linear_entry(SparseRowParallelLinear, sparsity),
    )
