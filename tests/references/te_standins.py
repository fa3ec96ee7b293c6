"""CPU stand-ins for Transformer Engine's Linear, LayerNormLinear and GroupedLinear (TE needs CUDA): TE's
class names and module (so megasparse.te.linear finds them in the MRO), constructor keywords, parameter
and attribute names, forward signatures and return contracts (checked against TE 2.5 - 2.18 and main:
transformer_engine/pytorch/module/{linear,layernorm_linear,grouped_linear,base}.py). Their own forwards
are TE's dense forward in plain torch, what runs when no megasparse route takes a call: TE's
activation dtype (set_activation_dtype: the autocast dtype, here CPU autocast's, else the input's),
TE's communication for parallel_mode column / row (Megatron's mappings on the module's tp_group), the
bias where TE adds it, and TE's wgrad fusion (fuse_wgrad_accumulation: dY^T X into the main_grad of
the tensor from `_get_weight_tensors()`, overwritten on is_first_microbatch=True, then
grad_added_to_main_grad and a dummy gradient)."""

import contextlib

import torch

_UB_FLAGS = (
    "ub_overlap_ag",
    "ub_overlap_rs",
    "ub_overlap_rs_dgrad",
    "ub_bulk_dgrad",
    "ub_bulk_wgrad",
)


def _tp():
    from megatron.core import tensor_parallel

    return tensor_parallel


class _TEGemm(torch.autograd.Function):
    """TE's _Linear GEMM on the communicated input: y = x W^T (+ b), W and b cast to the input's
    (activation) dtype; backward dX = dY W, dW = dY^T X (into main_grad under wgrad fusion)."""

    @staticmethod
    def forward(ctx, x, weight, bias, fuse_wgrad, first_microbatch):
        w = weight.to(x.dtype)
        ctx.save_for_backward(x, w)
        ctx.weight, ctx.fuse, ctx.first = weight, fuse_wgrad, first_microbatch
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy2d, x2d = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        dx = dy @ w
        db = dy2d.sum(0) if ctx.has_bias else None
        weight = ctx.weight
        if not ctx.fuse:
            return dx, dy2d.t() @ x2d, db, None, None
        wgrad = dy2d.t().float() @ x2d.float()
        if ctx.first:  # TE: accumulate = fuse_wgrad_accumulation and not is_first_microbatch
            weight.main_grad.copy_(wgrad)
        else:
            weight.main_grad.add_(wgrad)
        dummy = None
        if hasattr(weight, "grad_added_to_main_grad"):
            weight.grad_added_to_main_grad = True
            dummy = torch.zeros(weight.main_grad.shape, dtype=weight.dtype)
        return dx, dummy, db, None, None


class _TEModule(torch.nn.Module):
    """What TE's Linear / LayerNormLinear set up in __init__ and prepare_forward."""

    def _te_setup(self, arguments: dict):
        """TE's __init__ on the constructor's arguments (`locals()`, TE's names)."""
        in_features, out_features = arguments["in_features"], arguments["out_features"]
        bias, return_bias = arguments["bias"], arguments["return_bias"]
        tp_group, parallel_mode = arguments["tp_group"], arguments["parallel_mode"]
        ub = {flag: arguments[flag] for flag in _UB_FLAGS}
        self.fuse_wgrad_accumulation = arguments["fuse_wgrad_accumulation"]
        self.use_bias, self.return_bias = bias, return_bias
        self.apply_bias = bias and not return_bias
        self.tp_group = tp_group
        self.tp_size = arguments["tp_size"] if tp_group is None else tp_group.size()
        self.parallel_mode = parallel_mode
        if parallel_mode == "column":
            out_features //= self.tp_size
        elif parallel_mode == "row":
            in_features //= self.tp_size
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel = self.tp_size > 1 and arguments["sequence_parallel"]
        column, row, sp = parallel_mode == "column", parallel_mode == "row", self.sequence_parallel
        # TE's userbuffers flags, as its __init__ derives them from the constructor's
        self.ub_overlap_ag_fprop = column and sp and ub["ub_overlap_ag"]
        self.ub_overlap_rs_dgrad = column and sp and ub["ub_overlap_rs_dgrad"]
        self.ub_bulk_dgrad = column and sp and ub["ub_bulk_dgrad"] and not self.ub_overlap_rs_dgrad
        self.ub_bulk_wgrad = column and sp and ub["ub_bulk_wgrad"] and not self.ub_overlap_rs_dgrad
        self.ub_overlap_rs_fprop = row and sp and ub["ub_overlap_rs"]
        self.ub_overlap_ag_dgrad = row and sp and ub["ub_overlap_ag"]
        self.gemm_bias_unfused_add = row and self.apply_bias
        self.activation_dtype = None
        dtype = arguments["params_dtype"] or torch.get_default_dtype()
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.randn(out_features, dtype=dtype)) if bias else None

    def _get_weight_tensors(self):
        return [self.weight]

    def set_activation_dtype(self, inp):
        # TE: torch.is_autocast_enabled() (CUDA autocast) -> its dtype; CPU autocast stands in here
        if torch.is_autocast_enabled("cpu"):
            self.activation_dtype = torch.get_autocast_dtype("cpu")
        else:
            self.activation_dtype = inp.dtype

    @contextlib.contextmanager
    def prepare_forward(self, inp, num_gemms=1, allow_non_contiguous=False):
        self.set_activation_dtype(inp)
        yield inp.contiguous()  # autocast stays on, as in TE (its GEMMs cast explicitly)

    def _te_linear(self, inp, is_first_microbatch):
        """TE's Linear forward on inp (already the GEMM's input before communication)."""
        dtype = self.activation_dtype
        x = inp.to(dtype)
        communicates = self.tp_size > 1
        if self.parallel_mode == "column" and communicates:
            x = (
                _tp().gather_from_sequence_parallel_region(x, group=self.tp_group)
                if self.sequence_parallel
                else _tp().copy_to_tensor_model_parallel_region(x, group=self.tp_group)
            )
        bias = self.bias if self.apply_bias and not self.gemm_bias_unfused_add else None
        weight = self._get_weight_tensors()[0]
        out = _TEGemm.apply(x, weight, bias, self.fuse_wgrad_accumulation, is_first_microbatch)
        if self.parallel_mode == "row" and communicates:
            out = (
                _tp().reduce_scatter_to_sequence_parallel_region(out, group=self.tp_group)
                if self.sequence_parallel
                else _tp().reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
            )
        if self.gemm_bias_unfused_add:
            out = out + self.bias.to(dtype)
        return out, x


class Linear(_TEModule):
    """Stands in for transformer_engine.pytorch.Linear (TE 2.5 - 2.18, main): TE's constructor
    keywords (those after `name`, e.g. save_original_input, taken as TE does), attributes and
    forward(inp, is_first_microbatch, fp8_output, fp8_grad) -> out | (out, bias)."""

    def __init__(
        self,
        in_features,
        out_features,
        sequence_parallel=False,
        fuse_wgrad_accumulation=False,
        tp_group=None,
        tp_size=1,
        get_rng_state_tracker=None,
        rng_tracker_name=None,
        init_method=None,
        bias=True,
        return_bias=False,
        params_dtype=None,
        parallel_mode=None,
        parameters_split=None,
        device="cpu",
        ub_overlap_ag=False,
        ub_overlap_rs=False,
        ub_overlap_rs_dgrad=False,
        ub_bulk_dgrad=False,
        ub_bulk_wgrad=False,
        ub_name=None,
        delay_wgrad_compute=False,
        symmetric_ar_type=None,
        save_original_input=False,
        name=None,
    ):
        super().__init__()
        self._te_setup(locals())
        self.ub_name, self.symmetric_ar_type = ub_name, symmetric_ar_type

    def forward(self, inp, is_first_microbatch=None, fp8_output=False, fp8_grad=False):
        with self.prepare_forward(inp) as inp:
            out, _ = self._te_linear(inp, is_first_microbatch)
        if self.return_bias:
            return out, self.bias.to(self.activation_dtype) if self.bias is not None else None
        return out


Linear.__module__ = "transformer_engine.pytorch.module.linear"


class LayerNormLinear(_TEModule):
    """Stands in for transformer_engine.pytorch.LayerNormLinear (TE 2.5 - 2.18, main): TE's
    constructor keywords, parameter and attribute names (layer_norm_weight / layer_norm_bias, eps,
    normalization, zero_centered_gamma), forward(inp, is_first_microbatch, fp8_output, fp8_grad) and
    its output order (out, bias, ln_out) with return_bias and return_layernorm_output. The norm in
    fp32 on the input cast to the activation dtype, its output in the activation dtype; ln_out is the
    gathered norm output with return_layernorm_output_gathered (column, sequence parallel), which
    TE's backward gives no gradient."""

    def __init__(
        self,
        in_features,
        out_features,
        eps=1e-5,
        sequence_parallel=False,
        fuse_wgrad_accumulation=False,
        tp_group=None,
        tp_size=1,
        get_rng_state_tracker=None,
        init_method=None,
        bias=True,
        normalization="LayerNorm",
        return_bias=False,
        params_dtype=None,
        parallel_mode=None,
        return_layernorm_output=False,
        return_layernorm_output_gathered=False,
        parameters_split=None,
        zero_centered_gamma=False,
        device="cpu",
        ub_overlap_ag=False,
        ub_overlap_rs=False,
        ub_overlap_rs_dgrad=False,
        ub_bulk_wgrad=False,
        ub_bulk_dgrad=False,
        ub_name=None,
        delay_wgrad_compute=False,
        symmetric_ar_type=None,
        name=None,
    ):
        super().__init__()
        self._te_setup(locals())
        self.eps, self.normalization = eps, normalization
        self.zero_centered_gamma = zero_centered_gamma
        dtype = self.weight.dtype
        gamma = torch.randn(in_features, dtype=dtype) * 0.2 + (0.0 if zero_centered_gamma else 1.0)
        self.layer_norm_weight = torch.nn.Parameter(gamma)
        beta = torch.randn(in_features, dtype=dtype) * 0.2 if normalization == "LayerNorm" else None
        self.layer_norm_bias = None if beta is None else torch.nn.Parameter(beta)
        self.return_layernorm_output = return_layernorm_output
        self.return_layernorm_output_gathered = (
            return_layernorm_output and return_layernorm_output_gathered
        )

    def _norm(self, x):
        xf = x.float()
        g = self.layer_norm_weight.to(x.dtype).float()
        g = g + 1 if self.zero_centered_gamma else g
        if self.normalization == "RMSNorm":
            ln = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps) * g
        else:
            beta = self.layer_norm_bias.to(x.dtype).float()
            ln = torch.nn.functional.layer_norm(xf, xf.shape[-1:], g, beta, self.eps)
        return ln.to(x.dtype)

    def forward(self, inp, is_first_microbatch=None, fp8_output=False, fp8_grad=False):
        with self.prepare_forward(inp) as inp:
            ln = self._norm(inp.to(self.activation_dtype))
            out, ln_total = self._te_linear(ln, is_first_microbatch)
        bias = self.bias.to(self.activation_dtype) if self.bias is not None else None
        outputs = (out, bias) if self.return_bias else (out,)
        if self.return_layernorm_output:
            outputs += (ln_total.detach() if self.return_layernorm_output_gathered else ln,)
        return outputs if len(outputs) > 1 else out


LayerNormLinear.__module__ = "transformer_engine.pytorch.module.layernorm_linear"


class TELayerNormLinearLike(LayerNormLinear):
    """Megatron's TELayerNormColumnParallelLinear: takes its config, passes parallel_mode="column"
    and its bias choice to TE's class, and keeps TE's forward (so the calls below see TE's own
    return contract)."""

    def __init__(self, *args, config=None, bias=False, parallel_mode="column", **kwargs):
        super().__init__(*args, bias=bias, parallel_mode=parallel_mode, **kwargs)


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


class TELinearLike(Linear):
    """Megatron's TELinear wrapper (megatron/core/extensions/transformer_engine.py, 0.16 / 0.19):
    forward(x) calls TE's forward with is_first_microbatch (True until the first call; Megatron
    sets it again per step) and returns (out, bias) with return_bias, else (out, None)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.is_first_microbatch = True

    def forward(self, x):
        out = super().forward(x, is_first_microbatch=self.is_first_microbatch)
        self.is_first_microbatch = False
        return out if self.return_bias else (out, None)


def current_recipe(fmt="HYBRID"):
    """Stands in for TE's Float8CurrentScaling recipe (megasparse reads its class name and format)."""
    recipe = type("Float8CurrentScaling", (), {})()
    recipe.fp8_format = type("F", (), {"name": fmt})()
    return recipe
