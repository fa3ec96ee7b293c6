"""Hooks for Megatron-LM's pretrain_gpt.py (see patches/): flags, the per-iteration schedule, the spec.

    pretrain(..., extra_args_provider=megasparse.megatron_lm.extra_args_provider(other_provider))
    forward_step(...):  megasparse.megatron_lm.on_forward_step(model)
    launch flag:        --spec megasparse.specs sparse_gpt_layer_spec

megatron.training is imported only when these run inside Megatron-LM.
"""

from megasparse.args import add_args, schedule_from_args

_schedules = {}


def _megatron_args():
    from megatron.training import get_args

    return get_args()


def megatron_lm_args():
    """Megatron-LM's parsed arguments (only inside a Megatron-LM run)."""
    return _megatron_args()


def extra_args_provider(other=None):
    """An extra_args_provider adding the --sparsity-* flags (after `other`'s, if given)."""

    def provider(parser):
        return add_args(other(parser) if other is not None else parser)

    return provider


def on_forward_step(model, args=None) -> str:
    """Put the model's sparse layers in the phase of the current iteration. Cheap; call every forward_step."""
    args = args if args is not None else _megatron_args()
    key = id(args)
    if key not in _schedules:
        _schedules.clear()
        _schedules[key] = schedule_from_args(args)
    return _schedules[key].apply(model, getattr(args, "curr_iteration", 0) or 0)
