"""Pieces shared by the mask and activation kernels: the ranking key, and Triton import.

The NaN rule of every mask and sparsifier: elements rank by |x|, with NaN ranked as +inf (equal
to +inf and -inf); ties go to the lower index. So a non-finite element is kept unless its group
holds more non-finite elements than the pattern keeps (then the lower-index ones are kept): it
reaches the output and the loss as in the dense layer (where Megatron's NaN checks see it), and
the pattern stays exact. Weight masks rank |w| in float32 (exact for fp16/bf16/fp32 weights).
"""

import dataclasses

import torch

try:  # Triton is optional: CPU-only installs use the torch references.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton ships with every Linux torch install we test
    triton = None
    tl = None
    HAVE_TRITON = False


TRITON_TYPES = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int8: "i8",
    torch.int16: "i16",
    torch.int32: "i32",
}


@dataclasses.dataclass
class CompileSpec:
    """How a launcher calls one kernel, for the offline compile report (megasparse.tools.kernel_report).

    Built by each kernel module from the same constants its launcher passes, so the report
    compiles exactly what runs. `reads` maps each input pointer to the elements one program needs.
    """

    kernel: str
    fn: object
    dtype: str
    signature: dict  # argument -> Triton type ("*bf16", "i32", ...), constexprs left out
    constexprs: dict
    num_warps: int
    elements: int  # elements one program covers
    reads: dict
    # arguments Triton sees divisible by 16 at real shapes: pointers (torch allocations are
    # aligned) and sizes such as ffn or in_features
    aligned: tuple = ()
    enable_fp_fusion: bool = False
    # pointers each thread loads one 32-bit scalar from (a device-side scale): one LDG.E per
    # thread, the same address across the warp (one transaction); reported apart from `reads`
    scalar_reads: tuple = ()


def compile_spec(kernel, fn, dtype, arguments: str, constexprs, elements, num_warps, **fields):
    """A CompileSpec from the launch's arguments written as "name:type ..." in launch order.

    "T" in a type is the element type at `dtype` ("*T": a pointer to it); a trailing "/16" marks an
    argument Triton sees divisible by 16 at real shapes. Each program reads `elements` values of
    the first argument unless `reads` names the pointers it reads.
    """
    signature, aligned = {}, []
    for argument in arguments.split():
        name, kind = argument.split(":")
        if kind.endswith("/16"):
            kind = kind[:-3]
            aligned.append(name)
        signature[name] = kind.replace("T", TRITON_TYPES[dtype])
    reads = fields.pop("reads", (next(iter(signature)),))
    return CompileSpec(
        kernel=kernel,
        fn=fn,
        dtype=str(dtype).split(".")[1],
        signature=signature,
        constexprs=constexprs,
        num_warps=num_warps,
        elements=elements,
        reads={pointer: elements for pointer in reads},
        aligned=tuple(aligned),
        **fields,
    )


def rank_key(x: torch.Tensor) -> torch.Tensor:
    """|x| in x's dtype with NaN mapped to +inf (+inf and -inf stay +inf): the ranking key."""
    return x.abs().nan_to_num(nan=float("inf"), posinf=float("inf"))


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    """The ranking key of every weight mask: rank_key of the weight in float32."""
    return rank_key(weight.detach().float())


def require_triton() -> None:
    if not HAVE_TRITON:
        raise RuntimeError(
            "megasparse: Triton is not installed; use the *_reference functions or `pip install triton`"
        )


def check_2d(weight: torch.Tensor, what: str, rows_multiple: int, cols_multiple: int) -> None:
    """Raise a clear error when a weight cannot be cut into the mask's groups."""
    if weight.dim() != 2:
        raise ValueError(
            f"megasparse: {what} needs a 2-D weight [out, in], got shape {tuple(weight.shape)}"
        )
    rows, cols = weight.shape
    if rows % rows_multiple or cols % cols_multiple:
        raise ValueError(
            f"megasparse: {what} needs a weight whose [out, in] shape is a multiple of "
            f"[{rows_multiple}, {cols_multiple}], got {tuple(weight.shape)}; "
            "choose layer sizes (per tensor-parallel rank) that are multiples of 4"
        )


def mask_operands(weight: torch.Tensor, what: str, rows_multiple: int, cols_multiple: int):
    """The checked weight, contiguous, and an int8 mask of its shape for a mask kernel to fill."""
    require_triton()
    check_2d(weight, what, rows_multiple, cols_multiple)
    w = weight.detach().contiguous()
    return w, torch.empty(w.shape, dtype=torch.int8, device=w.device)


if HAVE_TRITON:

    @triton.jit
    def rank_key_triton(x):
        """rank_key: |x| in x's dtype, NaN -> +inf."""
        a = tl.abs(x)
        return tl.where(a != a, float("inf"), a)

    @triton.jit
    def magnitude_triton(x):
        return rank_key_triton(x.to(tl.float32))

    @triton.jit
    def split4(x):
        """[N, 4] -> its 4 columns as [N] tensors (in-thread when the 4 are one vector load)."""
        even, odd = tl.split(tl.reshape(x, [x.shape[0], 2, 2]))  # [N, 2]: columns (0, 2), (1, 3)
        x0, x2 = tl.split(even)
        x1, x3 = tl.split(odd)
        return x0, x1, x2, x3

    @triton.jit
    def join4(x0, x1, x2, x3):
        """Inverse of split4: four [N] tensors -> [N, 4]."""
        return tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), [x0.shape[0], 4])

    @triton.jit
    def top2_of_4(a0, a1, a2, a3):
        """Keep flags of the 2 largest of 4, ties to the lower index: i is dropped when at least
        2 others beat it, where j beats i if a_j > a_i, or a_j == a_i and j < i. Both directions
        are compared. Scores are rank keys (never NaN)."""
        b01, b10 = a1 > a0, (a0 > a1) | (a0 == a1)  # b_ij: j beats i
        b02, b20 = a2 > a0, (a0 > a2) | (a0 == a2)
        b03, b30 = a3 > a0, (a0 > a3) | (a0 == a3)
        b12, b21 = a2 > a1, (a1 > a2) | (a1 == a2)
        b13, b31 = a3 > a1, (a1 > a3) | (a1 == a3)
        b23, b32 = a3 > a2, (a2 > a3) | (a2 == a3)
        i32 = tl.int32
        k0 = b01.to(i32) + b02.to(i32) + b03.to(i32) < 2
        k1 = b10.to(i32) + b12.to(i32) + b13.to(i32) < 2
        k2 = b20.to(i32) + b21.to(i32) + b23.to(i32) < 2
        k3 = b30.to(i32) + b31.to(i32) + b32.to(i32) < 2
        return k0, k1, k2, k3
