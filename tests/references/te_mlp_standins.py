"""CPU stand-ins for the Transformer Engine linears of Megatron's TE MLP (TE needs CUDA).

`TERowParallelLinear` / `TELayerNormColumnParallelLinear` take the constructors of Megatron's
wrappers (megatron-core 0.16.1 and 0.19.2: megatron/core/extensions/transformer_engine.py) over the
TE stand-ins of te_standins (TE's Linear and LayerNormLinear), and return (out, bias) as the
wrappers do, so Megatron's MLP builds and calls them like the real ones (tensor and sequence
parallelism as TE sets them up from Megatron's config). Weights scaled like an initialized layer.
"""

import torch

from te_standins import LayerNormLinear, Linear


def _megatron_return(module, out):
    """Megatron's TE wrappers always return (out, bias): TE's tuple with te_return_bias, else (out, None)."""
    return out if module.te_return_bias else (out, None)


class TERowParallelLinear(Linear):
    """Megatron's TERowParallelLinear: its constructor, TE's Linear underneath (parallel_mode "row",
    Megatron's config: sequence parallelism, wgrad fusion, TP group and size), (out, bias) back."""

    def __init__(
        self,
        input_size,
        output_size,
        *,
        config,
        init_method,
        bias,
        input_is_parallel,
        skip_bias_add,
        is_expert,
        tp_comm_buffer_name=None,
        tp_group=None,
        name=None,
    ):
        te_return_bias = skip_bias_add and bias
        super().__init__(
            input_size,
            output_size,
            sequence_parallel=config.sequence_parallel,
            fuse_wgrad_accumulation=config.gradient_accumulation_fusion,
            tp_group=tp_group,
            tp_size=config.tensor_model_parallel_size,
            bias=bias,
            return_bias=te_return_bias,
            params_dtype=config.params_dtype,
            parallel_mode="row",
            ub_name=tp_comm_buffer_name,
        )
        self.te_return_bias, self.config = te_return_bias, config
        with torch.no_grad():
            self.weight.mul_(self.in_features**-0.5)

    def forward(self, x):
        return _megatron_return(self, super().forward(x, is_first_microbatch=None))


class TELayerNormColumnParallelLinear(LayerNormLinear):
    """Megatron's TELayerNormColumnParallelLinear: its constructor, TE's LayerNormLinear underneath
    (parallel_mode "column", the norm from Megatron's config), (out, bias) back."""

    def __init__(
        self,
        input_size,
        output_size,
        *,
        config,
        init_method,
        gather_output,
        bias,
        skip_bias_add,
        is_expert,
        skip_weight_param_allocation=False,
        tp_comm_buffer_name=None,
        tp_group=None,
        stride=1,
        name=None,
    ):
        te_return_bias = skip_bias_add and bias
        super().__init__(
            input_size,
            output_size,
            eps=config.layernorm_epsilon,
            sequence_parallel=config.sequence_parallel,
            fuse_wgrad_accumulation=config.gradient_accumulation_fusion,
            tp_group=tp_group,
            tp_size=config.tensor_model_parallel_size,
            bias=bias,
            normalization=config.normalization,
            return_bias=te_return_bias,
            params_dtype=config.params_dtype,
            parallel_mode="column",
            zero_centered_gamma=config.layernorm_zero_centered_gamma,
            ub_name=tp_comm_buffer_name,
        )
        self.te_return_bias, self.config = te_return_bias, config
        with torch.no_grad():
            self.weight.mul_(self.in_features**-0.5)

    def forward(self, x):
        return _megatron_return(self, super().forward(x, is_first_microbatch=None))
