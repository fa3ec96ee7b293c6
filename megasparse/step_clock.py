"""Optimizer-step boundaries without user calls: a generation number bumped by every optimizer step.

Weights change only at the optimizer step. PyTorch calls global post-hooks after the `step()` of
every `torch.optim.Optimizer` (subclasses included: apex / TE FusedAdam), and Megatron's
optimizers (FP32, mixed precision, distributed) step such an optimizer; their copies into the
model weights (main -> model params, param all-gather) complete before the next forward of the
module that owns the weight, which is where megasparse rebuilds its per-step state.
Several optimizers stepping in one iteration (Megatron's ChainedOptimizer) bump the generation
more than once; users count a boundary when the generation differs from the one they last saw,
so that is still one step.
"""

from torch.optim.optimizer import register_optimizer_step_post_hook

_generation = 0
_hook = None


def _bump(optimizer, args, kwargs) -> None:
    global _generation
    _generation += 1


def generation() -> int:
    """The number of optimizer steps this process has run since megasparse first looked."""
    global _hook
    if _hook is None:  # installed on first use, so importing megasparse changes nothing
        _hook = register_optimizer_step_post_hook(_bump)
    return _generation
