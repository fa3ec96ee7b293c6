"""Build Megatron configs and (sparse or dense) parallel linears the same way in every test."""

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig

from megasparse import SparseColumnParallelLinear, SparseRowParallelLinear


def make_config(tp=1, sequence_parallel=False, dtype=torch.float64, **overrides):
    settings = dict(num_layers=1, hidden_size=16, num_attention_heads=max(tp, 1))
    settings.update(overrides)
    return TransformerConfig(
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=True,
        params_dtype=dtype,
        **settings,
    )


def make_column(config, in_size, out_size, sparsity=None, dense=False, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("bias", True)
    kw.setdefault("gather_output", False)
    cls = ColumnParallelLinear if dense else SparseColumnParallelLinear
    extra = {} if dense else {"sparsity": sparsity}
    return cls(in_size, out_size, config=config, init_method=torch.nn.init.normal_, **kw, **extra)


def make_row(config, in_size, out_size, sparsity=None, dense=False, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("bias", True)
    kw.setdefault("input_is_parallel", True)
    kw.setdefault("skip_bias_add", False)
    cls = RowParallelLinear if dense else SparseRowParallelLinear
    extra = {} if dense else {"sparsity": sparsity}
    return cls(in_size, out_size, config=config, init_method=torch.nn.init.normal_, **kw, **extra)


def make_mlp(config, ffn, fc1_sparsity=None, fc2_sparsity=None, mlp_cls=None, seed=0):
    """An MLP (SparseMLP by default) with sparse fc1/fc2 built the way Megatron builds them."""
    from megatron.core.transformer.mlp import MLPSubmodules

    from megasparse import SparseMLP
    from megasparse.megatron.compat import linear_entry

    torch.manual_seed(seed)
    submodules = MLPSubmodules(
        linear_fc1=linear_entry(SparseColumnParallelLinear, fc1_sparsity),
        linear_fc2=linear_entry(SparseRowParallelLinear, fc2_sparsity),
    )
    return (mlp_cls or SparseMLP)(config, submodules, ffn_hidden_size=ffn)


def full_mlp_tensors(seq, batch, hidden, ffn, seed=1234):
    """Float64 full (unsharded) MLP weights, an input [seq, batch, hidden] and an output gradient."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return {
        "w1": r(ffn, hidden),
        "b1": r(ffn),
        "w2": r(hidden, ffn),
        "b2": r(hidden),
        "x": r(seq, batch, hidden),
        "dy": r(seq, batch, hidden),
    }


def load_mlp_shards(fc1, fc2, t, cols=slice(None)):
    """This rank's slices of full_mlp_tensors: fc1 rows (column-parallel), fc2 columns (row-parallel)."""
    with torch.no_grad():
        fc1.weight.copy_(t["w1"][cols]), fc1.bias.copy_(t["b1"][cols])
        fc2.weight.copy_(t["w2"][:, cols]), fc2.bias.copy_(t["b2"])
