"""Minimum-variance unbiased 2:4 pruning (for the wgrad GEMM's output gradient) and its per-step seeds.

Chmiel, Hubara, Banner, Soudry, "Minimum variance unbiased N:M sparsity for the neural
gradients", ICLR 2023 (arXiv:2203.10991). The neural gradient dY must be pruned *unbiasedly*
(E[prune(dY)] = dY), and among unbiased N:M estimators the one of least variance is wanted.

For one group a = (a_1..a_4) the estimator keeps element i with probability p_i and then
writes a_i / p_i (so E = a_i). Its variance is

    Var = sum_i a_i^2 (1 / p_i - 1),   subject to  sum_i p_i = 2,  0 <= p_i <= 1,

which only depends on the marginal keep probabilities. Minimizing it (Lagrange) gives
p_i = min(1, c |a_i|) with c fixed by sum p_i = 2. For 2:4 there are two cases
(S = sum |a_i|, a_max the largest |a_i|):
  - 2 a_max <= S:  p_i = 2 |a_i| / S, every kept value is sign(a_i) S / 2,
                   Var = S^2 / 2 - sum a_i^2;
  - 2 a_max >  S:  the largest is kept always (p = 1, value a_max, no variance), and one of
                   the other three with p_i = |a_i| / T, T = S - a_max (the 1:3 MVUE),
                   value sign(a_i) T;  Var = T^2 - sum_{i != max} a_i^2.
These are the paper's 2:4 MVUE probabilities (its Sec. 4, "MVUE for 2:4"). The paper picks
the pair from a table of six pair probabilities; any sampling design with the same marginals
has the same (minimal) variance. Here the pair is drawn by systematic sampling (Madow 1949):
one uniform u per group, element i kept when [C_{i-1}, C_i) (C = cumsum p) contains u or u+1.
That needs one random number per group, no sort and no host sync, and never keeps more than
two positions (exactly two where the group has two or more nonzeros; zero groups stay zero).

Notes. Hu et al.'s toolkit (huyz2023/2by4-pretrain) uses `MVUE24_approx`: two successive
draws without replacement, rescaled by the exact inclusion probabilities. It is unbiased but
not of minimum variance. Its older `legacy.MVUE24` writes S/2 also in the 2 a_max > S case,
which is biased there; this module writes a_max and T in that case.
"""

import itertools
from typing import Optional

import torch
import torch.distributed as dist

_WEIGHT_INDEX = itertools.count()  # each weight's index in its seeds (construction order)


def mvue24_probabilities(groups: torch.Tensor) -> torch.Tensor:
    """Keep probabilities p (same shape) of the 2:4 MVUE for `groups` [..., 4] (any float dtype).

    Computed in float32 (float64 for float64 input). An all-zero group gets p = 0.
    """
    work = torch.float64 if groups.dtype == torch.float64 else torch.float32
    a = groups.to(work).abs()
    total = a.sum(-1, keepdim=True)
    big = a.amax(-1, keepdim=True)
    rest = total - big
    is_max = a == big
    is_max = is_max & (is_max.cumsum(-1) == 1)  # one position per group (the first of equal maxima)
    spread = 2 * a / total.clamp_min(torch.finfo(work).tiny)  # case 2 a_max <= S
    capped = torch.where(is_max, torch.ones_like(a), a / rest.clamp_min(torch.finfo(work).tiny))
    p = torch.where(2 * big > total, capped, spread)
    return torch.where(total > 0, p.clamp(0, 1), torch.zeros_like(p))


def mvue24_variance(groups: torch.Tensor) -> torch.Tensor:
    """Per-element variance a_i^2 (1/p_i - 1) of the estimator (0 where a_i = 0), shape [..., 4]."""
    p = mvue24_probabilities(groups)
    a = groups.to(p.dtype)
    return torch.where(
        a != 0, a * a * (1 / p.clamp_min(torch.finfo(p.dtype).tiny) - 1), torch.zeros_like(a)
    )


def mvue24(
    x: torch.Tensor, dim: int = 0, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Prune `x` 2:4 along `dim` (groups of 4 consecutive elements) with the MVUE.

    For the weight-gradient GEMM dW = dY^T X (dY [tokens, out]) call `mvue24(dY, dim=0)`:
    groups of 4 consecutive tokens per output column, so dY^T is 2:4 along its rows.
    x.shape[dim] must be a multiple of 4. Returns a tensor like x (dtype, device); in every
    group at most 2 entries are nonzero and E[result] = x. Random numbers come from
    `generator` (a torch.Generator on x's device; None: the default one): one uniform per
    group, drawn on the device, so there is no host sync. Probabilities are computed in
    float32 (float64 for float64 input) and the result is cast back to x.dtype.
    """
    if x.shape[dim] % 4:
        raise ValueError(f"mvue24: size {x.shape[dim]} of dim {dim} is not a multiple of 4")
    moved = x.movedim(dim, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // 4, 4)
    p = mvue24_probabilities(groups)
    edges = torch.cumsum(p, -1)
    edges[..., -1] = 2.0  # they sum to 2 up to rounding (less only with < 2 nonzeros: p = 1 each)
    start = edges - p
    u = torch.rand(groups.shape[:-1], generator=generator, device=x.device, dtype=p.dtype)
    u = u[..., None]
    # element i is kept when u or u + 1 falls in [start_i, edges_i)
    keep = ((start <= u) & (u < edges)) | ((start <= u + 1) & (u + 1 < edges))
    a = groups.to(p.dtype)
    scaled = a / p.clamp_min(torch.finfo(p.dtype).tiny)
    values = torch.where(keep & (p > 0), scaled, torch.zeros_like(a))
    return values.to(x.dtype).reshape(moved.shape).movedim(-1, dim)


def mvue_weight_grad(
    dy2d: torch.Tensor, x2d: torch.Tensor, generator: Optional[torch.Generator] = None, backend=None
) -> torch.Tensor:
    """dW = MVUE(dY)^T X for dY [tokens, out], X [tokens, in]: the weight-gradient GEMM with dY
    pruned 2:4 along tokens (the GEMM's reduction dim) by `mvue24`, so E[dW] = dY^T X.

    Tokens are zero-padded to a multiple of 4 (zero rows add nothing). Accumulates in fp32 for
    half-precision inputs and returns fp32 (float32/float64 inputs keep their dtype).
    The GEMM: on a sparse backend (megasparse.core.backends, CUDA, fp16/bf16) the pruned dY^T
    [out, tokens] is 2:4 along its reduction dim, so it is the compressed sparse operand:
        dW^T = X^T MVUE(dY) = backend.linear(X^T, backend.compress(MVUE(dY)^T), None, WEIGHT)
    (cuSPARSELt / CUTLASS; the gpu-marked test checks it against the dense math). Elsewhere (the
    dense backend, CPU) it is the same math as a dense GEMM on the pruned dY.
    """
    pad = (-dy2d.shape[0]) % 4
    if pad:
        dy2d = torch.nn.functional.pad(dy2d, (0, 0, 0, pad))
        x2d = torch.nn.functional.pad(x2d, (0, 0, 0, pad))
    pruned = mvue24(dy2d, dim=0, generator=generator)
    if backend is not None and backend.name != "dense" and dy2d.shape[0] > 0:  # 0 tokens: no kernel
        from megasparse.core.sparse_operand import WEIGHT

        pruned_t, x_t = pruned.t().contiguous(), x2d.t().contiguous()
        if backend.fits(pruned_t) and backend.fits(x_t):
            return backend.linear(x_t, backend.compress(pruned_t), None, WEIGHT).t().float()
    if pruned.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(pruned.t().float(), x2d.float())
    return pruned.t() @ x2d


# --- the draws' seeds: reproducible, one generator per weight and step, no host sync ----------


def next_weight_index() -> int:
    """A new weight's index in its MVUE seeds (weights are numbered in construction order)."""
    return next(_WEIGHT_INDEX)


def step_seed(wgrad_seed, weight_index: int, step: int) -> int:
    """The seed of one weight's MVUE draws in one optimizer step: from (wgrad_seed, global rank,
    weight index, step count), so every rank, weight and step draws differently."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return hash((wgrad_seed, rank, weight_index, step)) & (2**63 - 1)


def seeded_generator(device, seed: Optional[int]) -> torch.Generator:
    """A torch.Generator on `device` seeded with `seed` (None: 0)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(0 if seed is None else seed)
    return generator
