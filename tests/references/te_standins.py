"""CPU stand-ins for Transformer Engine's LayerNormLinear and GroupedLinear (TE needs CUDA): TE's class
names and module (so megasparse.te.linear finds them in the MRO), parameter and attribute names, forward
signatures and return contracts (checked against TE 2.5 - 2.18 and main). Their own forwards
(plain float math on `_get_weight_tensors()`) are what runs when the FP8 2:4 route is off."""

import torch


class LayerNormLinear(torch.nn.Module):
    """Stands in for transformer_engine.pytorch.LayerNormLinear: TE's parameter and attribute names,
    TE's forward signature and output tuple order ((out, bias, ln_out) with return_bias and
    return_layernorm_output); its own forward (norm, then the linear on _get_weight_tensors())
    is what runs when the FP8 2:4 route is off."""

    def __init__(
        self,
        in_features,
        out_features,
        *,
        config,
        eps=1e-5,
        normalization="LayerNorm",
        zero_centered_gamma=False,
        bias=False,
        return_bias=False,
        return_layernorm_output=False,
        return_layernorm_output_gathered=False,
        sequence_parallel=False,
    ):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features))
        self.eps, self.normalization, self.zero_centered_gamma = (
            eps,
            normalization,
            zero_centered_gamma,
        )
        gamma = torch.randn(in_features) * 0.2 + (0.0 if zero_centered_gamma else 1.0)
        self.layer_norm_weight = torch.nn.Parameter(gamma)
        layer_norm_bias = torch.randn(in_features) * 0.2 if normalization == "LayerNorm" else None
        self.layer_norm_bias = (
            None if layer_norm_bias is None else torch.nn.Parameter(layer_norm_bias)
        )
        self.use_bias, self.return_bias = bias, return_bias
        self.bias = torch.nn.Parameter(torch.randn(out_features)) if bias else None
        self.parallel_mode, self.sequence_parallel = "column", sequence_parallel
        self.return_layernorm_output = return_layernorm_output
        self.return_layernorm_output_gathered = (
            return_layernorm_output and return_layernorm_output_gathered
        )

    def _get_weight_tensors(self):
        return [self.weight]

    def forward(self, inp, is_first_microbatch=None, fp8_output=False, fp8_grad=False):
        g = self.layer_norm_weight + 1 if self.zero_centered_gamma else self.layer_norm_weight
        if self.normalization == "RMSNorm":
            ln = inp * torch.rsqrt(inp.square().mean(-1, keepdim=True) + self.eps) * g
        else:
            ln = torch.nn.functional.layer_norm(
                inp, inp.shape[-1:], g, self.layer_norm_bias, self.eps
            )
        in_gemm_bias = self.bias if self.use_bias and not self.return_bias else None
        out = torch.nn.functional.linear(ln, self._get_weight_tensors()[0], in_gemm_bias)
        outputs = (out, self.bias) if self.return_bias else (out,)
        outputs += (ln,) if self.return_layernorm_output else ()
        return outputs if len(outputs) > 1 else out


LayerNormLinear.__module__ = "transformer_engine.pytorch.module.layernorm_linear"


class TELayerNormLinearLike(LayerNormLinear):
    """A wrapper that keeps TE's forward (so the calls below see TE's own return contract)."""


class GroupedLinear(torch.nn.Module):
    """Stands in for transformer_engine.pytorch.GroupedLinear: weight0..weight{n-1}, bias0.., TE's
    forward(inp, m_splits, is_first_microbatch) and return (out, [bias_i]) with return_bias."""

    def __init__(
        self, num_gemms, in_features, out_features, *, config=None, bias=False, return_bias=False
    ):
        super().__init__()
        self.num_gemms, self.use_bias, self.return_bias = num_gemms, bias, return_bias
        self.apply_bias, self.parallel_mode = bias and not return_bias, None
        for i in range(num_gemms):
            self.register_parameter(
                f"weight{i}", torch.nn.Parameter(torch.randn(out_features, in_features))
            )
            b = torch.randn(out_features) if bias else torch.empty(0)
            self.register_parameter(f"bias{i}", torch.nn.Parameter(b))

    def _get_weight_tensors(self):
        return [getattr(self, f"weight{i}") for i in range(self.num_gemms)]

    def forward(self, inp, m_splits, is_first_microbatch=None):
        biases = [getattr(self, f"bias{i}") for i in range(self.num_gemms)]
        outs = [
            torch.nn.functional.linear(x, w, b if self.apply_bias else None)
            for x, w, b in zip(torch.split(inp, list(m_splits)), self._get_weight_tensors(), biases)
        ]
        out = torch.cat(outs)
        return (out, biases) if self.return_bias else out


GroupedLinear.__module__ = "transformer_engine.pytorch.module.grouped_linear"


class TEGroupedLinearLike(GroupedLinear):
    """Megatron's TEGroupedLinear: forward(x, m_splits) through TE's, always (out, bias)."""

    def forward(self, x, m_splits):
        out = super().forward(x, m_splits, is_first_microbatch=None)
        return out if self.return_bias else (out, None)


class FakeTELinear(torch.nn.Module):
    """What the sparse classes rely on in TE: a `weight` and a forward that reads `_get_weight_tensors()`."""

    def __init__(self, in_features, out_features, *, config):
        super().__init__()
        self.config = config
        self.weight = torch.nn.Parameter(
            torch.randn(out_features, in_features, dtype=config.params_dtype)
        )

    def _get_weight_tensors(self):
        return [self.weight]

    def forward(self, x):
        return torch.nn.functional.linear(x, self._get_weight_tensors()[0]), None
