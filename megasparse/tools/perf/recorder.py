"""Record every aten op a piece of code runs, with FLOPs, bytes and which GEMM operand is sparse.

`OpRecorder` is a TorchDispatchMode, meant for `device="meta"` tensors (nothing is computed).
- GEMMs (mm, addmm, bmm, _scaled_mm, _cslt_sparse_mm): FLOPs = 2*M*N*K, counted dense-equivalent
  also when one operand is 2:4 (the speed-up is applied later, per device, by the perf model).
- Compact GEMMs (stand-ins of the gather/compact-GEMM kernels, registered in COMPACT_GEMMS): FLOPs
  = 2*M*N*K of the compact problem (K or N already 4/M of the dense one), sparse_operand COMPACT.
- Every other op is memory-bound: bytes read = the distinct elements of its tensor inputs,
  bytes written = its outputs. Views and allocations cost nothing.
- Ops of a semi-structured sparse tensor are not recorded themselves: the plain ops they run
  (`_cslt_compress`, `_cslt_sparse_mm`, ...) are.
- Phases: ops run inside `phase("weight_prep")`, and every op whose tensor inputs all derive from
  tensors given to `mark_weight` (the weight, its mask), count as per-optimizer-step weight
  preparation: the step state computes each such value once, so a repeat is recorded once.
"""

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

WEIGHT_PREP, MICROBATCH = "weight_prep", "microbatch"

# Kernels projected by FLOPs rather than bytes (e.g. flash attention): "ns::op" -> fn(args) -> FLOPs
COMPUTE_KERNELS = {}
# GEMM kernels over a compacted operand: "ns::op" -> fn(args) -> (M, N, K, input dtype) of the
# GEMM they really compute (the kept 4/M of the reduction or of the output columns)
COMPACT_GEMMS = {}
COMPACT = "compact"  # OpRecord.sparse_operand of a compact GEMM

_FREE = {
    aten.t,
    aten.transpose,
    aten.view,
    aten._unsafe_view,
    aten.reshape,
    aten.expand,
    aten.permute,
    aten.slice,
    aten.select,
    aten.unsqueeze,
    aten.squeeze,
    aten.as_strided,
    aten.alias,
    aten.detach,
    aten.empty,
    aten.empty_like,
    aten.new_empty,
    aten.empty_strided,
    aten.new_empty_strided,
    aten.lift_fresh,
    aten.split,
    aten.split_with_sizes,
    aten.chunk,
    aten.unbind,
    aten.narrow,
    aten._reshape_alias,
    aten.view_as,
    aten.expand_as,
}


@dataclass
class OpRecord:
    op: str
    phase: str
    kind: str  # "gemm", "memory" or "attention"
    flops: int
    bytes_read: int
    bytes_written: int
    sparse_operand: Optional[str] = None  # "A" of a 2:4 GEMM, COMPACT, None when dense
    dtype: Optional[torch.dtype] = None  # a GEMM's input dtype
    mnk: Optional[tuple] = None  # a GEMM's (M, N, K); M and N as in the output [M, N]
    label: str = ""  # the driver's name for the region (e.g. "fc1 fwd")

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a (possibly broadcast) tensor view covers."""
    numel = math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0)
    return numel * t.element_size()


def _tensors(tree):
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def _is_semi_structured(t) -> bool:
    return isinstance(t, torch.sparse.SparseSemiStructuredTensor)


def _gemm(func, args, kwargs, out):
    """(M, N, K, input dtype, sparse operand) of a GEMM op, or None if `func` is not one."""
    if func.name() in COMPACT_GEMMS:
        return (*COMPACT_GEMMS[func.name()](*args, **kwargs), COMPACT)
    packet = func._overloadpacket
    if packet in (aten.mm, aten._scaled_mm):
        a, b = args[0], args[1]
        return a.shape[0], b.shape[1], a.shape[1], a.dtype, None
    if packet == aten.addmm:
        a, b = args[1], args[2]
        return a.shape[0], b.shape[1], a.shape[1], a.dtype, None
    if packet == aten.bmm:
        a, b = args[0], args[1]
        return a.shape[0] * a.shape[1], b.shape[2], a.shape[2], a.dtype, None
    if packet == aten._cslt_sparse_mm:
        compressed, dense = args[0], args[1]
        k, n = dense.shape
        # the [m, ...] blob of _cslt_compress: m is its first dim, as torch's meta kernel reads it
        m = compressed.shape[0]
        return m, n, k, dense.dtype, "A"
    return None


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.records: list[OpRecord] = []
        self._phase = MICROBATCH
        self._label = ""
        self._weight_derived = {}  # id -> tensor (kept alive so ids stay unique)
        self._prep_done = set()  # keys of weight-only computations already recorded

    # --- what the driver tells us -----------------------------------------------------

    @contextlib.contextmanager
    def _setting(self, attribute: str, value):
        saved = getattr(self, attribute)
        setattr(self, attribute, value)
        try:
            yield
        finally:
            setattr(self, attribute, saved)

    def phase(self, name: str):
        """Ops recorded inside count as this phase (micro-batch, weight prep, ...)."""
        return self._setting("_phase", name)

    def label(self, name: str):
        """Ops recorded inside carry this label (the layer they belong to)."""
        return self._setting("_label", name)

    def mark_weight(self, *tensors) -> None:
        for t in tensors:
            self._weight_derived[id(t)] = t

    def is_weight_derived(self, t) -> bool:
        return id(t) in self._weight_derived

    # --- dispatch ----------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors((args, kwargs))
        sparse = [t for t in inputs if _is_semi_structured(t)]
        if sparse:  # record the plain ops the sparse tensor class runs, not its wrapper op
            with self:
                return type(sparse[0]).__torch_dispatch__(func, types, args, kwargs)
        if func.name() == "semi_structured::cusparselt_mm":
            out = self._run_python_body(func, args, kwargs)
            return out
        out = func(*args, **kwargs)
        outputs = _tensors(out)
        prep = self._phase == WEIGHT_PREP or (inputs and all(map(self.is_weight_derived, inputs)))
        if prep:
            self.mark_weight(*outputs)
            key = (
                func,
                tuple(id(t) for t in inputs),
                repr(
                    [a for a in tree_flatten((args, kwargs))[0] if not isinstance(a, torch.Tensor)]
                ),
            )
            if key in self._prep_done:
                return out  # the step state holds this value already
            self._prep_done.add(key)
        self._record(func, args, kwargs, inputs, out, outputs, WEIGHT_PREP if prep else MICROBATCH)
        return out

    def _run_python_body(self, func, args, kwargs):
        """PyTorch's cusparselt_mm custom op: run its Python body so _cslt_sparse_mm is recorded."""
        from torch._library.custom_ops import _maybe_get_opdef

        with self:
            return _maybe_get_opdef(func.name())._init_fn(*args, **kwargs)

    def _record(self, func, args, kwargs, inputs, out, outputs, phase):
        packet = func._overloadpacket
        if packet in _FREE:
            return
        name = str(packet).replace("aten.", "")
        gemm = _gemm(func, args, kwargs, out)
        if func.name() in COMPUTE_KERNELS:
            flops = COMPUTE_KERNELS[func.name()](*args)
            self.records.append(OpRecord(name, phase, "attention", flops, 0, 0, label=self._label))
            return
        read = sum(tensor_bytes(t) for t in (inputs[1:] if packet == aten.copy_ else inputs))
        written = sum(tensor_bytes(t) for t in outputs)
        if gemm is not None:
            m, n, k, dtype, sparse = gemm
            self.records.append(
                OpRecord(
                    name,
                    phase,
                    "gemm",
                    2 * m * n * k,
                    read,
                    written,
                    sparse,
                    dtype,
                    (m, n, k),
                    self._label,
                )
            )
        else:
            flops = sum(t.numel() for t in outputs)
            self.records.append(
                OpRecord(name, phase, "memory", flops, read, written, label=self._label)
            )
