"""FP8 2:4 in sparse Transformer Engine linears: under TE's fp8_autocast, the forward GEMMs (and with
transposable masks the input-gradient GEMMs) of TE's `Linear`, `LayerNormLinear` and `GroupedLinear`
run as e4m3 2:4 cuSPARSELt GEMMs (megasparse.fp8.linear).

Where it enters: `te_fp8_forward` replaces the forward of TE's own class (megasparse.te.linear places a
subclass between Megatron's TE wrapper and TE's class in the MRO), so it receives exactly what TE's
forward receives and returns what it returns (TE 2.5 to 2.18 and main, same contracts):
  - Linear.forward(inp, is_first_microbatch, fp8_output, fp8_grad) -> out, or (out, bias) with
    return_bias.
  - LayerNormLinear.forward(inp, is_first_microbatch, fp8_output, fp8_grad) -> out, (out, bias),
    (out, ln_out) or (out, bias, ln_out): TE's normalization of the input cast to the activation
    dtype (LayerNorm or RMSNorm by `normalization`, `eps`, `zero_centered_gamma`: gamma + 1;
    parameters `layer_norm_weight`, `layer_norm_bias`), computed in fp32 and rounded to the
    activation dtype as TE's kernels do, then the linear below on the norm output. ln_out is the
    norm output (with `return_layernorm_output_gathered`, the all-gathered one under column-parallel
    sequence parallelism; TE's backward then drops its gradient, and so does this path).
  - GroupedLinear.forward(inp, m_splits, is_first_microbatch[, out, dgrad_out]) -> out, or
    (out, [bias_i]) with return_bias: the input rows split by m_splits, one FP8 2:4 op per expert
    weight with that weight's per-step state and its own TE quantizers, outputs concatenated; biases
    per expert in the GEMM unless returned. An expert with no tokens runs no GEMM (its weight still
    gets its zero gradient and its per-step gradient terms). No communication: TE's GroupedLinear
    has none (Megatron's MoE dispatcher moves tokens; its TE grouped linears pass parallel_mode=None
    under expert or expert-tensor parallelism, and at TP=EP=1 there is nothing to communicate).
It runs when
  - TE's fp8_autocast is on with a per-tensor recipe (DelayedScaling, Float8CurrentScaling) and no
    `backward_override`, and
  - the layer prunes its weights with backend "auto" or "cusparselt", and
  - the device runs cuSPARSELt's e4m3 GEMM (sm90; megasparse.fp8.gemm.fp8_cusparselt_reason) and
    every weight shard is a multiple of 32 in both dims, or the weight is not on CUDA (the CPU
    emulation: tests and the demo's stand-ins), and
  - the call uses no TE option this path does not reproduce: fp8_output / fp8_grad (TE's FP8
    tensors out of and into the layer), GroupedLinear's preallocated out / dgrad_out buffers or
    single grouped weight / bias.
Otherwise TE's own forward runs its dense (FP8) GEMM on W*M, with one warning naming the reason.

What stays TE's and Megatron's: TE's `prepare_forward` (FP8 metadata, the amax buffers TE reduces
over its amax group and turns into scales at the end of fp8_autocast); the scales of x and dY from
the module's own TE quantizers where it has them (megasparse.fp8.scaling): GEMM i's input at
`quantizers["scaling_fwd"][3 i]` and its output gradient at `quantizers["scaling_bwd"][2 i]`
(FP8FwdTensorIdx.GEMM1_INPUT / FP8BwdTensorIdx.GRAD_OUTPUT1 of each GEMM's tensors, indexed as TE's
GroupedLinear._get_quantizers does; i = 0 for Linear and LayerNormLinear); communication through
Megatron's tensor-parallel mappings, as TE does it for the module's parallel_mode (column: copy /
sequence-parallel all-gather of the GEMM input; row: all-reduce / reduce-scatter of the output, bias
after it); main_grad accumulation when TE fuses wgrad accumulation.
"""

import contextlib
import functools
import inspect

import torch

from megasparse.fp8.linear import Fp8LinearPlan, cusparselt_fp8_reason, fp8_sparse_linear_step
from megasparse.fp8.scaling import E4M3, CurrentScaler, Fp8Recipe, te_scaler
from megasparse.core.warn import warn_once


def te_fp8_state():
    """(enabled, recipe) of Transformer Engine's fp8_autocast; (False, None) without TE."""
    try:
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
    except ImportError:
        try:
            from transformer_engine.pytorch.quantization import FP8GlobalStateManager
        except ImportError:
            return False, None
    if not FP8GlobalStateManager.is_fp8_enabled():
        return False, None
    return True, FP8GlobalStateManager.get_fp8_recipe()


def _route_reason(weights, recipe, te_recipe):
    """Why the FP8 2:4 GEMMs cannot run for these weights under this recipe (None: they can)."""
    if recipe is None:
        return (
            f"TE recipe {type(te_recipe).__name__} is block-scaled; cuSPARSELt takes "
            "per-tensor scales"
        )
    override = getattr(te_recipe, "backward_override", None)
    if override is not None:
        return f"TE recipe backward_override={override!r} (TE's own backward precision)"
    device = weights[0].device
    if device.type != "cuda":
        return None  # the CPU emulation
    return next(filter(None, (cusparselt_fp8_reason(w) for w in weights)), None)


def fp8_route(module, unsupported=None):
    """(Fp8Recipe, use_cusparselt) when the FP8 2:4 path runs for this call, else None.

    unsupported: the caller's reason this call needs TE's own forward (a TE option not reproduced)."""
    enabled, te_recipe = te_fp8_state()
    if not enabled or not module.sparsity.prunes_weights or module.sparsity.backend == "dense":
        return None
    recipe = Fp8Recipe.from_te(te_recipe)
    weights = [getattr(module, name) for name in module._sparse_weight_names()]
    reason = unsupported or _route_reason(weights, recipe, te_recipe)
    if reason is not None:
        warn_once(
            f"megasparse: FP8 2:4 is off for this layer ({reason}); TE's dense FP8 GEMM "
            "runs on W*M instead",
            stacklevel=4,
        )
        return None
    return recipe, weights[0].device.type == "cuda"


@contextlib.contextmanager
def _te_forward_context(module, inp, num_gemms=1):
    """TE's prepare_forward (a context manager in TE 2.5-2.x; prepare_forward_ctx later)."""
    if hasattr(module, "prepare_forward_ctx"):
        with module.prepare_forward_ctx(inp, num_gemms) as inp:
            yield inp
    elif hasattr(module, "prepare_forward"):
        with module.prepare_forward(inp, num_gemms) as inp:
            yield inp
    else:  # stand-ins
        yield inp


def _scalers(module, recipe: Fp8Recipe, gemm=0):
    """(x, dY, e4m3 dY for the sparse dgrad) of GEMM `gemm`: the module's TE quantizer state where it
    exposes it, else megasparse's own scalers following the recipe (kept on the module, per GEMM)."""
    quantizers = getattr(module, "quantizers", None) if getattr(module, "fp8", False) else None
    x_scaler = grad_scaler = None
    if quantizers:
        per_gemm = getattr(module, "_num_fp8_tensors_per_gemm", {"fwd": 3, "bwd": 2})
        fwd, bwd = quantizers["scaling_fwd"], quantizers["scaling_bwd"]
        x_scaler = te_scaler(fwd[per_gemm["fwd"] * gemm], E4M3)  # GEMM1_INPUT of GEMM `gemm`
        grad_scaler = te_scaler(bwd[per_gemm["bwd"] * gemm], recipe.grad_dtype)  # GRAD_OUTPUT1
    own = getattr(module, "_megasparse_fp8_scalers", None)
    if own is None or own[0] != recipe:
        own = (recipe, {})
        module._megasparse_fp8_scalers = own
    if gemm not in own[1]:
        own[1][gemm] = (recipe.own_scaler(E4M3), recipe.own_scaler(recipe.grad_dtype))
    x_scaler = x_scaler or own[1][gemm][0]
    grad_scaler = grad_scaler or own[1][gemm][1]
    dgrad = None if recipe.grad_dtype == E4M3 else CurrentScaler(E4M3, recipe.margin)
    return x_scaler, grad_scaler, dgrad


def _plan(module, route, out_dtype, gemm=0) -> Fp8LinearPlan:
    recipe, use_cusparselt = route
    return Fp8LinearPlan(
        *_scalers(module, recipe, gemm),
        use_cusparselt,
        recipe.fp8_wgrad,
        bool(getattr(module, "fuse_wgrad_accumulation", False)),
        out_dtype,
    )


def _activation_dtype(module, x):
    """TE's activation dtype (set by prepare_forward; the input's dtype for stand-ins)."""
    return getattr(module, "activation_dtype", None) or x.dtype


def _returned_bias(bias, dtype):
    return bias if bias is None or bias.dtype == dtype else bias.to(dtype)  # TE's cast_if_needed


def _comm():
    from megatron.core import tensor_parallel as tp

    return tp


def _column_input(module, x):
    """The GEMM input as TE's column-parallel mode makes it: sequence-parallel all-gather, or a copy
    whose backward all-reduces the input gradient."""
    if getattr(module, "parallel_mode", None) != "column":
        return x
    if getattr(module, "sequence_parallel", False):
        return _comm().gather_from_sequence_parallel_region(x)
    return _comm().copy_to_tensor_model_parallel_region(x)


def _linear_output(module, x, route):
    """(out, returned bias) of TE's Linear GEMM on the communicated input x: the FP8 2:4 op, the
    row-parallel output reduction, the bias where TE adds it (in the GEMM, after the reduction, or
    returned)."""
    mode, sp = getattr(module, "parallel_mode", None), getattr(module, "sequence_parallel", False)
    bias = getattr(module, "bias", None) if getattr(module, "use_bias", False) else None
    return_bias = getattr(module, "return_bias", False)
    dtype = _activation_dtype(module, x)
    (step,) = module.weight_steps()
    in_gemm_bias = bias if (bias is not None and not return_bias and mode != "row") else None
    out = fp8_sparse_linear_step(x, module.weight, in_gemm_bias, step, _plan(module, route, dtype))
    if mode == "row":
        out = (
            _comm().reduce_scatter_to_sequence_parallel_region(out)
            if sp
            else _comm().reduce_from_tensor_model_parallel_region(out)
        )
        if bias is not None and not return_bias:
            out = out + bias
    return out, (_returned_bias(bias, dtype) if return_bias else None)


def te_normalization(module, x):
    """TE LayerNormLinear's norm of x (already in the activation dtype): fp32 math, gamma and beta
    cast to x's dtype first, gamma + 1 with zero_centered_gamma, output rounded to x's dtype."""
    gamma = module.layer_norm_weight.to(x.dtype).float()
    if getattr(module, "zero_centered_gamma", False):
        gamma = gamma + 1
    xf, eps = x.float(), module.eps
    normalization = getattr(module, "normalization", "LayerNorm")
    if normalization == "RMSNorm":
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * gamma
    elif normalization == "LayerNorm":
        beta = module.layer_norm_bias.to(x.dtype).float()
        y = torch.nn.functional.layer_norm(xf, (xf.shape[-1],), gamma, beta, eps)
    else:
        raise ValueError(f"megasparse: TE normalization {normalization!r} is not LayerNorm/RMSNorm")
    return y.to(x.dtype)


@functools.lru_cache(maxsize=None)
def _signature(te_forward):
    return inspect.signature(te_forward)


def _fp8_or_te(module, te_forward, run, args, kwargs, unsupported, num_gemms=1):
    """TE's forward args bound by name; `run(x, route, arguments)` inside TE's prepare_forward when
    the FP8 2:4 route is on for this call, else TE's own forward."""
    signature = _signature(te_forward)
    bound = signature.bind(module, *args, **kwargs)
    bound.apply_defaults()
    arguments = bound.arguments
    route = fp8_route(module, unsupported(module, arguments))
    if route is None:
        return te_forward(module, *args, **kwargs)
    inp = arguments[list(signature.parameters)[1]]  # TE's `inp`
    with _te_forward_context(module, inp, num_gemms(module)) as x:
        return run(module, x, route, arguments)


def _fp8_io(module, arguments):
    if arguments.get("fp8_output") or arguments.get("fp8_grad"):
        return "TE's FP8 output / gradient tensors (fp8_output, fp8_grad)"
    return None


def _linear(module, x, route, arguments):
    out, bias = _linear_output(module, _column_input(module, x), route)
    return (out, bias) if getattr(module, "return_bias", False) else out


def _layernorm_linear(module, x, route, arguments):
    ln_out = te_normalization(module, x.to(_activation_dtype(module, x)))
    total = _column_input(module, ln_out)
    out, bias = _linear_output(module, total, route)
    outputs = (out, bias) if getattr(module, "return_bias", False) else (out,)
    if getattr(module, "return_layernorm_output", False):
        if getattr(module, "return_layernorm_output_gathered", False):
            # TE returns the (sequence-parallel) gathered norm output and drops its gradient
            all_gathered = module.parallel_mode == "column" and module.sequence_parallel
            outputs += ((total if all_gathered else ln_out).detach(),)
        else:
            outputs += (ln_out,)
    return outputs if len(outputs) > 1 else out


def _grouped_unsupported(module, arguments):
    if arguments.get("out") is not None or arguments.get("dgrad_out") is not None:
        return "GroupedLinear's preallocated out / dgrad_out buffers"
    if getattr(module, "single_grouped_weight", False) or getattr(
        module, "single_grouped_bias", False
    ):
        return "TE GroupedLinear's single grouped weight / bias"
    return None


def _grouped_linear(module, x, route, arguments):
    splits = arguments["m_splits"]
    splits = splits.tolist() if isinstance(splits, torch.Tensor) else list(splits)
    if len(splits) != module.num_gemms:
        raise ValueError(f"m_splits has {len(splits)} entries for {module.num_gemms} GEMMs")
    names = module._sparse_weight_names()
    biases = [getattr(module, f"bias{i}", None) for i in range(module.num_gemms)]
    return_bias = getattr(module, "return_bias", False)
    apply_bias = getattr(
        module, "apply_bias", getattr(module, "use_bias", False) and not return_bias
    )
    dtype = _activation_dtype(module, x)
    x2d = x.reshape(-1, x.shape[-1])
    outs = [
        fp8_sparse_linear_step(
            x_i,
            getattr(module, name),
            bias if apply_bias else None,
            step,
            _plan(module, route, dtype, i),
        )
        for i, (x_i, name, bias, step) in enumerate(
            zip(torch.split(x2d, splits), names, biases, module.weight_steps())
        )
    ]
    out = torch.cat(outs).view(-1, *x.shape[1:-1], outs[0].shape[-1])
    if return_bias:
        return out, [_returned_bias(b, dtype) for b in biases]
    return out


_FORWARDS = {  # TE class name -> (FP8 2:4 forward, unsupported-option check, number of GEMMs)
    "Linear": (_linear, _fp8_io, lambda module: 1),
    "LayerNormLinear": (_layernorm_linear, _fp8_io, lambda module: 1),
    "GroupedLinear": (_grouped_linear, _grouped_unsupported, lambda module: module.num_gemms),
}


def te_fp8_forward(module, te_class, *args, **kwargs):
    """TE `te_class.forward`'s contract with the FP8 2:4 GEMMs; TE's forward when the route is off."""
    run, unsupported, num_gemms = _FORWARDS[te_class.__name__]
    return _fp8_or_te(module, te_class.forward, run, args, kwargs, unsupported, num_gemms)
