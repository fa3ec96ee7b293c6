"""Which operand of a GEMM is 2:4, made explicit: names for the GEMM roles and a 2:4 tensor marker.

A GEMM has at most one sparse operand. The ops module names it when it calls a backend, preferring
the pruned weight (compressed once per optimizer step) over a runtime operand (compressed per call):
    WEIGHT       the pruned weight W*M (forward), or its transpose (input gradient, transposable masks)
    ACTIVATION   a 2:4 FFN activation, the input of fc2
    GRAD_OUTPUT  dH, the gradient of a 2:4 activation, in fc1's input-gradient GEMM dX = dH W1
    None         a dense GEMM

Activations and their gradients are runtime tensors, so they carry the fact themselves: the
sparsifier marks what it produced as `SparseActivation` with its (V, M) pattern (a thin tensor
subclass, in the spirit of xformers' Sparse24Tensor); M == 4 is 2:4, a sparse GEMM operand. With
M >= 8 the mark also carries the tensor's compact form (megasparse.core.compact_activation), which
the gather GEMMs read instead of the dense values. The mark must not outlive the values it vouches
for; the compact form lives and dies with it. It costs a Python check on each torch call that
takes a marked tensor (about a microsecond; no host sync, nothing tensor-sized):
- any torch operation on a marked tensor returns a plain tensor (no subclass propagation), so a
  sum, a rescale or a reshape is no longer marked;
- an in-place change bumps the tensor's version counter (shared with its views and detach()),
  which `sparse_pattern` checks;
- the marked tensor forgets its mark when it is written in place, when its `.data` is read or
  assigned (`t.data.add_(1)`, `t.data = other`), and when its memory is handed out
  (`untyped_storage()`, `storage()`, `numpy()`, `__dlpack__`, `__array__`): each is a way to
  write it that bypasses the version counter. Inference tensors (torch.inference_mode) have no
  version counter: they are marked too, and lose the mark by this rule alone.
Limits: a write that does not go through the marked tensor itself is not seen: through the
`.data` or the storage of a view or detach() of it, through another tensor set to its storage
(`other.set_(t)`), through raw pointers (`data_ptr()`, `torch.utils.dlpack.to_dlpack`, CUDA IPC,
custom kernels), and, inside torch.inference_mode, an in-place write through a view of it. Such
a write between the sparsifier and fc2 leaves the tensor marked: fc2 does not sparsify it again,
and a sparse backend takes it as 2:4. Make a new tensor instead of writing into the activation.
"""

import torch

from megasparse.config import ActivationPattern

WEIGHT, ACTIVATION, GRAD_OUTPUT = "weight", "activation", "grad_output"

# methods and properties that hand out a way to write a tensor's memory without its version counter
_ESCAPES = frozenset(
    {"data", "untyped_storage", "storage", "_typed_storage", "numpy", "__dlpack__", "__array__"}
)
_IN_PLACE_DUNDERS = frozenset(
    "__setitem__ __iadd__ __isub__ __imul__ __itruediv__ __ifloordiv__ __imod__ __ipow__ "
    "__imatmul__ __iand__ __ior__ __ixor__ __ilshift__ __irshift__".split()
)


def _hands_out_or_writes(func, kwargs) -> bool:
    """Whether `func` may write its tensor arguments, or hand out their memory."""
    name = getattr(func, "__name__", "")
    if name == "__get__" or name == "__set__":  # a property: t.data, t.shape, ...
        name = getattr(getattr(func, "__self__", None), "__name__", "")
    name = name.partition(".")[0]  # torch.ops overloads: "add_.Tensor"
    return (
        name in _ESCAPES
        or (name[-1:] == "_" and name[:1] != "_")  # in-place methods: add_, copy_, set_, ...
        or name in _IN_PLACE_DUNDERS
        or bool(kwargs and kwargs.get("out") is not None)
    )


def _forget_marks(values) -> None:
    for value in values:
        if isinstance(value, SparseActivation):
            value._megasparse_mark = None
        elif isinstance(value, (tuple, list)):
            _forget_marks(value)


class SparseActivation(torch.Tensor):
    """Values sparsified along the last dim with a (V, M) pattern, exactly as megasparse produced them."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if _hands_out_or_writes(func, kwargs):
            _forget_marks((*args, *(kwargs or {}).values()))
        # results of ops are plain tensors (no subclass propagation); no kwargs: no dict at all
        if kwargs:
            return torch._C._disabled_torch_function_impl(func, types, args, kwargs)
        return torch._C._disabled_torch_function_impl(func, types, args)


def mark_sparse(values: torch.Tensor, pattern, compact=None) -> torch.Tensor:
    """Mark `values`, made by megasparse's sparsifier with `pattern` (v, n, m), as sparse;
    `compact` (a CompactActivation, M >= 8) is the same tensor in the compact layout."""
    marked = values.as_subclass(SparseActivation)
    version = None if marked.is_inference() else marked._version  # inference tensors have none
    marked._megasparse_mark = (ActivationPattern(*pattern), version, compact)
    return marked


def _valid_mark(tensor):
    """(pattern, version, compact) of a marked tensor not changed since it was marked, else None."""
    if not isinstance(tensor, SparseActivation):
        return None
    mark = getattr(tensor, "_megasparse_mark", None)
    if mark is None:
        return None
    version = mark[1]
    return mark if version is None or tensor._version == version else None


def sparse_pattern(tensor):
    """The ActivationPattern (v, n, m) of a marked tensor not changed since it was marked, else None."""
    mark = _valid_mark(tensor)
    return None if mark is None else mark[0]


def compact_operand(tensor):
    """The CompactActivation a marked tensor carries, while it is unchanged since it was marked
    (the rules of `sparse_pattern`), else None."""
    mark = _valid_mark(tensor)
    return None if mark is None else mark[2]


def is_2_4(tensor) -> bool:
    """True only for a marked 2:4 tensor (M == 4) that has not been changed since it was marked."""
    pattern = sparse_pattern(tensor)
    return pattern is not None and pattern.is_2_4
