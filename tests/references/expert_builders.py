"""Sparse and dense MoE experts at EP=1 for the tests: Megatron's SequentialMLP-family built with
squared-ReLU, bias-free, 4 experts with uneven token counts, and a CPU stand-in for TE's GroupedLinear."""

import torch
from megatron.core.activations import squared_relu
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_helpers import make_config
from reference import sparse_mlp_reference

HIDDEN, FFN, EXPERTS = 16, 32, 4
TOKENS_PER_EXPERT = [5, 0, 7, 3]  # an expert with no tokens, counts not aligned to anything


def expert_pg():
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


def expert_config(dtype=torch.float64, **kw):
    kw.setdefault("activation_func", squared_relu)
    # Megatron's own SequentialMLP cannot add an expert bias at EP=ETP=1 (in-place add on a view),
    # so experts here are bias-free, as in Megatron's MoE configs; the grouped path is tested with bias too.
    kw.setdefault("add_bias_linear", False)
    return make_config(
        dtype=dtype,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        moe_ffn_hidden_size=FFN,
        num_moe_experts=EXPERTS,
        **kw,
    )


def make_experts(cls, sparsity, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    extra = {} if cls is SequentialMLP else {"sparsity": sparsity}
    return cls(EXPERTS, expert_config(dtype, **kw), submodules, pg_collection=expert_pg(), **extra)


def make_expert_inputs(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = sum(TOKENS_PER_EXPERT)
    x = torch.randn(n, HIDDEN, generator=g, dtype=torch.float64) - 0.2
    probs = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    return x.to(dtype), probs.to(dtype), torch.tensor(TOKENS_PER_EXPERT)


class TorchGroupedLinear(torch.nn.Module):
    """A stand-in for TE's GroupedLinear at expert-TP 1 (TE does not install without CUDA): same parameter
    names (weight{i}, bias{i}) and forward(x, m_splits) -> (output, bias or None)."""

    def __init__(
        self, num_gemms, input_size, output_size, *, config, init_method, bias, skip_bias_add, **_
    ):
        super().__init__()
        self.num_gemms, self.skip_bias_add = num_gemms, skip_bias_add
        for i in range(num_gemms):
            w = torch.empty(output_size, input_size, dtype=config.params_dtype)
            init_method(w)
            self.register_parameter(f"weight{i}", torch.nn.Parameter(w))
            if bias:
                self.register_parameter(
                    f"bias{i}",
                    torch.nn.Parameter(torch.zeros(output_size, dtype=config.params_dtype)),
                )

    def _get_weight_tensors(self):  # TE >= 2.5
        return [getattr(self, f"weight{i}") for i in range(self.num_gemms)]

    def forward(self, x, m_splits):
        outs = []
        for i, xe in enumerate(torch.split(x, list(m_splits))):
            b = getattr(self, f"bias{i}", None)
            outs.append(
                torch.nn.functional.linear(
                    xe, getattr(self, f"weight{i}"), None if self.skip_bias_add else b
                )
            )
        biases = (
            [getattr(self, f"bias{i}") for i in range(self.num_gemms)]
            if self.skip_bias_add and hasattr(self, "bias0")
            else None
        )
        return torch.cat(outs), biases


def make_te_experts(cls, sparsity, dtype, seed=0):
    from megatron.core.transformer.moe import experts as mcore_experts
    from megatron.core.transformer.moe.experts import TEGroupedMLP

    submodules_cls = getattr(mcore_experts, "GroupedMLPSubmodules", MLPSubmodules)
    torch.manual_seed(seed)
    extra = {} if cls is TEGroupedMLP else {"sparsity": sparsity}
    submodules = submodules_cls(linear_fc1=TorchGroupedLinear, linear_fc2=TorchGroupedLinear)
    return cls(EXPERTS, expert_config(dtype), submodules, pg_collection=expert_pg(), **extra)


def run_experts_per_expert(experts, x, tokens, probs):
    """Forward + backward of `experts` with a seeded dY; returns (y, bias, dy, input gradient) and,
    per expert, (index, its rows, fc1, fc2), for checking each expert on its own tokens."""
    xr = x.clone().requires_grad_(True)
    y, bias = experts(xr, tokens, probs)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y.backward(dy.to(y.dtype))
    per_expert, start = [], 0
    for e, n in enumerate(TOKENS_PER_EXPERT):
        expert = experts.local_experts[e]
        per_expert.append((e, slice(start, start + n), expert.linear_fc1, expert.linear_fc2))
        start += n
    return (y, bias, dy, xr.grad), per_expert


def check_experts_against_reference(experts, x, probs, tokens, pattern, tol):
    """Forward + backward of `experts` (squared-ReLU, `pattern` its activation sparsity or None):
    each expert's outputs, input gradient and parameter gradients against the float64 masked
    dense MLP of that expert's rows (reference.sparse_mlp_reference)."""
    (y, bias, dy, dx), per_expert = run_experts_per_expert(experts, x, tokens, probs)
    assert bias is None
    for e, rows, fc1, fc2 in per_expert:
        ref = sparse_mlp_reference(
            x[rows],
            fc1.weight,
            fc1.bias,
            fc2.weight,
            fc2.bias,
            fc1.sparsity_mask(),
            fc2.sparsity_mask(),
            pattern,
            "squared_relu",
            grad_output=dy[rows],
            probs=probs[rows],
        )
        close = dict(rtol=tol, atol=tol)
        torch.testing.assert_close(y[rows].double(), ref["y"], **close, msg=f"expert {e} output")
        torch.testing.assert_close(
            dx[rows].double(), ref["dx"], **close, msg=f"expert {e} input grad"
        )
        for name, p in (
            ("dw1", fc1.weight),
            ("db1", fc1.bias),
            ("dw2", fc2.weight),
            ("db2", fc2.bias),
        ):
            if p is None:
                continue
            assert p.grad is not None, f"expert {e} {name}: every expert parameter gets a gradient"
            torch.testing.assert_close(
                p.grad.double(), ref[name], **close, msg=f"expert {e} {name}"
            )


class PerExpertView:
    """Present a TE-style experts module as local_experts[e].linear_fc{1,2} for the shared reference check."""

    def __init__(self, te_experts, masks_kind="1d"):
        from megasparse.core.masks import weight_mask

        class Layer:
            def __init__(self, weight, sparse):
                self.weight, self.bias = weight, None
                self._mask = (
                    weight_mask(weight, masks_kind)
                    if sparse
                    else torch.ones_like(weight, dtype=torch.bool)
                )

            def sparsity_mask(self):
                return self._mask

        class Expert:
            pass

        self.module = te_experts
        self.local_experts = []
        for e in range(EXPERTS):
            expert = Expert()
            expert.linear_fc1 = Layer(
                getattr(te_experts.linear_fc1, f"weight{e}"), te_experts.sparsity.prunes_weights
            )
            expert.linear_fc2 = Layer(
                getattr(te_experts.linear_fc2, f"weight{e}"), te_experts.sparsity.prunes_weights
            )
            self.local_experts.append(expert)

    def __call__(self, *args):
        return self.module(*args)
