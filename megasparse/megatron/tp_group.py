"""Megatron's tensor-parallel groups of sparse weights: the group a sum over a weight's shards (and
an agreement on its speed-gate decisions) runs over."""


def _one_rank_is_none(group):
    return group if group is not None and group.size() > 1 else None


def weight_tp_group(weight, group=None):
    """`group` when given (the layer's own TP group), else Megatron's tensor-parallel group of a
    weight marked tensor-parallel (the expert TP group for expert weights marked allreduce=False,
    i.e. under expert parallelism), else None; None also for a group of one rank. Asked at use
    (S-STE's first sparse forward), so Megatron's parallel state may be initialized after the layer
    was built. Expert weights without expert parallelism are marked allreduce=True like dense ones
    (Megatron's TEGroupedLinear), so experts ask `expert_tp_group` instead."""
    if group is not None:
        return _one_rank_is_none(group)
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
    return _one_rank_is_none(group)


def expert_tp_group(linear, weight=None):
    """The expert-tensor-parallel group the weights of the expert linear `linear` are split over,
    None for one rank: the group its ranks see the same tokens in (the speed gate's agreement,
    cuSPARSELt's search) and S-STE's beta is summed over (`weight` is ignored: the signature of a
    SparseWeightState process_group). Not the dense TP group: at TP=2, EP=1, expert-TP=1 the TP
    ranks run the experts on different tokens. Megatron's TEGroupedLinear keeps it as `_tp_group`
    (pg_collection.expt_tp; megatron-core 0.16.1 and 0.19.2 extensions/transformer_engine.py;
    TE's own `tp_group` there is None or that one-rank group); without it, Megatron's expert-TP
    group."""
    group = getattr(linear, "_tp_group", None)
    if group is not None:
        return _one_rank_is_none(group)
    try:
        from megatron.core import parallel_state
    except ImportError:
        return None
    if not parallel_state.model_parallel_is_initialized():
        return None
    return _one_rank_is_none(
        parallel_state.get_expert_tensor_parallel_group(check_initialized=False)
    )
