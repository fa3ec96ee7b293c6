"""Projected rows for Megatron's Transformer Engine spec: sparse TE linears (bf16, FP8), each change before/after.

Every case runs megasparse's real ops (the "before" of a change: the same path without that
change) forward and backward on device="meta" under perfmodel's stand-ins and OpRecorder; the
roofline (megasparse.tools.perf.roofline) prices the records. Nothing here is a measurement.

What a case runs (`TeCase`):
- bf16 route "te_gemm": TE's own dense GEMM on W*M (W*M built once per step), the TE path without
  megasparse's sparse route; "cusparselt": megasparse's `sparse_linear_step` on cuSPARSELt with the roles
  the speed gate keeps sparse (projected: sparse where the table's speed-up is above 1);
- LayerNormLinear's norm: TE's fused kernel (one native_layer_norm each way, bf16 in and out), or
  a norm in eager fp32 ops with their autograd backward (`eager_norm`: x and gamma/beta up-cast,
  an fp32 layer_norm, the output rounded back), what a reimplementation outside TE's kernel runs;
- FP8 2:4: `megasparse.fp8.linear.fp8_sparse_linear_step` under Megatron's default delayed
  scaling (meta_model.delayed_plan) with main_grad fusion; `wgrad_temporary` keeps its fp32
  [out, in] weight gradient plus the add_ into main_grad, otherwise the GEMM accumulates into
  main_grad (TE's general_gemm(accumulate=True)): the add_ pass goes, the GEMM reads main_grad;
- 1d masks: `hold` False rebuilds W*M (unpack + multiply) in every backward (recorded there: the
  unpack's index tensor is made per call, so those ops are not weight-only); `rebuild_records`
  records that rebuild alone, for its bytes.
"""

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megasparse.config import SparsityConfig
from megasparse.core import linear_op as ops
from megasparse.core.backends import BACKENDS
from megasparse.core.weight_state import SparseWeightState
from megasparse.fp8 import linear as fp8_linear
from megasparse.tools.perf.models import REFERENCE, Recipe
from megasparse.tools.perf.recorder import COMPACT, WEIGHT_PREP, OpRecorder
from megasparse.tools.perf.roofline import DEVICES, op_time, sparse_speedup

BF16 = torch.bfloat16
TOKENS, K, TP = 16384, 4, 1  # the reference case: 16k tokens per micro-batch, k = 4
GATE_DENSE_TOKENS = 2048  # below the speed gate's 4096-token bucket: the gate keeps dense
BOUNDS = ("low", "mid", "high")
PARTS = ("fc1", "act", "fc2", "residual", "attention", "norm")
SCOPE_PARTS = {
    "ffn": ("fc1", "act", "fc2"),
    "layer": ("attention", "fc1", "act", "fc2", "residual"),
}
SPARSE_ROLES = ("forward", "input_grad")
# assumed gain of a searched cuSPARSELt algorithm over alg_id 0 on the sparse GEMMs. Source of the
# range: bcacdwk/vllmbench's per-shape H100 tables list different best algorithms per shape, with
# gaps up to about 1.5x; most large shapes sit near the default, so the projection takes 1.05x.
ALG_SEARCH_GAIN = 1.05


@dataclass(frozen=True)
class TeCase:
    """One way a TE-spec FFN runs (see the module docstring)."""

    weights: Optional[str] = None  # None (dense), "1d", "transposable"
    fp8: bool = False
    route: str = "cusparselt"  # bf16: "te_gemm" (TE's dense GEMM on W*M) or "cusparselt"
    roles: tuple = SPARSE_ROLES  # the GEMM roles the speed gate keeps sparse
    hold: Optional[bool] = None  # 1d: W*M held for the dgrad (None: SparsityConfig's default)
    eager_norm: bool = False
    wgrad_temporary: bool = False


def gate_roles(device, tokens, bound="mid", dtype=BF16) -> tuple:
    """The roles the speed gate keeps sparse, projected: where the table's speed-up is above 1."""
    return SPARSE_ROLES if sparse_speedup(device, dtype, tokens, bound) > 1.0 else ()


def _meta(*shape, dtype=BF16, grad=False):
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)


def layernorm(rec, x, eager: bool):
    """LayerNormLinear's norm (Megatron's default LayerNorm): TE's fused kernel, or the eager fp32
    reimplementation."""
    hidden = x.shape[-1]
    gamma, beta = _meta(hidden, grad=True), _meta(hidden, grad=True)
    rec.mark_weight(gamma, beta)
    if not eager:
        return F.layer_norm(x, (hidden,), gamma, beta)
    up = (gamma.to(x.dtype).float(), beta.to(x.dtype).float())
    return F.layer_norm(x.float(), (hidden,), *up, 1e-5).to(x.dtype)


def _bf16_state(case: TeCase, weight):
    sparsity = SparsityConfig(
        weights="2:4" if case.weights else None,
        mask=case.weights or "1d",
        hold_backward_weight=case.hold,
    )
    backend = BACKENDS["dense" if case.route == "te_gemm" else "cusparselt"]
    step = SparseWeightState().step(weight, sparsity, backend)
    if step.pruned and case.route == "te_gemm":
        step.dense()  # W*M, the operand of TE's own GEMMs, once per step
    elif step.pruned:  # every operand the step holds, built here as at the step's first use
        if "forward" in case.roles:
            step.compressed()
        else:  # the gate's dense forward on W*M, held for the step
            step.dense(hold=True)
        if step.transposable and step.hold_backward and "input_grad" in case.roles:
            step.compressed_t()
    plan = ops.LinearPlan(
        backend=backend,
        transposable=case.weights == "transposable",
        sparse_weight_roles=case.roles if case.route == "cusparselt" else (),
    )
    return step, plan


def linear(rec, case: TeCase, x, out_features: int):
    """One sparse (or dense) TE linear of the case on x [tokens, in]; its per-step state in the
    weight-prep phase."""
    weight = _meta(out_features, x.shape[-1], grad=True)
    rec.mark_weight(weight)
    if case.fp8:
        if case.weights is None:  # TE's FP8 dense linear (perfmodel's stand-in)
            from megasparse.tools.perf import meta_model

            with rec.phase(WEIGHT_PREP):
                state = meta_model._fp8_cast(weight)
            return meta_model._Fp8DenseLinear.apply(x, weight, *state)
        from megasparse.tools.perf.meta_model import delayed_plan

        # Megatron's fp32 main_grad, allocated once (not a per-micro-batch op)
        weight.main_grad = torch.empty(weight.shape, dtype=torch.float32, device="meta")
        with rec.phase(WEIGHT_PREP):
            step = SparseWeightState().step(
                weight, SparsityConfig(weights="2:4", mask=case.weights), BACKENDS["cusparselt"]
            )
            fp8_linear.fp8_weight(step, use_cusparselt=True)
        plan = dataclasses.replace(delayed_plan(x.device), gradient_accumulation_fusion=True)
        return fp8_linear.fp8_sparse_linear_step(x, weight, None, step, plan)
    with rec.phase(WEIGHT_PREP):
        step, plan = _bf16_state(case, weight)
    return ops.sparse_linear_step(x, weight, None, step, plan)


def _recorded(build) -> OpRecorder:
    from megasparse.tools.perf.meta_model import _standins

    rec = OpRecorder()
    with _standins(), rec:
        out = build(rec)
        out.backward(torch.empty_like(out))
    return rec


def rebuild_records(case: TeCase, rows: int, cols: int):
    """A 1d dgrad's W*M rebuild (unpack + multiply) of one [rows, cols] weight, the ops each
    backward runs where W*M is not held; [] where the case holds it (or has no such rebuild)."""
    if case.fp8 or case.weights != "1d" or case.hold is not False or case.route == "te_gemm":
        return []
    from megasparse.tools.perf.meta_model import _standins

    rec = OpRecorder()
    with _standins():
        step, _ = _bf16_state(case, _meta(rows, cols, grad=True))
        with rec:
            step.dense(False)
    return rec.records


def _accumulate_in_gemm(records, main_grad_bytes: int):
    """The wgrad GEMM accumulating into main_grad: the add_ of the fp32 [out, in] temporary into
    main_grad goes; the wgrad GEMM reads main_grad instead (it writes it as it wrote the temporary)."""
    out = list(records)
    adds = [i for i, r in enumerate(out) if r.op == "add_" and r.bytes == 3 * main_grad_bytes]
    gemms = [
        i
        for i, r in enumerate(out)
        if r.op == "_scaled_mm" and r.mnk[0] * r.mnk[1] * 4 == main_grad_bytes
    ]
    if len(adds) != 1 or len(gemms) != 1:
        raise RuntimeError(
            "te_spec: expected one fp32 wgrad GEMM and one add_ into main_grad per FP8 weight "
            f"({len(gemms)} GEMMs, {len(adds)} add_ found); the recorded FP8 path changed"
        )
    gemm = out[gemms[0]]
    out[gemms[0]] = dataclasses.replace(gemm, bytes_read=gemm.bytes_read + main_grad_bytes)
    del out[adds[0]]
    return out


@functools.lru_cache(maxsize=None)
def te_records(case: TeCase, part: str, tokens: int = TOKENS, tp: int = TP, shape=REFERENCE):
    """Records of one part of a TE-spec layer, per rank: "fc1" (LayerNormLinear: norm + linear),
    "act" (squared ReLU), "fc2", "residual" (the FFN's), "attention" (norm + QKV, flash
    attention, proj, residual), "norm" (a norm alone)."""
    hidden, ffn = shape.hidden, shape.ffn // tp
    if part == "fc1":
        rec = _recorded(
            lambda r: linear(
                r, case, layernorm(r, _meta(tokens, hidden, grad=True), case.eager_norm), ffn
            )
        )
    elif part == "fc2":
        rec = _recorded(lambda r: linear(r, case, _meta(tokens, ffn, grad=True), hidden))
    elif part == "act":
        from megatron.core.activations import squared_relu

        rec = _recorded(lambda r: squared_relu(_meta(tokens, ffn, grad=True)))
    elif part == "norm":  # the local spec's own norm before its fc1 (the same fused kernel)
        rec = _recorded(lambda r: layernorm(r, _meta(tokens, hidden, grad=True), case.eager_norm))
    elif part == "residual":
        rec = _recorded(lambda r: _meta(tokens, hidden, grad=True) + _meta(tokens, hidden))
    elif part == "attention":
        from megasparse.tools.perf.meta_model import _attention_block

        def build(r):
            x = _meta(tokens, hidden, grad=True)
            return x + _attention_block(r, Recipe(fp8=case.fp8), layernorm(r, x, False), tp, shape)

        rec = _recorded(build)
    else:
        raise ValueError(f"unknown part {part!r}: one of {', '.join(PARTS)}")
    records = list(rec.records)
    if part in ("fc1", "fc2") and case.fp8 and case.weights and not case.wgrad_temporary:
        records = _accumulate_in_gemm(records, hidden * ffn * 4)  # main_grad: fp32 [out, in]
    return tuple(records)


# --- pricing ----------------------------------------------------------------------------------


def priced(records, device, bound="mid", alg_gain=1.0):
    """(prep seconds once per step, seconds per micro-batch); cuSPARSELt GEMMs / alg_gain."""
    prep = micro = 0.0
    for r in records:
        t = op_time(r, device, bound)
        if r.kind == "gemm" and r.sparse_operand not in (None, COMPACT):
            t /= alg_gain
        if r.phase == WEIGHT_PREP:
            prep += t
        else:
            micro += t
    return prep, micro


def step_ms(records, device="H100", bound="mid", k=K, alg_gain=1.0) -> float:
    """Projected ms of one optimizer step's share of these records: prep + k micro-batches."""
    dev = DEVICES[device] if isinstance(device, str) else device
    prep, micro = priced(records, dev, bound, alg_gain)
    return (prep + k * micro) * 1e3


def case_records(case: TeCase, scope="ffn", tokens=TOKENS, tp=TP):
    """All records of the case's FFN or layer (`SCOPE_PARTS`)."""
    return [r for part in SCOPE_PARTS[scope] for r in te_records(case, part, tokens, tp)]


def local_records(recipe: Recipe, scope="ffn", tokens=TOKENS, tp=TP):
    """The local spec's FFN (with its own fused norm before fc1) or layer, as perfmodel records it."""
    from megasparse.tools.perf.meta_model import record_case

    records = list(record_case(recipe, scope, tokens, tp).records)
    if scope == "ffn":
        records += te_records(TeCase(route="te_gemm"), "norm", tokens, tp)
    return records


def te_cases(weights, device, tokens, bound):
    """(TE dense, before: TE's dense GEMM on W*M, after: cuSPARSELt where the gate keeps sparse)."""
    roles = gate_roles(DEVICES[device], tokens, bound)
    hold = True if weights == "1d" else None  # the 1d default: W*M held for the dgrad
    return (
        TeCase(route="te_gemm"),
        TeCase(weights, route="te_gemm"),
        TeCase(weights, roles=roles, hold=hold),
    )


def _row(section, device, bound, **values):
    return {"section": section, "projected": True, "device": device, "bound": bound, **values}


def _ratio(base, value):
    return base / value if value else float("inf")


# --- rows ----------------------------------------------------------------------------------


def bf16_rows(device="H100", bounds=BOUNDS, tokens_list=(TOKENS, GATE_DENSE_TOKENS), k=K):
    """TE spec bf16 2:4 FFN (and layer at >= seq tokens) vs TE dense: before (TE's dense GEMM on
    W*M), after (cuSPARSELt where the gate keeps sparse), the local spec's row, and the case the
    gate keeps dense (`forced_dense_ms`: only the per-step preparation paid)."""
    out = []
    for weights in ("1d", "transposable"):
        for tokens in tokens_list:
            for scope in ("ffn", "layer") if tokens >= REFERENCE.seq else ("ffn",):
                for bound in bounds:
                    dense, before, after = te_cases(weights, device, tokens, bound)
                    forced = dataclasses.replace(after, roles=())
                    ms = {
                        name: step_ms(case_records(c, scope, tokens), device, bound, k)
                        for name, c in (
                            ("te_dense", dense),
                            ("before", before),
                            ("after", after),
                            ("forced_dense", forced),
                        )
                    }
                    local = step_ms(local_records(Recipe(weights), scope, tokens), device, bound, k)
                    out.append(
                        _row(
                            "te_bf16",
                            device,
                            bound,
                            weights=weights,
                            scope=scope,
                            tokens=tokens,
                            tp=TP,
                            microbatches=k,
                            gate_roles=list(after.roles),
                            **{f"{n}_ms": v for n, v in ms.items()},
                            local_ms=local,
                            before_vs_te_dense=_ratio(ms["te_dense"], ms["before"]),
                            after_vs_te_dense=_ratio(ms["te_dense"], ms["after"]),
                            local_vs_te_dense=_ratio(ms["te_dense"], local),
                            forced_dense_vs_te_dense=_ratio(ms["te_dense"], ms["forced_dense"]),
                            after_vs_local=_ratio(local, ms["after"]),
                        )
                    )
    return out


def fp8_cases(weights):
    """name -> TeCase: FP8 dense, before (eager norm + fp32 wgrad temporary), each change alone,
    after (TE's fused norm, in-GEMM accumulation)."""
    return {
        "fp8_dense": TeCase(fp8=True),
        "before": TeCase(weights, fp8=True, eager_norm=True, wgrad_temporary=True),
        "fused_norm_only": TeCase(weights, fp8=True, wgrad_temporary=True),
        "accumulate_only": TeCase(weights, fp8=True, eager_norm=True),
        "after": TeCase(weights, fp8=True),
    }


def fp8_rows(device="H100", bounds=BOUNDS, tokens=TOKENS, k=K):
    """TE spec FP8 2:4 vs FP8 dense per part (fc1 = LayerNormLinear, fc2) and FFN."""
    out = []
    for weights in ("1d", "transposable"):
        for bound in bounds:
            cases = fp8_cases(weights)
            part_ms = {
                (name, part): step_ms(te_records(c, part, tokens), device, bound, k)
                for name, c in cases.items()
                for part in SCOPE_PARTS["ffn"]
            }
            row = _row(
                "te_fp8", device, bound, weights=weights, tokens=tokens, tp=TP, microbatches=k
            )
            for name in cases:
                ffn = sum(part_ms[(name, p)] for p in SCOPE_PARTS["ffn"])
                row[f"{name}_ffn_ms"] = ffn
                row[f"{name}_fc1_ms"] = part_ms[(name, "fc1")]
                row[f"{name}_fc2_ms"] = part_ms[(name, "fc2")]
                if name != "fp8_dense":
                    row[f"{name}_vs_fp8_dense"] = _ratio(row["fp8_dense_ffn_ms"], ffn)
                    row[f"{name}_fc1_vs_fp8_dense"] = _ratio(
                        part_ms[("fp8_dense", "fc1")], part_ms[(name, "fc1")]
                    )
            out.append(row)
    return out


def _norm_ms(eager, device, bound, tokens=TOKENS):
    """(forward ms, backward ms, GB moved) of LayerNormLinear's norm per micro-batch."""
    records = te_records(TeCase(eager_norm=eager), "norm", tokens)
    dev = DEVICES[device]
    # the backward's ops come after the last forward op: the norm's output cast (eager) or the
    # fused kernel itself
    split = next(i for i, r in enumerate(records) if "backward" in r.op)
    if eager:
        split -= 1  # the bf16 -> fp32 copy of the incoming gradient precedes the norm's backward
    micro = [r for r in records if r.phase != WEIGHT_PREP]
    first = [r for r in records[:split] if r.phase != WEIGHT_PREP]
    fwd = sum(op_time(r, dev, bound) for r in first) * 1e3
    total = sum(op_time(r, dev, bound) for r in micro) * 1e3
    return fwd, total - fwd, sum(r.bytes for r in micro) / 1e9


def change_rows(device="H100", bounds=BOUNDS, k=K):
    """Each change before/after at the reference FFN (16k tokens, TP 1, k = 4), per bound."""
    shape, out = REFERENCE, []
    weight_elems = shape.ffn * shape.hidden
    for bound in bounds:
        dense, before, after = te_cases("transposable", device, TOKENS, bound)
        for name, b, a, unit in (
            ("bf16 sparse TE linears (transposable)", before, after, "FFN step ms"),
        ):
            out.append(
                _row(
                    "change",
                    device,
                    bound,
                    change=name,
                    unit=unit,
                    before=step_ms(case_records(b), device, bound, k),
                    after=step_ms(case_records(a), device, bound, k),
                )
            )
        eager, fused = _norm_ms(True, device, bound), _norm_ms(False, device, bound)
        out.append(
            _row(
                "change",
                device,
                bound,
                change="FP8 LayerNormLinear: TE's fused norm",
                unit="norm ms per micro-batch (fwd + bwd)",
                before=eager[0] + eager[1],
                after=fused[0] + fused[1],
                before_forward_ms=eager[0],
                before_backward_ms=eager[1],
                after_forward_ms=fused[0],
                after_backward_ms=fused[1],
                before_gb=eager[2],
                after_gb=fused[2],
            )
        )
        fp8 = fp8_cases("transposable")
        temp = step_ms(te_records(fp8["fused_norm_only"], "fc1"), device, bound, 1)
        accum = step_ms(te_records(fp8["after"], "fc1"), device, bound, 1)
        out.append(
            _row(
                "change",
                device,
                bound,
                change="FP8 wgrad accumulates into main_grad in the GEMM",
                unit="fc1 ms per micro-batch",
                before=temp,
                after=accum,
                temporary_gb=weight_elems * 4 / 1e9,
                add_pass_gb=3 * weight_elems * 4 / 1e9,
                extra_traffic_gb=2 * weight_elems * 4 / 1e9,
            )
        )
        rebuild = TeCase("1d", hold=False, roles=gate_roles(DEVICES[device], TOKENS, bound))
        held = dataclasses.replace(rebuild, hold=True)
        rebuild_gb = sum(r.bytes for r in rebuild_records(rebuild, shape.ffn, shape.hidden)) / 1e9
        out.append(
            _row(
                "change",
                device,
                bound,
                change="1d masks hold W*M for the dgrad",
                unit="FFN ms per micro-batch",
                before=step_ms(case_records(rebuild), device, bound, 1)
                - step_ms(
                    [r for r in case_records(rebuild) if r.phase == WEIGHT_PREP], device, bound, 1
                ),
                after=step_ms(case_records(held), device, bound, 1)
                - step_ms(
                    [r for r in case_records(held) if r.phase == WEIGHT_PREP], device, bound, 1
                ),
                rebuild_gb_per_weight=rebuild_gb,
                state_gb_per_ffn=2 * weight_elems * 2 / 1e9,
                dense_weights_gb_per_ffn=2 * weight_elems * 2 / 1e9,
            )
        )
        for label, case in (("bf16 (transposable)", after), ("FP8 (transposable)", fp8["after"])):
            records = case_records(case)
            out.append(
                _row(
                    "change",
                    device,
                    bound,
                    change=f"cuSPARSELt algorithm search, {label}",
                    unit="FFN step ms",
                    before=step_ms(records, device, bound, k),
                    after=step_ms(records, device, bound, k, ALG_SEARCH_GAIN),
                    assumed_gain=ALG_SEARCH_GAIN,
                )
            )
    for row in out:
        row["gain"] = _ratio(row["before"], row["after"])
    return out


ACTIVATION_RECIPES = (Recipe("1d", "2:4"), Recipe("transposable", "64:2:16"))


def activation_rows(device="H100", bounds=BOUNDS, k=K):
    """Activation sparsity with the TE spec: the SparseMLP's GEMMs (the same op as the local spec)
    after TE's fused norm, vs TE dense; before: refused by the TE linears."""
    out = []
    for recipe in ACTIVATION_RECIPES:
        for bound in bounds:
            dense = step_ms(local_records(Recipe()), device, bound, k)
            sparse = step_ms(local_records(recipe), device, bound, k)
            out.append(
                _row(
                    "te_activation",
                    device,
                    bound,
                    recipe=recipe.name,
                    tokens=TOKENS,
                    tp=TP,
                    microbatches=k,
                    before="refused by the TE linears",
                    te_dense_ms=dense,
                    after_ms=sparse,
                    after_vs_te_dense=_ratio(dense, sparse),
                    local_vs_dense=_ratio(dense, sparse),
                )
            )
    return out
