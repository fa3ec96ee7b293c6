"""Megatron's tensor-parallel group of a sparse weight: the group a sum over its shards runs over."""


def weight_tp_group(weight, group=None):
    """`group` when given (the layer's own TP group), else Megatron's tensor-parallel group of a
    weight marked tensor-parallel (the expert TP group for expert weights, allreduce=False), else
    None; None also for a group of one rank. Asked at use (S-STE's first sparse forward), so
    Megatron's parallel state may be initialized after the layer was built."""
    if group is not None:
        return group if group.size() > 1 else None
    if not getattr(weight, "tensor_model_parallel", False):
        return None
    try:
        from megatron.core import parallel_state
    except ImportError:
        return None
    if not parallel_state.model_parallel_is_initialized():
        return None
    if getattr(weight, "allreduce", True) is False and hasattr(
        parallel_state, "get_expert_tensor_parallel_group"
    ):
        group = parallel_state.get_expert_tensor_parallel_group(check_initialized=False)
    else:
        group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
    return group if group is not None and group.size() > 1 else None
