"""CPU stand-ins for the Transformer Engine linears of Megatron's TE MLP (TE needs CUDA).

`TERowParallelLinear` / `TELayerNormColumnParallelLinear` take the constructors of Megatron's
wrappers (megatron-core 0.16.1 and 0.19.2: megatron/core/extensions/transformer_engine.py) over the
TE stand-ins of te_standins (TE's Linear and LayerNormLinear), and return (out, bias) as the
wrappers do, so Megatron's MLP builds and calls them like the real ones (tensor and sequence
parallelism as TE sets them up from Megatron's config). Weights scaled like an initialized layer.
"""

import torch

from te_standins import LayerNormLinear, Linear


class _MegatronTEWrapper:
    """What Megatron's TE wrappers share: TE's keywords from Megatron's config, te_return_bias, and
    forward(x) -> (out, bias) (TE's tuple with te_return_bias, else (out, None))."""

    def _te_init(self, te_class, input_size, output_size, config, bias, skip_bias_add, **te_kwargs):
        te_return_bias = skip_bias_add and bias
        te_class.__init__(
            self,
            input_size,
            output_size,
            sequence_parallel=config.sequence_parallel,
            fuse_wgrad_accumulation=config.gradient_accumulation_fusion,
            tp_size=config.tensor_model_parallel_size,
            bias=bias,
            return_bias=te_return_bias,
            params_dtype=config.params_dtype,
            **te_kwargs,
        )
        self.te_return_bias, self.config = te_return_bias, config
        with torch.no_grad():  # scaled like an initialized layer
            self.weight.mul_(self.in_features**-0.5)

    def forward(self, x):
        out = super().forward(x, is_first_microbatch=None)
        return out if self.te_return_bias else (out, None)


class TERowParallelLinear(_MegatronTEWrapper, Linear):
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
        self._te_init(
            Linear,
            input_size,
            output_size,
            config,
            bias,
            skip_bias_add,
            tp_group=tp_group,
            parallel_mode="row",
            ub_name=tp_comm_buffer_name,
        )


class TELayerNormColumnParallelLinear(_MegatronTEWrapper, LayerNormLinear):
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
        self._te_init(
            LayerNormLinear,
            input_size,
            output_size,
            config,
            bias,
            skip_bias_add,
            eps=config.layernorm_epsilon,
            tp_group=tp_group,
            normalization=config.normalization,
            parallel_mode="column",
            zero_centered_gamma=config.layernorm_zero_centered_gamma,
            ub_name=tp_comm_buffer_name,
        )
