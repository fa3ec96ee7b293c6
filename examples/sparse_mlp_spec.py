"""Put the sparse linears into a Megatron MLP spec, the way you would in your own layer spec.

    python examples/sparse_mlp_spec.py

megatron-core 0.16 builds linears from `ModuleSpec(module=..., params=...)`; 0.19 calls a
builder, so there you pass `functools.partial(cls, sparsity=...)`. Runs on CPU (one gloo process).
"""

import functools

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megasparse import SparseColumnParallelLinear, SparseRowParallelLinear, SparsityConfig
from megasparse.megatron.compat import LINEARS_ARE_BUILDERS
from megasparse.testing import free_port, init_megatron, shutdown_megatron


def sparse_mlp_spec(sparsity: SparsityConfig, builder_form: bool):
    if builder_form:  # megatron-core 0.19: MLP submodules are builders
        fc1 = functools.partial(SparseColumnParallelLinear, sparsity=sparsity)
        fc2 = functools.partial(SparseRowParallelLinear, sparsity=sparsity)
        return functools.partial(MLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2))
    fc1 = ModuleSpec(module=SparseColumnParallelLinear, params={"sparsity": sparsity})
    fc2 = ModuleSpec(module=SparseRowParallelLinear, params={"sparsity": sparsity})
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2))


def main():
    import megatron.core

    init_megatron(0, 1, free_port(), tensor_model_parallel_size=1)
    try:
        config = TransformerConfig(
            num_layers=1,
            hidden_size=256,
            num_attention_heads=4,
            ffn_hidden_size=1024,
            use_cpu_initialization=True,
        )
        builder_form = LINEARS_ARE_BUILDERS  # True on megatron-core 0.19
        spec = sparse_mlp_spec(SparsityConfig(mask="transposable", gradient="ste"), builder_form)
        mlp = spec(config=config) if builder_form else build_module(spec, config=config)
        x = torch.randn(32, 4, 256, requires_grad=True)  # [sequence, batch, hidden]
        y, _ = mlp(x)
        y.square().mean().backward()
        for name in ("linear_fc1", "linear_fc2"):
            layer = getattr(mlp, name)
            print(
                f"{name}: {type(layer).__name__} weight {tuple(layer.weight.shape)}, "
                f"mask density {layer.sparsity_mask().float().mean():.2f}, grad norm {layer.weight.grad.norm():.3f}"
            )
        print(f"megatron-core {megatron.core.__version__}: output {tuple(y.shape)}")
    finally:
        shutdown_megatron()


if __name__ == "__main__":
    main()
