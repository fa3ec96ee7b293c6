"""The gradient rules of 2:4 training: one object per gradient mode, and the weight-gradient options.

A rule says, for one weight under one mode, what the GEMMs compute with and what gradient the dense
master weight W [out, in] gets from the gradient G of that forward weight:
- `forward_weight(step)`: W*M, or beta * S(W) for S-STE;
- `dense_gradient(grad, weight, step)`: the gradient autograd (or the caller) gives W;
- `main_grad_term(weight, step)`: the same rule applied to a `main_grad` that already holds the
  accumulated straight-through gradient (Megatron's main_grad, Transformer Engine's wgrad fusion);
- `per_step_term`: the rule adds a term once per optimizer step (the first backward of the step,
  whatever the number of micro-batches: `WeightStep.take_decay`), with `decay(config)`.
`GRADIENT_RULES` maps `SparsityConfig.gradient` to its rule; a weight's step resolves it once
(`WeightStep.rule`). Adding a mode: one class here, one registry line, its name in
megasparse.config.GRADIENT_MODES.

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

mvue          wgrad_sparsity="mvue" is no gradient mode but an option of the weight-gradient GEMM
              (`WGRAD_RULES`): dW from the MVUE-pruned dY (megasparse.core.mvue), under any mode.
"""

from typing import Optional

import torch
import torch.distributed as dist

from megasparse.core.mvue import mvue_weight_grad

MASKED_DECAY_GPT2_124M = 6e-5  # lambda_W of Hu et al.'s GPT-2 124M / 774M runs


# --- the math of the rules (pure functions, no layer state) ---------------------------------


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
    """The forward weight of S-STE, beta * S(W) (no autograd through it: the gradient is
    straight-through, `SsteRule.dense_gradient`)."""
    return beta.to(weight.dtype) * soft_threshold24(weight.detach())


# --- one rule per gradient mode ---------------------------------------------------------------
# `step` is the weight's WeightStep (megasparse.core.weight_state): weight, pruned, mask(),
# sparsity (its config), sste_beta, take_decay(). A step without a mask (a dense phase) computes
# with W and passes every gradient through.


class GradientRule:
    """A gradient mode: straight-through by default (the dense W gets the gradient of W*M)."""

    name = ""
    straight_through = True  # dense_gradient is the identity, main_grad_term does nothing
    per_step_term = False  # adds a term once per optimizer step (the step's first backward)
    fixed_scale = False  # forward weight scaled by a per-tensor factor fixed at first use

    def decay(self, sparsity) -> float:
        """The factor of the per-step term, read from the config."""
        return 0.0

    def scale(self, weight, group=None) -> Optional[torch.Tensor]:
        """The fixed per-tensor scale of the forward weight (rules with `fixed_scale`)."""
        return None

    def forward_weight(self, step) -> torch.Tensor:
        """The weight the GEMMs compute with in a pruned step: W*M."""
        return step.weight.detach() * step.mask()

    def dense_gradient(self, grad, weight, step) -> torch.Tensor:
        """The dense master weight's gradient from the micro-batch gradient `grad` of the forward weight."""
        return grad

    def main_grad_term(self, weight, step) -> None:
        """Apply the rule to weight.main_grad, which already holds the accumulated ste gradient."""


class SteRule(GradientRule):
    """ste: the dense gradient (the straight-through estimator)."""

    name = "ste"


class MaskedRule(GradientRule):
    """masked: the gradient times the mask (linear, so exact per micro-batch)."""

    name = "masked"
    straight_through = False

    def dense_gradient(self, grad, weight, step):
        return grad * step.mask() if step.pruned else grad

    def main_grad_term(self, weight, step):
        if step.pruned:  # idempotent: exact after every micro-batch
            weight.main_grad.mul_(step.mask())


class _PerStepDecayRule(GradientRule):
    """The dense gradient + decay * (1 - M) * W, added once per optimizer step."""

    straight_through = False
    per_step_term = True

    def _with_decay(self, grad, weight, step, decay):
        raise NotImplementedError

    def dense_gradient(self, grad, weight, step):
        if step.pruned and step.take_decay():
            return self._with_decay(grad, weight, step, self.decay(step.sparsity))
        return grad

    def main_grad_term(self, weight, step):
        if step.pruned and step.take_decay():
            decay = self.decay(step.sparsity)
            term = decay * (~step.mask()) * weight.detach()
            weight.main_grad.add_(term.to(weight.main_grad.dtype))


class SrsteRule(_PerStepDecayRule):
    """srste (Zhou et al. 2021): decay = SparsityConfig.srste_decay."""

    name = "srste"

    def decay(self, sparsity) -> float:
        return sparsity.srste_decay

    def _with_decay(self, grad, weight, step, decay):
        # decay * (~M) first, in the default float dtype (masked_decay's term is in grad's dtype):
        # two formulas kept apart so that both modes stay bit-for-bit what their runs compute
        return grad + decay * (~step.mask()) * weight.detach().to(grad.dtype)


class MaskedDecayRule(_PerStepDecayRule):
    """masked_decay (Hu et al., ICML 2024): decay = SparsityConfig.masked_decay_factor."""

    name = "masked_decay"

    def decay(self, sparsity) -> float:
        return sparsity.masked_decay_factor

    def _with_decay(self, grad, weight, step, decay):
        return masked_decay(weight, step.mask(), grad, decay)


class SsteRule(GradientRule):
    """sste (S-STE, Hu et al., NeurIPS 2024): forward beta * S(W), straight-through gradient."""

    name = "sste"
    fixed_scale = True

    def scale(self, weight, group=None):
        return sste_scale(weight, group)

    def forward_weight(self, step):
        if step.sste_beta is None:
            raise ValueError(
                "megasparse: S-STE's forward weight beta * S(W) needs beta: build the step with "
                "sste_beta=sste_scale(weight) (SparseWeightState and sparse_linear do)"
            )
        return sste_weight(step.weight, step.sste_beta)


GRADIENT_RULES = {
    "ste": SteRule(),
    "masked": MaskedRule(),
    "srste": SrsteRule(),
    "masked_decay": MaskedDecayRule(),
    "sste": SsteRule(),
}


def gradient_rule(sparsity) -> GradientRule:
    """The rule of `sparsity.gradient` (ste without a config)."""
    return GRADIENT_RULES["ste" if sparsity is None else sparsity.gradient]


# --- the weight-gradient GEMM dW = dY^T X: plain, or from the MVUE-pruned dY ------------------


def weight_grad_fp32(dy2d: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
    """dY^T X accumulated in fp32 (what Megatron's fused wgrad writes into main_grad)."""
    if dy2d.dtype == torch.float64:
        return dy2d.t() @ x2d
    if dy2d.is_cuda and dy2d.dtype in (torch.float16, torch.bfloat16):
        try:
            return torch.mm(dy2d.t(), x2d, out_dtype=torch.float32)  # torch >= 2.8
        except TypeError:
            pass
    return torch.mm(dy2d.t().float(), x2d.float())


class PlainWgrad:
    """dW = dY^T X."""

    plain = True  # has `accumulate`: main_grad += dY^T X in one GEMM

    def __call__(self, dy2d, x2d, step, backend) -> torch.Tensor:
        return dy2d.t() @ x2d

    def fp32(self, dy2d, x2d, step, backend) -> torch.Tensor:
        return weight_grad_fp32(dy2d, x2d)

    def accumulate(self, main_grad, dy2d, x2d) -> None:
        """main_grad += dY^T X in fp32, without a full-size fp32 temporary where torch can
        (CUDA, torch >= 2.8)."""
        if (
            dy2d.is_cuda
            and dy2d.dtype in (torch.float16, torch.bfloat16)
            and main_grad.dtype == torch.float32
        ):
            try:
                torch.addmm(main_grad, dy2d.t(), x2d, out_dtype=torch.float32, out=main_grad)
                return
            except (TypeError, RuntimeError):
                pass
        main_grad.add_(weight_grad_fp32(dy2d, x2d).to(main_grad.dtype))


class MvueWgrad:
    """wgrad_sparsity="mvue": dW from the MVUE-pruned dY, a fresh draw per backward from the
    step's generator (megasparse.core.mvue.mvue_weight_grad)."""

    plain = False

    def __call__(self, dy2d, x2d, step, backend) -> torch.Tensor:
        return self.fp32(dy2d, x2d, step, backend).to(dy2d.dtype)

    def fp32(self, dy2d, x2d, step, backend) -> torch.Tensor:
        return mvue_weight_grad(dy2d, x2d, step.wgrad_generator(), backend)


WGRAD_RULES = {None: PlainWgrad(), "mvue": MvueWgrad()}


def wgrad_rule(sparsity, pruned: bool):
    """The weight-gradient GEMM of a step: the config's wgrad_sparsity while the weight is pruned."""
    if not pruned or sparsity is None:
        return WGRAD_RULES[None]
    return WGRAD_RULES[sparsity.wgrad_sparsity]
