"""Per-optimizer-step gradient rules of 2:4 pretraining (pure functions, no layer state).

They sit beside the per-backward modes of `megasparse.core.linear_op` (`ste`, `masked`, `srste`). Each
rule takes the dense master weight W [out, in], its 2:4 mask M (bool, True = kept) and the
gradient G accumulated over all micro-batches of the step, and returns the gradient the
optimizer should see for this step. The caller applies it exactly once per optimizer step.

masked_decay  Hu, Zhao, Huang, Chen, Zhu, "Accelerating Transformer Pre-training with 2:4
              Sparsity", ICML 2024 (arXiv:2404.01847), Sec. 4: the SR-STE decay term applied
              to the *gradient*, once per step, before the (Adam) optimizer:
                  g_t = G_t + lambda_W * (1 - M(W_t)) * W_t
              The toolkit (huyz2023/2by4-pretrain, `sparse.decay.masked_add_`, used in
              thu-ml/2by4-pretrain-acc-examples v1/nanoGPT/train.py) adds it after gradient
              accumulation and after gradient clipping, right before `optimizer.step()`.
              Factor lambda_W of the paper's GPT-2 runs: 6e-5 (124M, 774M), 2e-4 (350M, 1558M);
              the paper chooses it in the warm-up stage from the flip rate.
              In megasparse (SparsityConfig(gradient="masked_decay", masked_decay_factor=...))
              it is added once per optimizer step, in the step's first backward (so before
              Megatron's gradient clipping, which then sees it too), whatever the number k of
              micro-batches; `srste` (Zhou et al. 2021) uses the same per-step term with its
              own factor `srste_decay`.

sste          Hu, Zhu, Chen, "S-STE: Continuous Pruning Function for Efficient 2:4 Sparse
              Pre-training", NeurIPS 2024 (arXiv:2409.09099): the forward weight is
                  W~ = beta * S(W),  S(w)_i = sign(w_i) * max(|w_i| - t, 0)  per group of 4,
              t = the 3rd largest |w| of the group (soft thresholding: continuous in W, unlike
              the hard 2:4 mask). beta is one per-tensor scalar minimizing ||W - beta S(W)||^2,
                  beta = <W, S(W)> / <S(W), S(W)>,
              computed once from the initial weights and then frozen (the authors' code:
              `init_scale` at model construction, a buffer saved with the model). In
              megasparse (gradient="sste") beta is computed at the weight's first sparse
              forward (megasparse.core.weight_state), summed over its TP group, and saved in the
              layer's extra state. The backward
              is the straight-through estimator: dL/dW := dL/dW~ (their `SoftThreshold.backward`
              returns the output gradient unchanged), so the per-step term is zero.
"""

from typing import Optional

import torch
import torch.distributed as dist

MASKED_DECAY_GPT2_124M = 6e-5  # lambda_W of Hu et al.'s GPT-2 124M / 774M runs


def masked_decay(
    weight: torch.Tensor,
    mask: torch.Tensor,
    grad: torch.Tensor,
    decay: float = MASKED_DECAY_GPT2_124M,
) -> torch.Tensor:
    """g = grad + decay * (1 - mask) * weight (Hu et al. ICML 2024), in grad's dtype; once per step.

    weight: the dense master weight; mask: its 2:4 mask (bool); grad: the accumulated (and, as
    in the paper's code, clipped) gradient of the step. Returns a new tensor.
    """
    term = (~mask).to(grad.dtype) * weight.detach().to(grad.dtype)
    return grad + decay * term


def soft_threshold24(weight: torch.Tensor) -> torch.Tensor:
    """S(W): in every group of 4 along the last dim, sign(w) * max(|w| - t, 0), t = 3rd largest |w|.

    The two largest |w| keep their sign and lose t; the others become 0 (a 2:4 tensor). When
    the 2nd and 3rd largest |w| are equal only the largest stays nonzero. Same dtype as W.
    """
    groups = weight.reshape(*weight.shape[:-1], weight.shape[-1] // 4, 4)
    mag = groups.abs()
    t = mag.sort(dim=-1).values[..., 1:2]  # ascending: index 1 is the 3rd largest
    return (groups.sign() * (mag - t).clamp_min(0)).reshape(weight.shape)


def sste_scale(weight: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """beta = <W, S(W)> / <S(W), S(W)> (S-STE's fixed per-tensor rescale), a 0-dim tensor
    (float32; float64 for a float64 weight).

    Call it once, on the initial weight, and keep the result (a buffer). With a tensor-parallel
    shard pass its TP group: both dot products are summed over the shards, so beta is the one
    of the full weight (the same at every TP size). No host sync.
    """
    w = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))  # float64 stays
    s = soft_threshold24(w)
    dots = torch.stack([(w * s).sum(), (s * s).sum()])
    if group is not None:
        dist.all_reduce(dots, group=group)
    return dots[0] / dots[1]


def sste_weight(weight: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The forward weight of S-STE, beta * S(W) (no autograd through it: see `sste`)."""
    return beta.to(weight.dtype) * soft_threshold24(weight.detach())


def sste(weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """S-STE's weight gradient: the straight-through estimator, g = grad (the per-step term is 0).

    The gradient with respect to beta * S(W) is given to the dense W unchanged (Hu et al.,
    NeurIPS 2024; the authors' `SoftThreshold.backward`), neither scaled by beta nor masked.
    weight and mask are accepted for a uniform signature with `masked_decay`.
    """
    return grad


GRADIENT_RULES = {"masked_decay": masked_decay, "sste": sste}
