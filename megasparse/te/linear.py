"""Sparse Transformer Engine linears: under any FP8 recipe, TE quantizes the 2:4-masked weight.

TE's Linear, LayerNormLinear and GroupedLinear take their weights from `_get_weight_tensors()`;
the sparse classes return this optimizer step's W*M there (megasparse.core.weight_state: built once
per step, through `masked_weight`, so the dense master weight gets the gradient of the chosen
mode). Everything else - the FP8 recipe (delayed, current/tensorwise, blockwise, MXFP8), amax
bookkeeping, communication, checkpoints - stays TE's and Megatron's.

gradient_accumulation_fusion (Megatron's default with TE): TE accumulates dY^T X of W*M into
main_grad, which is the ste gradient of the dense weight; "masked" and "srste" are then applied
to main_grad by the step's gradient rule (megasparse.core.gradients: masked after each
micro-batch, srste once per step).

    SparseTEColumnParallelLinear, SparseTERowParallelLinear, SparseTELayerNormColumnParallelLinear
are built on first access from Megatron's TE classes (Transformer Engine must be installed);
`sparse_te_class(base)` makes the sparse variant of any such class. Not supported (clear errors):
TE without `_get_weight_tensors` (before 2.5: it would silently train dense), held masks
(mask_refresh_interval > 1: TE's `_extra_state` holds its FP8 metadata, so there is no checkpoint
entry for them), FP8 primary weights (fp8_model_init), and TE's delayed wgrad
(delay_wgrad_compute: TE's backward_dw writes .grad onto the tensor it computed with, W*M, not
onto the master weight). The GEMMs (megasparse.te.forward chooses per call): under fp8_autocast
with a per-tensor recipe on sm90, TE's `Linear` (column/row-parallel linears), `LayerNormLinear`
(fc1, qkv: TE's norm, then the GEMM) and `GroupedLinear` (MoE experts: one GEMM per expert weight)
run the forward and (transposable masks) input-gradient GEMMs as FP8 2:4 cuSPARSELt GEMMs, other
FP8 recipes TE's FP8 GEMM on W*M; without FP8 they run the bf16/fp16 2:4 GEMMs on cuSPARSELt
(megasparse.te.sparse_route), except under TE's userbuffers overlap (--tp-comm-overlap), where
TE's dense GEMM runs on W*M (`userbuffers_overlap`); in a dense phase TE's forward runs unchanged.

Activation sparsity (SparseMLP over the TE spec's linears): Megatron's TERowParallelLinear as fc2
takes the activation-input side and TE*ColumnParallelLinear as fc1 the feeding side
(megasparse.megatron.activation_input, shared with the local linears); both are then sparse now,
so the bf16/fp16 route (megasparse.te.sparse_route) runs with the sparse activation as fc2's GEMM
operand and the sparse dH as the operand of fc1's input gradient. Refused with the fix: FP8 (the
config's fp8 at construction, TE's fp8_autocast at forward), TE's userbuffers overlap.
"""

import functools

from megasparse.core.backends import BACKENDS
from megasparse.core.linear_op import masked_weight
from megasparse.core.weight_state import SparseWeightState, refuse_graph_capture
from megasparse.core.sparse_module import SparseModuleMixin
from megasparse.fp8.scaling import quantized_weight
from megasparse.megatron.activation_input import (
    FeedsSparseActivation,
    LinearActivationRole,
    SparseActivationInput,
)
from megasparse.megatron.tp_group import weight_tp_group
from megasparse.te.userbuffers import userbuffers_overlap

_TE_BASES = {
    "SparseTEColumnParallelLinear": "TEColumnParallelLinear",
    "SparseTERowParallelLinear": "TERowParallelLinear",
    "SparseTELayerNormColumnParallelLinear": "TELayerNormColumnParallelLinear",
}


class _SparseTEMixin(LinearActivationRole, SparseModuleMixin):
    def _setup_sparse_te(self, sparsity):
        self._take_sparsity(sparsity)
        if self.sparsity.fp8 is not None:
            raise ValueError(
                f"megasparse: SparsityConfig(fp8={self.sparsity.fp8!r}) is the local spec's FP8 "
                "path; sparse TE linears follow Transformer Engine's fp8_autocast (Megatron's "
                "--fp8-format), which runs their FP8 2:4 GEMMs. Set fp8=None (drop --sparsity-fp8)."
            )
        if self.sparsity.mask_refresh_interval != 1:
            raise ValueError(
                "megasparse: sparse TE linears cannot hold masks across steps: held masks must go into the "
                "checkpoint, and TE's _extra_state entry carries TE's FP8 metadata. Use mask_refresh_interval=1 "
                "(masks are still computed once per optimizer step), or the local spec for held masks."
            )
        if not hasattr(super(), "_get_weight_tensors"):
            raise NotImplementedError(
                "megasparse: this Transformer Engine has no _get_weight_tensors (TE < 2.5), so a sparse TE "
                "linear would silently train dense. Upgrade Transformer Engine to 2.5 or newer, or use the "
                "local spec (--transformer-impl local)."
            )
        if (
            getattr(self, "wgrad_store", None) is not None
            and getattr(self.wgrad_store, "delay_wgrad_compute", lambda: False)()
        ):
            raise NotImplementedError(
                "megasparse: sparse TE linears do not support delay_wgrad_compute (TE's delayed wgrad writes "
                "the gradient onto W*M, not onto the dense master weight); disable it for sparse layers."
            )
        self.weight_states = [
            SparseWeightState(mask_source=quantized_weight, process_group=weight_tp_group)
            for _ in self._sparse_weight_names()
        ]
        for name in self._sparse_weight_names():
            weight = getattr(self, name)
            if self.sparsity.weights is not None:
                rows, cols = weight.shape
                if cols % 4 or (self.sparsity.mask == "transposable" and rows % 4):
                    raise ValueError(
                        f"megasparse: a sparse TE linear needs its weight shard {tuple(weight.shape)} cut into "
                        "2:4 groups: input size per rank a multiple of 4 (and output size for transposable)"
                    )

    def _setup_te_role(self, comm_name) -> None:
        """The setup of the layer's FFN role (fc2: its activation input), after _setup_sparse_te."""

    def _sparse_now(self) -> bool:
        """Whether some GEMM of this layer is sparse now (megasparse.te.forward then runs its route;
        else TE's own forward, exactly): a pruned weight, or a sparse activation as its input (fc2)
        or its output gradient (fc1)."""
        return self.sparsity.prunes_weights or self._sparse_input_now()

    def _sparse_weight_names(self):
        if hasattr(self, "num_gemms"):  # TE GroupedLinear: weight0 .. weight{n-1}
            return [f"weight{i}" for i in range(self.num_gemms)]
        return ["weight"]

    def weight_steps(self, backend=None):
        """This optimizer step's WeightStep of each weight, for GEMMs on `backend` (None: the dense
        backend, for TE's own GEMMs on W*M and the FP8 route)."""
        backend = BACKENDS["dense"] if backend is None else backend
        return [
            state.step(getattr(self, name), self.sparsity, backend)
            for state, name in zip(self.weight_states, self._sparse_weight_names())
        ]

    def _refuse_graph_capture(self) -> None:
        """What every forward checks before any route: no CUDA graph capture of a phase decided in
        Python, and (an activation-sparse FFN) no TE fp8_autocast."""
        refuse_graph_capture(
            getattr(self, self._sparse_weight_names()[0]), *self._capture_configs()
        )
        if self._sparse_input_now() and _te_fp8_autocast_on():
            raise NotImplementedError(_fp8_activation_refusal(self, "TE's fp8_autocast is on"))

    def _get_weight_tensors(self):
        self._refuse_graph_capture()  # before the dense shortcut
        weights = super()._get_weight_tensors()
        if not self.sparsity.prunes_weights:
            return weights
        for w in weights:
            if type(w).__name__ != "Parameter" and hasattr(w, "dequantize"):
                raise NotImplementedError(
                    "megasparse: FP8 primary weights (fp8_model_init) cannot be pruned; "
                    "keep high-precision master weights for sparse TE linears"
                )
        return [masked_weight(step) for step in self.weight_steps()]

    def sparse_weights(self) -> list:
        states = getattr(self, "weight_states", None) or []  # (none yet while constructed)
        return [(getattr(self, name), s) for name, s in zip(self._sparse_weight_names(), states)]


def _te_fp8_autocast_on() -> bool:
    from megasparse.te.fp8_route import te_fp8_state

    return te_fp8_state()[0]


def _fp8_activation_refusal(module, why: str) -> str:
    return (
        f"megasparse: activation sparsity (activations={_activation_config(module).activations!r}) "
        f"does not run under FP8 in Transformer Engine linears ({type(module).__name__}: {why}): "
        "the sparse activation is a bf16/fp16 GEMM operand. Train without FP8 (drop --fp8-format / "
        "config.fp8, no fp8_autocast), or set activations=None (--sparsity-activations none) to keep "
        "FP8 with 2:4 weights."
    )


def _activation_config(module):
    """The config whose activations this layer serves: its own (fc2), or its fc2's (fc1)."""
    fed = getattr(module, "_fed_fc2", lambda: None)()
    return module.sparsity if fed is None else fed.sparsity


def _refuse_activation_sparsity_here(module) -> None:
    """Construction checks of a TE linear in an activation-sparse FFN: no FP8, no userbuffers."""
    if getattr(getattr(module, "config", None), "fp8", None):
        reason = f"config.fp8={module.config.fp8!r}"
        raise NotImplementedError(_fp8_activation_refusal(module, reason))
    overlapped = userbuffers_overlap(module)
    if overlapped:
        raise NotImplementedError(
            f"megasparse: activation sparsity needs the sparse activation as a GEMM operand, but "
            f"{type(module).__name__} fuses its GEMM with TE's userbuffers communication "
            f"({', '.join(overlapped)}). Turn off --tp-comm-overlap (config.tp_comm_overlap=False), "
            "or set activations=None (--sparsity-activations none)."
        )


class _TEActivationInput(SparseActivationInput):
    """A sparse TE row-parallel linear as an FFN's fc2: its GEMM input is the sparse activation."""

    def _setup_te_role(self, comm_name) -> None:
        columns = self.weight.shape[1]
        tp = getattr(self, "tp_size", 1) or 1
        self._setup_activation_input(
            ffn_size=columns * tp, columns_per_rank=columns, tp=tp, comm_name=comm_name
        )
        if self.sparsity.activations is not None:
            _refuse_activation_sparsity_here(self)


class _TEFeedsActivation(FeedsSparseActivation):
    """A sparse TE column-parallel linear as an FFN's fc1: its dH may arrive sparse."""

    def feeds_sparse_activation_of(self, fc2) -> None:
        super().feeds_sparse_activation_of(fc2)
        if fc2.sparsity.activations is not None:
            _refuse_activation_sparsity_here(self)


def _activation_role(base: type) -> tuple:
    """The activation side of Megatron's TE class: row-parallel (fc2) or column-parallel (fc1) over
    TE's Linear / LayerNormLinear. None for grouped linears (MoE experts: SparseTEGroupedMLP runs
    their activation) and for classes without TE's linear underneath."""
    te_linear = _te_linear_class(base)
    if te_linear is None or te_linear.__name__ == "GroupedLinear":
        return ()
    names = [cls.__name__ for cls in base.__mro__]
    if any("RowParallel" in name for name in names):
        return (_TEActivationInput,)
    if any("ColumnParallel" in name for name in names):
        return (_TEFeedsActivation,)
    return ()


_TE_LINEAR_CLASSES = (
    "Linear",
    "LayerNormLinear",
    "GroupedLinear",
)  # megasparse.te.forward's forwards


def _te_linear_class(base: type):
    """TE's own Linear, LayerNormLinear or GroupedLinear in base's MRO (Megatron's TE wrappers), or
    None."""
    for cls in base.__mro__:
        if (
            cls.__name__ in _TE_LINEAR_CLASSES
            and cls.__module__.split(".")[0] == "transformer_engine"
        ):
            return cls
    return None


@functools.lru_cache(maxsize=None)
def _forward_hook(te_linear: type) -> type:
    """A subclass of TE's class whose forward runs megasparse.te.forward (its routes) when one applies.
    Placed right above TE's class in the MRO, so Megatron's wrapper calls it as TE's forward."""

    def forward(self, *args, **kwargs):
        from megasparse.te.forward import te_sparse_forward

        self._refuse_graph_capture()
        return te_sparse_forward(self, te_linear, *args, **kwargs)

    name = "_Megasparse" + te_linear.__name__
    return type(name, (te_linear,), {"forward": forward, "__module__": __name__})


@functools.lru_cache(maxsize=None)
def sparse_te_class(base: type) -> type:
    """The sparse variant of a TE linear class (same constructor plus `sparsity=`)."""

    def __init__(self, *args, sparsity=None, **kwargs):
        base.__init__(self, *args, **kwargs)
        self._setup_sparse_te(sparsity)
        self._setup_te_role(kwargs.get("tp_comm_buffer_name"))

    name = "Sparse" + base.__name__
    te_linear = _te_linear_class(base)
    hook = (_forward_hook(te_linear),) if te_linear is not None else ()
    bases = _activation_role(base) + (_SparseTEMixin, base) + hook
    return type(name, bases, {"__init__": __init__, "__module__": __name__, "__qualname__": name})


def __getattr__(name):
    if name in _TE_BASES:
        from megatron.core.extensions import transformer_engine as mcore_te

        base = (
            getattr(mcore_te, _TE_BASES[name], None)
            if getattr(mcore_te, "HAVE_TE", False)
            else None
        )
        if not isinstance(base, type):
            raise ImportError(
                f"megasparse.te.linear.{name} needs Transformer Engine >= 2.5 (pip install -e "
                "'.[te]' in the clone, or pip install 'transformer-engine[pytorch]>=2.5')"
            )
        return sparse_te_class(base)
    raise AttributeError(f"module 'megasparse.te.linear' has no attribute {name!r}")
