"""Optimizer-step boundaries without user calls: which optimizer steps are a weight's own.

Weights change only at the optimizer step. PyTorch calls global post-hooks after the `step()` of
every `torch.optim.Optimizer` (subclasses included: apex / TE FusedAdam), and Megatron's
optimizers (FP32, mixed precision, distributed) step such an optimizer; their copies into the
model weights (main -> model params, param all-gather) complete before the next forward of the
module that owns the weight, which is where megasparse rebuilds its per-step state.

A weight's step boundary is a step of an optimizer that owns it: one whose param groups hold the
weight, its `main_param` (the fp32 main copy of Megatron's mixed-precision and distributed
optimizers) or a view of it (the distributed optimizer's fp32 shards). So another model's
optimizer stepping between this model's micro-batches is not a boundary of its weights.
Optimizers become known at their first step. Until a weight's optimizer is known, and for a
weight no known optimizer holds (Megatron's distributed optimizer on a rank without a shard of
it, an optimizer keeping its own main copies), every optimizer step counts as its boundary;
`StepWatcher` records when that may have counted a step that was not the weight's own.
Several optimizers stepping in one iteration (Megatron's ChainedOptimizer) are one boundary.
"""

import weakref

from torch.optim.optimizer import register_optimizer_step_post_hook

_generation = 0
_hook = None
_last_step = weakref.WeakKeyDictionary()  # optimizer -> the generation of its latest step
_known = 0  # how many optimizers have become known (changes when one steps for the first time)
_held_ids = weakref.WeakKeyDictionary()  # optimizer -> (param counts per group, ids it holds)
_layout_at = (None, None)  # (generation, `_layout()` then)


def _bump(optimizer, args, kwargs) -> None:
    global _generation, _known
    _generation += 1
    if optimizer not in _last_step:
        _known += 1
    _last_step[optimizer] = _generation


def generation() -> int:
    """The number of optimizer steps this process has run since megasparse first looked."""
    global _hook
    if _hook is None:  # installed on first use, so importing megasparse changes nothing
        _hook = register_optimizer_step_post_hook(_bump)
    return _generation


def _ids_held_by(optimizer) -> frozenset:
    """ids of the tensors `optimizer` steps and of the tensors they are views of (rebuilt when its
    param groups change size; read at most once per optimizer step and weight)."""
    groups = optimizer.param_groups
    counts = tuple(len(group["params"]) for group in groups)
    cached = _held_ids.get(optimizer)
    if cached is None or cached[0] != counts:
        ids = set()
        for group in groups:
            for param in group["params"]:
                ids.add(id(param))
                if param._base is not None:  # a shard view of a model weight
                    ids.add(id(param._base))
        cached = (counts, frozenset(ids))
        _held_ids[optimizer] = cached
    return cached[1]


def _layout() -> tuple:
    """The known optimizers and the sizes of their param groups (read once per optimizer step for
    all weights): a weight no optimizer held at one layout is looked up again only at a new one."""
    global _layout_at
    if _layout_at[0] != _generation:
        sizes = tuple(
            tuple(len(group["params"]) for group in optimizer.param_groups)
            for optimizer in list(_last_step.keys())
        )
        _layout_at = (_generation, (_known, sizes))
    return _layout_at[1]


class StepWatcher:
    """Whether one weight's optimizer has stepped since the last look (one per sparse weight).

    guessed: boundaries counted while no known optimizer owned the weight; when an owner becomes
    known they turn out to be other optimizers' steps (`owned` is then True), and the caller
    settles them. interleaved: an unowned weight saw some optimizers step while others did not,
    so some of the steps it counted may not be its own.
    """

    def __init__(self):
        self._seen = None  # the generation at the last look (None: not looked since reset)
        self._weight = None  # a weak reference to the weight of the last look
        self._owners = ()  # weak references to the optimizers that own the weight
        self._looked_up_at = -1  # `_known` at that lookup
        self._unowned_at = None  # (layout, weight, main_param ids) of a lookup that found no owner
        self.guessed = 0
        self.interleaved = False

    def __getstate__(self):  # copies and pickles look their weight's optimizers up again
        return {"guessed": self.guessed, "interleaved": self.interleaved}

    def __setstate__(self, state):
        self.__init__()
        self.__dict__.update(state)

    def reset(self) -> None:
        """Forget the past (a checkpoint with the step count was just restored): the next look is
        not a boundary."""
        self._seen = None
        self.guessed, self.interleaved = 0, False

    @property
    def owned(self) -> bool:
        return any(ref() is not None for ref in self._owners)

    def look(self, weight) -> bool:
        """True when the weight's optimizer stepped since the last look."""
        now, seen = generation(), self._seen
        self._seen = now
        if seen is None or now == seen:  # the fast path of every micro-batch: two int compares
            if self._weight is None or self._weight() is not weight:
                self._weight = weakref.ref(weight)
            return False
        self._weight = weakref.ref(weight)
        owners = self._owners_of(weight)
        if owners:
            return any(_last_step.get(owner, 0) > seen for owner in owners)
        self.guessed += 1
        self.interleaved |= any(step <= seen for step in _last_step.values())
        return True

    def peek(self) -> bool:
        """What the next look at the same weight will say, without looking."""
        now, seen = generation(), self._seen
        weight = self._weight() if self._weight is not None else None
        if seen is None or now == seen or weight is None:
            return False
        owners = self._owners_of(weight)
        return not owners or any(_last_step.get(owner, 0) > seen for owner in owners)

    def _owners_of(self, weight) -> list:
        # look again when an optimizer stepped for the first time; while none owns the weight, also
        # when a known optimizer's param groups changed size (the weight may have been added)
        owned = self.owned
        if not owned or self._looked_up_at != _known:
            main = getattr(weight, "main_param", None)  # Megatron's fp32 main copy (or shard)
            unowned_at = (_layout(), id(weight), id(main))
            if owned or unowned_at != self._unowned_at:
                targets = {id(weight)} if main is None else {id(weight), id(main)}
                self._owners = tuple(
                    weakref.ref(optimizer)
                    for optimizer in list(_last_step.keys())
                    if not targets.isdisjoint(_ids_held_by(optimizer))
                )
                self._looked_up_at = _known
                self._unowned_at = None if self._owners else unowned_at
        return [owner for owner in (ref() for ref in self._owners) if owner is not None]
