"""The forwards of sparse Transformer Engine linears on megasparse's GEMMs.

Where it enters: `te_sparse_forward` replaces the forward of TE's own class (megasparse.te.linear
places a subclass between Megatron's TE wrapper and TE's class in the MRO), so it receives exactly
what TE's forward receives and returns what it returns (TE 2.5 to 2.18 and main, same contracts):
  - Linear.forward(inp, is_first_microbatch, fp8_output, fp8_grad) -> out, or (out, bias) with
    return_bias.
  - LayerNormLinear.forward(inp, is_first_microbatch, fp8_output, fp8_grad) -> out, (out, bias),
    (out, ln_out) or (out, bias, ln_out): TE's normalization (megasparse.te.norm), then the linear
    below on the norm output. ln_out is the norm output (with `return_layernorm_output_gathered`,
    the all-gathered one under column-parallel sequence parallelism; TE's backward then drops its
    gradient, and so does this path).
  - GroupedLinear.forward(inp, m_splits, is_first_microbatch[, out, dgrad_out]) -> out, or
    (out, [bias_i]) with return_bias: the input rows split by m_splits, one op per expert weight
    with that weight's per-step state, outputs concatenated; biases per expert in the GEMM unless
    returned. An expert with no tokens runs no GEMM (its weight still gets its zero gradient and
    its per-step gradient terms). No communication: TE's GroupedLinear has none (Megatron's MoE
    dispatcher moves tokens; its TE grouped linears pass parallel_mode=None under expert or
    expert-tensor parallelism, and at TP=EP=1 there is nothing to communicate).
Which GEMM op runs (`choose_gemm`): under TE's fp8_autocast the FP8 2:4 op where it applies
(megasparse.te.fp8_route says exactly when), else TE's FP8 GEMM on W*M; without it, while the layer
is sparse (`_sparse_now()`), the bf16/fp16 2:4 op (megasparse.te.sparse_route: cuSPARSELt on the
step's compressed W*M); in a dense phase TE's own forward, exactly. TE's own forward (its dense
GEMM on W*M) also runs, with one warning naming the reason, under TE's userbuffers overlap
(--tp-comm-overlap: the communication is fused into TE's GEMM) and for calls with TE options this
path does not reproduce (fp8_output / fp8_grad, GroupedLinear's preallocated out / dgrad_out
buffers or single grouped weight / bias).

What stays TE's and Megatron's: TE's `prepare_forward` (FP8 metadata, the amax buffers TE reduces
over its amax group and turns into scales at the end of fp8_autocast); communication on the
module's tp_group, as TE does it for its parallel_mode when tp_size > 1 (column: copy /
sequence-parallel all-gather of the GEMM input, whose backward all-reduce / reduce-scatter of the
input gradient both routes run inside their op, launched after the dgrad GEMM and waited for
after the wgrad GEMM as TE's Linear backward does (megasparse.core.input_comm); row: all-reduce /
reduce-scatter of the output through Megatron's mappings, bias after it in the activation dtype;
checked against TE 2.5 and main, module/linear.py); main_grad accumulation when TE fuses wgrad
accumulation (the route adds to main_grad in every micro-batch, where TE overwrites it with
is_first_microbatch=True: the same on the grad buffer Megatron zeroes before each step).
"""

import contextlib
import functools
import inspect

import torch

from megasparse.core.warn import warn_once
from megasparse.te import fp8_route, sparse_route
from megasparse.te.norm import te_normalization


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


def _activation_dtype(module, x):
    """TE's activation dtype (set by prepare_forward; the input's dtype for stand-ins)."""
    return getattr(module, "activation_dtype", None) or x.dtype


def _returned_bias(bias, dtype):
    return bias if bias is None or bias.dtype == dtype else bias.to(dtype)  # TE's cast_if_needed


def _comm():
    from megatron.core import tensor_parallel as tp

    return tp


def _communicates(module) -> bool:
    """Whether TE communicates for this module: tensor-parallel size above 1 (stand-ins without
    TE's tp_size: Megatron's tensor-parallel group decides)."""
    return getattr(module, "tp_size", 2) != 1


def _column_input(module, x, gemm=None, total_needed=False):
    """(GEMM input, its input communication or None) as TE's column-parallel mode makes it:
    sequence-parallel all-gather, or a copy whose backward all-reduces the input gradient.

    On megasparse's routes (`sparse_route.sparse_gemm`, `fp8_route.fp8_gemm`) the communication
    runs inside the op, overlapped with the weight-gradient GEMM as TE's Linear backward does it:
    the local x comes back with a `ColumnInputComm` for the GEMM (megasparse.core.input_comm).
    Else (`total_needed` under sequence parallelism: the caller needs the gathered input itself)
    Megatron's mappings run here: the communicated x and None."""
    if getattr(module, "parallel_mode", None) != "column":
        return x, None
    if not _communicates(module):
        return x, None
    group = getattr(module, "tp_group", None)  # None: Megatron's tensor-parallel group
    sequence_parallel = bool(getattr(module, "sequence_parallel", False))
    in_op = gemm is sparse_route.sparse_gemm or getattr(gemm, "func", None) is fp8_route.fp8_gemm
    if in_op and not (total_needed and sequence_parallel):
        from megatron.core.utils import get_tensor_model_parallel_group_if_none
        from megasparse.core.input_comm import ColumnInputComm

        group = get_tensor_model_parallel_group_if_none(group)
        return x, ColumnInputComm(group, sequence_parallel)
    if sequence_parallel:
        return _comm().gather_from_sequence_parallel_region(x, group=group), None
    return _comm().copy_to_tensor_model_parallel_region(x, group=group), None


def _linear_output(module, x, gemm, input_comm=None):
    """(out, returned bias) of TE's Linear GEMM on the communicated input x (or the local x and
    the `input_comm` the op runs, from `_column_input`): the route's op, the row-parallel output
    reduction, the bias where TE adds it (in the GEMM, after the reduction, or returned)."""
    mode, sp = getattr(module, "parallel_mode", None), getattr(module, "sequence_parallel", False)
    bias = getattr(module, "bias", None) if getattr(module, "use_bias", False) else None
    return_bias = getattr(module, "return_bias", False)
    dtype = _activation_dtype(module, x)
    (step,) = _weight_steps(module, gemm, dtype)
    in_gemm_bias = bias if (bias is not None and not return_bias and mode != "row") else None
    comm = {} if input_comm is None else {"input_comm": input_comm}
    out = gemm(module, x, module.weight, in_gemm_bias, step, 0, dtype, **comm)
    if mode == "row" and _communicates(module):
        group = getattr(module, "tp_group", None)
        out = (
            _comm().reduce_scatter_to_sequence_parallel_region(out, group=group)
            if sp
            else _comm().reduce_from_tensor_model_parallel_region(out, group=group)
        )
    if mode == "row":
        if bias is not None and not return_bias:  # TE: after the reduction, in the activation dtype
            out = out + _returned_bias(bias, dtype)
    return out, (_returned_bias(bias, dtype) if return_bias else None)


@functools.lru_cache(maxsize=None)
def _signature(te_forward):
    return inspect.signature(te_forward)


def choose_gemm(module, unsupported=None):
    """The GEMM op of this call, `gemm(module, x, weight, bias, step, index, out_dtype)`, or None for
    TE's own forward (its GEMM on W*M from `_get_weight_tensors`):
      - under TE's fp8_autocast: the FP8 2:4 route (megasparse.te.fp8_route) where it runs, else
        None (TE's FP8 GEMM on W*M);
      - else, when the layer is sparse now (`module._sparse_now()`): the bf16/fp16 route
        (megasparse.te.sparse_route), unless the call or the module needs TE's own forward
        (`unsupported`, TE's userbuffers overlap), said once in a warning;
      - else (a dense phase): None, TE's own forward exactly.
    unsupported: the caller's reason this call needs TE's own forward (a TE option not reproduced)."""
    # TE's userbuffers overlap keeps TE's own forward on every route (FP8 included)
    unsupported = unsupported or sparse_route.sparse_route_reason(module)
    route = fp8_route.fp8_route(module, unsupported)
    if route is not None:
        return functools.partial(fp8_route.fp8_gemm, route=route)
    if fp8_route.te_fp8_state()[0] or not module._sparse_now():
        return None
    if unsupported is not None:
        warn_once(
            f"megasparse: the 2:4 GEMMs are off for this layer ({unsupported}); TE's dense GEMM "
            "runs on W*M instead",
            stacklevel=4,
        )
        return None
    return sparse_route.sparse_gemm


def _weight_steps(module, gemm, dtype) -> list:
    """This step's WeightStep of each weight as the call's GEMM op runs on it (the bf16/fp16 route:
    on its sparse backend, in the activation dtype; the FP8 route: as TE's GEMMs see W*M)."""
    if gemm is sparse_route.sparse_gemm:
        return sparse_route.route_steps(module, dtype)
    return module.weight_steps()


def _route_or_te(module, te_forward, run, args, kwargs, unsupported, num_gemms=1):
    """TE's forward args bound by name; `run(module, x, gemm, arguments)` inside TE's prepare_forward
    when a megasparse route takes this call, else TE's own forward."""
    signature = _signature(te_forward)
    bound = signature.bind(module, *args, **kwargs)
    bound.apply_defaults()
    arguments = bound.arguments
    gemm = choose_gemm(module, unsupported(module, arguments))
    if gemm is None:
        return te_forward(module, *args, **kwargs)
    inp = arguments[list(signature.parameters)[1]]  # TE's `inp`
    with _te_forward_context(module, inp, num_gemms(module)) as x:
        return run(module, x, gemm, arguments)


def _fp8_io(module, arguments):
    if arguments.get("fp8_output") or arguments.get("fp8_grad"):
        return "TE's FP8 output / gradient tensors (fp8_output, fp8_grad)"
    return None


def _linear(module, x, gemm, arguments):
    total, comm = _column_input(module, x, gemm)
    out, bias = _linear_output(module, total, gemm, comm)
    return (out, bias) if getattr(module, "return_bias", False) else out


def _layernorm_linear(module, x, gemm, arguments):
    ln_out = te_normalization(module, x.to(_activation_dtype(module, x)))
    gathered_out = getattr(module, "return_layernorm_output", False) and getattr(
        module, "return_layernorm_output_gathered", False
    )  # the gathered norm output is returned: gathered here, not inside the op
    total, comm = _column_input(module, ln_out, gemm, total_needed=gathered_out)
    out, bias = _linear_output(module, total, gemm, comm)
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


def _grouped_linear(module, x, gemm, arguments):
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
        gemm(module, x_i, getattr(module, name), bias if apply_bias else None, step, i, dtype)
        for i, (x_i, name, bias, step) in enumerate(
            zip(torch.split(x2d, splits), names, biases, _weight_steps(module, gemm, dtype))
        )
    ]
    out = torch.cat(outs).view(-1, *x.shape[1:-1], outs[0].shape[-1])
    if return_bias:
        return out, [_returned_bias(b, dtype) for b in biases]
    return out


_FORWARDS = {  # TE class name -> (forward, unsupported-option check, number of GEMMs)
    "Linear": (_linear, _fp8_io, lambda module: 1),
    "LayerNormLinear": (_layernorm_linear, _fp8_io, lambda module: 1),
    "GroupedLinear": (_grouped_linear, _grouped_unsupported, lambda module: module.num_gemms),
}


def te_sparse_forward(module, te_class, *args, **kwargs):
    """TE `te_class.forward`'s contract on megasparse's GEMMs; TE's own forward when no route runs."""
    run, unsupported, num_gemms = _FORWARDS[te_class.__name__]
    return _route_or_te(module, te_class.forward, run, args, kwargs, unsupported, num_gemms)
