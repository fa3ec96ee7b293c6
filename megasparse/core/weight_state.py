"""The per-optimizer-step state of a sparse weight: its mask and the GEMM operands derived from it.

Weights change only at the optimizer step, and a step runs k micro-batches. So everything that
depends only on the weight is built at the first use after a step boundary and reused by every
micro-batch's forward, backward and recompute in that step (a `WeightStep`):
- the 2:4 mask, bit-packed (1/16 of a bf16 weight), held for `mask_refresh_interval` steps;
- the forward GEMM operand: W*M compressed for the sparse backends (W*M itself for `dense`);
- the input-gradient operand: the compressed (W*M)^T for transposable masks, W*M for 1d masks;
  held for the step by default, or rebuilt in each backward under
  `SparsityConfig.hold_backward_weight=False` (memory over time: a 1d mask's W*M costs one
  weight-sized tensor held, against an unpack + multiply of ~10 bytes per weight element in
  every backward).

The step-boundary rule (also in docs/weight-state.md). The state is rebuilt from the current weight at the
first use after
1. a step of the weight's own optimizer: a `torch.optim` optimizer whose param groups hold the
   weight, its `main_param` (Megatron's fp32 main copy) or a view of it (megasparse.core.step_clock;
   Megatron's optimizers step one). Another optimizer's step is not a boundary of this weight;
   a weight that no optimizer seen so far holds counts every optimizer step;
2. a new iteration given to `set_iteration` (SparsitySchedule, the Megatron-LM hook);
3. an in-place change of the weight (its version counter: load_state_dict, in-place updates under
   torch.no_grad()), or new weight storage (`p.data = t`, Megatron DDP moving parameters into its
   buffers);
4. a change of the layer's SparsityConfig (weights, mask, enabled, nonfinite_weights, backend,
   hold_backward_weight, gradient, wgrad_sparsity) or a new config object; a change of the mask rule (weights, mask,
   enabled, nonfinite_weights), even one undone before the next use, also drops a held mask;
5. a train()/eval() switch of the module, or `megasparse.weights_changed(model)`.
Not covered: writes through `.data` that keep the storage (`p.data -= lr * p.grad`,
`p.data.copy_(ema)`) outside those; call `megasparse.weights_changed(model)` after them, or
write in place under torch.no_grad(). MEGASPARSE_VERIFY_STATE=1 finds them (a host sync and a
weight compare per use).
Boundaries of kind 1 and 2 count steps for held masks (kind 2 sets the count to the iteration)
and re-arm the per-step gradient terms (srste, masked_decay: once per step, whatever else
rebuilds the state in between). The step count is saved with held masks in checkpoints.
Under CUDA graph capture every module that could compute sparse in some phase refuses to run,
in a dense phase too (a replay would neither rebuild the state nor notice sparsity turning on).

This module is the only copy of the mask policy (`compute_mask`); every sparse module (local and
TE linears, experts, FP8) goes through it. The layer gives what depends on its framework:
`mask_source` (FP8 quantize-then-prune takes the mask of the layer's e4m3 values of W) and
`process_group` (the tensor-parallel group S-STE's beta is summed over).
Checkpoint I/O of held masks: megasparse.core.weight_checkpoint.

What the config can add to a step, all off by default:
- S-STE (gradient="sste", Hu, Zhu, Chen, NeurIPS 2024): the step's forward weight is
  beta * S(W) (megasparse.core.gradients.SsteRule) instead of W*M; same hard mask M (the
  support of S(W) lies inside it). beta is computed once per weight, at its first sparse
  forward (so after a dense warm-up, from the warmed-up weight), summed over the weight's
  tensor-parallel group (so it is the same at every TP size), and saved in the checkpoint.
- MVUE weight gradients (wgrad_sparsity="mvue"): `WeightStep.wgrad_generator()` is a
  torch.Generator on the weight's device, seeded once per step (megasparse.core.mvue.step_seed):
  reproducible, no host sync.
- Flip rate (track_flip_rate): the share of mask entries that changed since the last mask
  (megasparse.core.mask_flips; `flip_rate`, a 0-dim tensor).
"""

import itertools
import os
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist

from megasparse.core import mvue, step_clock
from megasparse.core.warn import warn_once
from megasparse.config import _MASK_RULE_FIELDS, Fp8Order
from megasparse.core.gradients import gradient_rule, wgrad_rule
from megasparse.core.mask_flips import MaskFlips
from megasparse.core.masks import check_finite, pack_mask, unpack_mask, weight_mask
from megasparse.core.weight_checkpoint import WeightCheckpointMixin

VERIFY_ENV = "MEGASPARSE_VERIFY_STATE"

_CONFIG_SERIALS = itertools.count(1)  # one per SparsityConfig object, never reused (unlike id())

# weight -> the tensor whose 2:4 mask is taken under fp8_order="quantize-then-prune"
MaskSource = Callable[[torch.Tensor], torch.Tensor]


def verify_mode() -> bool:
    """MEGASPARSE_VERIFY_STATE=1 (debugging): every use of a step's state compares the weight with
    the one its operands were built from (a weight-sized compare and a host sync per use)."""
    return os.environ.get(VERIFY_ENV, "0") not in ("", "0")


def _graph_capture_underway(weight) -> bool:
    """Whether the current CUDA stream is capturing a CUDA graph (no sync; False for CPU weights)."""
    return weight.is_cuda and torch.cuda.is_current_stream_capturing()


def could_be_sparse(sparsity) -> bool:
    """Whether some phase of a layer under `sparsity` computes sparse or FP8 (whatever `enabled`
    says now: SparsitySchedule and the user turn it on and off)."""
    return (
        sparsity.weights is not None
        or sparsity.activations is not None
        or getattr(sparsity, "fp8", None) is not None
    )


def refuse_graph_capture(tensor, *configs) -> None:
    """Raise under CUDA graph capture (of `tensor`'s stream) if any config could make its module
    sparse: capture in a dense phase would replay dense after sparsity turns on. No sync."""
    if any(could_be_sparse(sparsity) for sparsity in configs) and _graph_capture_underway(tensor):
        raise RuntimeError(_CAPTURE_ERROR)


def refuse_megatron_fsdp(weight) -> None:
    """Megatron-FSDP (`use_megatron_fsdp`) shards parameters and hands out each one's main_grad
    bucket per backward (`get_main_grad()`); megasparse's per-step state and its gradient paths
    (which take main_grad at the forward) are built for Megatron's DDP, where both stay put. A
    stale bucket would take the gradient silently, so sparse layers refuse it."""
    if hasattr(weight, "__fsdp_param__"):
        raise NotImplementedError(
            "megasparse: sparse layers do not support Megatron-FSDP (use_megatron_fsdp / "
            "--use-megatron-fsdp) yet: its per-backward main_grad buckets would not receive the "
            "sparse GEMMs' gradients. Use Megatron's DDP (optionally with "
            "--use-distributed-optimizer) for models with sparse layers."
        )


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN equals the same NaN), one host sync."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))


class StepTerms:
    """The per-step gradient terms (srste, masked_decay) of one step of a weight: added once.

    Shared by every WeightStep built within that step, so rebuilding the operands in the middle
    of a step (a mode switch, a weight write, another optimizer's step) never adds them twice."""

    __slots__ = ("pending",)

    def __init__(self):
        self.pending = True


def compute_mask(
    weight: torch.Tensor, sparsity, mask_source: Optional[MaskSource] = None
) -> torch.Tensor:
    """The 2:4 mask the config's rule gives for `weight` (bool, shaped like it).
    FP8 quantize-then-prune: the mask of mask_source(W), the layer's e4m3 values of W
    (megasparse.fp8.scaling.quantized_weight)."""
    weight = weight.detach()
    if getattr(sparsity, "fp8_order", None) == Fp8Order.QUANTIZE_THEN_PRUNE:
        if mask_source is None:
            raise ValueError(
                "megasparse: fp8_order='quantize-then-prune' takes the 2:4 mask of the FP8 "
                "values of the weight, but this weight state has no mask_source; build it as "
                "SparseWeightState(mask_source=megasparse.fp8.scaling.quantized_weight)"
            )
        if sparsity.nonfinite_weights == "error":  # saturation would hide an Inf
            check_finite(weight)
        weight = mask_source(weight)
    return weight_mask(weight, sparsity.mask, sparsity.nonfinite_weights)


class WeightStep:
    """One optimizer step's view of a weight: mask and GEMM operands, each built once when first needed.

    mask_bits None means the weight is used dense (a dense phase, or activation sparsity only).
    """

    def __init__(
        self,
        weight,
        mask_bits,
        backend,
        transposable: bool,
        hold_backward: bool,
        sparsity=None,
        sste_beta=None,
        wgrad_seed: Optional[int] = None,
        terms: Optional[StepTerms] = None,
    ):
        # the config the step was built under (its decay factors are read at use), its gradient
        # rule and weight-gradient GEMM (megasparse.core.gradients), S-STE's beta (the factor of
        # its forward weight beta * S(W)), the MVUE seed of this step
        self.sparsity = sparsity
        self.rule, self.wgrad = _rules(sparsity, mask_bits is not None)
        self.sste_beta = sste_beta
        self.wgrad_seed = wgrad_seed
        self._wgrad_generator = None
        self.weight = weight
        self.mask_bits = mask_bits
        self.backend = backend
        self.transposable = transposable
        self.hold_backward = hold_backward
        self.terms = terms if terms is not None else StepTerms()  # srste / masked_decay, once
        self._dense = None  # W*M
        self._compressed = None  # compress(W*M)
        self._compressed_t = None  # compress((W*M)^T)
        self._extras = {}  # other per-step operands by key (megasparse.fp8.linear: the FP8 weight)

    @property
    def pruned(self) -> bool:
        return self.mask_bits is not None

    def mask(self) -> Optional[torch.Tensor]:
        return None if self.mask_bits is None else unpack_mask(self.mask_bits, self.weight.shape)

    def _masked(self):
        return self.rule.forward_weight(self)  # W*M; S-STE: beta * S(W)

    def wgrad_generator(self) -> torch.Generator:
        """This step's generator of MVUE draws (created and seeded once per step)."""
        if self._wgrad_generator is None:
            self._wgrad_generator = mvue.seeded_generator(self.weight.device, self.wgrad_seed)
        return self._wgrad_generator

    def dense(self, hold: bool = False) -> torch.Tensor:
        """The weight the GEMMs compute with, as a dense tensor (W*M, or W in a dense phase;
        beta * S(W) under S-STE). hold: the caller runs a dense GEMM on it in every micro-batch
        (a role the speed gate runs dense under a sparse backend), so it is held for the step."""
        if not self.pruned:
            return self.weight.detach()
        if self._dense is not None:
            return self._dense
        masked = self._masked()
        # held where W*M itself is a GEMM operand in every micro-batch: the dense backend's forward,
        # a held 1d backward (the default; a transposable backward uses the compressed (W*M)^T
        # instead), or the caller's dense GEMM
        if hold or self.backend.name == "dense" or (self.hold_backward and not self.transposable):
            self._dense = masked
        return masked

    def dense_for_copy(self) -> torch.Tensor:
        """dense() for a caller that keeps its own copy (grouped experts stack the W*M of the experts
        running together): the held W*M if there is one, else built without holding a second one."""
        if not self.pruned or self._dense is not None:
            return self.dense()
        return self._masked()

    def compressed(self):
        """The forward operand: W*M in the backend's sparse format (built once per step)."""
        if self._compressed is None:
            self._compressed = self.backend.compress(self.dense())
        return self._compressed

    def compressed_t(self):
        """The transposable mask's input-gradient operand: (W*M)^T in the backend's sparse format."""
        if self._compressed_t is not None:
            return self._compressed_t
        operand = self.backend.compress(self.dense().t().contiguous())
        if self.hold_backward:
            self._compressed_t = operand
        return operand

    def cached(self, key, build):
        """`build()` once per step under `key` (e.g. the FP8 weight and its compressed operands)."""
        if key not in self._extras:
            self._extras[key] = build()
        return self._extras[key]

    def take_decay(self) -> bool:
        """True once per step: whether the rule should add this step's per-step gradient term."""
        pending, self.terms.pending = self.terms.pending, False
        return pending

    def held_bytes(self) -> dict:
        """Bytes this step holds, by part (compressed operands counted by their tensors)."""
        parts = {
            "mask": self.mask_bits,
            "dense": self._dense,
            "compressed": self._compressed,
            "compressed_t": self._compressed_t,
        }
        if parts["compressed"] is parts["dense"]:
            parts["compressed"] = None  # the dense backend's operand is W*M itself
        held = {name: _nbytes(value) for name, value in parts.items() if value is not None}
        for (
            key,
            value,
        ) in self._extras.items():  # tensors, or objects listing theirs: held_tensors()
            tensors = (value,) if isinstance(value, torch.Tensor) else value.held_tensors()
            # a cached extra's name: its key's first part ("fp8_weight" of ("fp8_weight",
            # use_cusparselt, order)); variants of one name add up
            name = (
                key[0] if isinstance(key, tuple) and key and isinstance(key[0], str) else str(key)
            )
            held[name] = held.get(name, 0) + sum(_nbytes(t) for t in tensors)
        return held


def _rules(sparsity, pruned: bool):
    """The gradient rule and the weight-gradient GEMM a step under `sparsity` runs."""
    return gradient_rule(sparsity), wgrad_rule(sparsity, pruned)


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor) and type(value) is torch.Tensor:
        return value.numel() * value.element_size()
    # PyTorch's semi-structured tensors: their packed values and metadata
    names = ("packed", "meta", "packed_t", "meta_t", "compressed_swizzled_bitmask")
    return sum(_nbytes(getattr(value, n)) for n in names if getattr(value, n, None) is not None)


def _mask_rule(sparsity):
    """Identifies the config's mask rule; any change of weights / mask / enabled / nonfinite_weights
    (even one undone before the next use) or a new config object gives a new value: a serial
    stamped on the config object at its first use (a copy made by dataclasses.replace gets its
    own), its count of rule changes, and the rule's fields."""
    serial = sparsity.__dict__.get("_megasparse_serial")
    if serial is None:
        serial = next(_CONFIG_SERIALS)
        object.__setattr__(sparsity, "_megasparse_serial", serial)
    fields = tuple(getattr(sparsity, name) for name in _MASK_RULE_FIELDS)
    return (serial, sparsity.mask_rule_revision) + fields


_CAPTURE_ERROR = (
    "megasparse: a sparse layer is running under CUDA graph capture (torch.cuda.graph, TE's "
    "make_graphed_callables, Megatron's cuda_graph_impl 'local' / 'transformer_engine' / "
    "'full_iteration', formerly --enable-cuda-graph / --external-cuda-graph). Its 2:4 state "
    "(mask, W*M, compressed and FP8 weights) is rebuilt by host-side Python once per optimizer "
    "step, which a graph replay does not run, so replays would compute with a stale weight; "
    "captured in a dense phase (enabled=False, a SparsitySchedule warm-up), replays would stay "
    "dense after sparsity turns on. "
    "Keep the sparse layers out of the captured region (capture only modules without sparse "
    "layers, e.g. Megatron's cuda_graph_scope / cuda_graph_modules 'attn' when only the MLP is "
    "sparse), or turn CUDA graphs off."
)


class SparseWeightState(WeightCheckpointMixin):
    """The per-step state of one weight of a sparse module (see the module docstring).

    mask_source: under fp8_order="quantize-then-prune", weight -> the tensor the 2:4 mask is
      taken of (FP8 layers pass megasparse.fp8.scaling.quantized_weight).
    process_group: the group S-STE's beta is summed over (the weight's tensor-parallel group),
      or a callable weight -> that group, asked at the first sparse forward; None: this rank's
      weight alone.
    """

    def __init__(
        self,
        mask_source: Optional[MaskSource] = None,
        process_group: Union[None, dist.ProcessGroup, Callable] = None,
    ):
        self.mask_source = mask_source
        self.process_group = process_group
        self.held_mask_bits = None  # held masks (mask_refresh_interval > 1)
        self._held_since_switch = False  # a held mask was computed since the last train()/eval()
        self.held_shape = None
        self.refreshed_at = 0  # the step count at which the held mask was computed
        self.steps = 0  # step boundaries seen (or the iteration set from outside)
        self.iteration_driven = False
        self.mask_computations = 0
        self._watch = step_clock.StepWatcher()  # when the weight's own optimizer steps
        self._terms = StepTerms()  # this step's per-step gradient terms
        self._terms_before_owner = 0  # steps whose terms were added before the optimizer was known
        self._built_from = None  # verify mode: the weight the step's operands were built from
        self._held_unchecked = False  # a restored held mask not yet checked against the rule
        self._mask_key = None
        self._rule = None
        self._step: Optional[WeightStep] = None
        self.index = mvue.next_weight_index()  # this weight's index in its MVUE seeds
        self.sste_beta: Optional[torch.Tensor] = None
        self.flips = MaskFlips()  # track_flip_rate

    @property
    def flip_rate(self) -> Optional[torch.Tensor]:
        """Share of mask entries changed at the last mask computation (0-dim; None before two)."""
        return self.flips.rate

    @property
    def flip_step(self) -> Optional[int]:
        """The step count of the mask `flip_rate` was measured at."""
        return self.flips.step

    @property
    def flip_prev_bits(self) -> Optional[torch.Tensor]:
        """The last mask computed while tracking flips (packed bits)."""
        return self.flips.prev_bits

    # --- step boundaries ------------------------------------------------------------------

    def set_iteration(self, iteration: int) -> None:
        """Drive the step count by training iteration (schedules); a new iteration is a boundary."""
        iteration = int(iteration)
        if not self.iteration_driven or iteration != self.steps:
            self._step = None
            self._terms = StepTerms()
        self.steps, self.iteration_driven = iteration, True

    def invalidate(self, drop_held_mask: bool = False) -> None:
        """Rebuild the operands from the current weight at the next use (not a step boundary:
        the step count and this step's gradient terms stay)."""
        self._step = None
        if drop_held_mask:
            self.held_mask_bits = None

    def mode_switched(self, training: bool) -> None:
        """train()/eval() of the module: rebuild from the current weight at the next forward (EMA
        validation swaps weights in through .data around eval(), which no version counter sees).
        A held mask computed since the switch into eval mode came from the weights validated
        there, so back in training it is computed again, from the trained weight, for the same
        refresh step; a held mask computed in training stays held through validation."""
        self.invalidate(drop_held_mask=training and self._held_since_switch)
        self._held_since_switch = False

    def resume_step_count(self, step_count: int) -> None:
        """Count steps on from `step_count` (a restored checkpoint's), with nothing pending."""
        self.steps = int(step_count)
        self._watch.reset()  # the saved count includes a step taken since the last use
        self._terms, self._terms_before_owner = StepTerms(), 0

    def step_count(self) -> int:
        """The step count the next use will see (a boundary since the last use included)."""
        if self.iteration_driven:
            return self.steps
        pending = self._watch.peek()
        guessed = self._watch.guessed if self._watch.owned else 0
        return self.steps - guessed + int(pending)

    def step(self, weight, sparsity, backend, transposable: Optional[bool] = None) -> WeightStep:
        """This step's WeightStep for `weight` under `sparsity`, built at the first call after a boundary."""
        refuse_graph_capture(weight, sparsity)
        refuse_megatron_fsdp(weight)
        crossed = self._watch.look(weight)
        if self._watch.guessed and self._watch.owned:
            self._settle_guessed_steps(sparsity)
        if crossed:
            self._step = None
            if not self.iteration_driven:
                self.steps += 1
                self._new_terms()
        if self._watch.interleaved:
            self._watch.interleaved = False
            self._warn_unowned(sparsity, weight)
        transposable = sparsity.mask == "transposable" if transposable is None else transposable
        # None holds: the dgrad operand is built once per step, not once per micro-batch
        hold = sparsity.hold_backward_weight is not False
        rule = _mask_rule(sparsity)
        mask_key = (
            rule,
            sparsity.prunes_weights,
            sparsity.mask_refresh_interval,
            weight.data_ptr(),
            tuple(weight.shape),
            weight.dtype,
            weight.device,
            weight._version,
        )
        step = self._step
        if step is None or mask_key != self._mask_key:
            if self._rule is not None and rule != self._rule:
                self.held_mask_bits = (
                    None  # re-enabled, or a new mask rule: prune the current weight
                )
            self._rule, self._mask_key = rule, mask_key
            bits = self._mask_bits(weight, sparsity) if sparsity.prunes_weights else None
            self._step = self._new_step(weight, bits, backend, transposable, hold, sparsity)
            self._built_from = weight.detach().clone() if verify_mode() else None
        elif (step.backend, step.transposable, step.hold_backward) != (
            backend,
            transposable,
            hold,
        ) or (step.rule, step.wgrad) != _rules(sparsity, step.pruned):
            self._step = self._new_step(
                weight, step.mask_bits, backend, transposable, hold, sparsity
            )  # same mask, same step
        elif verify_mode():
            self._verify_unchanged(weight)
        return self._step

    def _new_terms(self) -> None:
        if not self._terms.pending and not self._watch.owned:
            self._terms_before_owner += 1
        self._terms = StepTerms()

    def _settle_guessed_steps(self, sparsity) -> None:
        """The weight's optimizer has become known: the boundaries counted before were other
        optimizers' steps. Take them back from the step count; warn if they made a gradient term
        count twice."""
        guessed, self._watch.guessed = self._watch.guessed, 0
        added = self._terms_before_owner + (not self._terms.pending)
        self._terms_before_owner = 0
        if self.iteration_driven:
            return
        self.steps = max(self.steps - guessed, 0)
        self.refreshed_at = min(self.refreshed_at, self.steps)
        if added > 1 and gradient_rule(sparsity).per_step_term:
            warn_once(
                f"megasparse: another optimizer stepped between micro-batches of a step before the "
                f"optimizer of a sparse weight had stepped once (megasparse learns which optimizer "
                f"owns a weight at that optimizer's first step), so the {sparsity.gradient} term "
                "may have been added more than once in that weight's first step (unless its "
                "gradient was zeroed in between). Later steps are exact. "
                "To be exact from the first step, drive the steps by iteration: "
                "SparsitySchedule.apply(model, iteration) or module.set_sparsity_iteration(it)."
            )

    def _warn_unowned(self, sparsity, weight) -> None:
        if self.iteration_driven or not (
            gradient_rule(sparsity).per_step_term or sparsity.mask_refresh_interval > 1
        ):
            return
        warn_once(
            "megasparse: no optimizer that has stepped holds a sparse weight "
            f"{tuple(weight.shape)} (nor its main_param): e.g. Megatron's distributed optimizer "
            "on a rank without a shard of it, or an optimizer that keeps its own main copies. So "
            "every optimizer step counts as its step boundary, and here optimizers stepped at "
            "different times: a step of another model's optimizer between its micro-batches "
            "counts as its step too, so srste/masked_decay may be added more than once per step "
            "and held masks refresh early. Drive its steps by iteration instead: "
            "SparsitySchedule.apply(model, iteration) (the Megatron-LM hook does) or "
            "module.set_sparsity_iteration(iteration) once per iteration."
        )

    def _verify_unchanged(self, weight) -> None:
        """Verify mode: the weight must still be the one this step's operands were built from."""
        built_from = self._built_from
        if built_from is None:  # verify mode switched on within the step
            self._built_from = weight.detach().clone()
            return
        if not _same_bits(built_from, weight):
            raise RuntimeError(
                f"megasparse ({VERIFY_ENV}=1): a sparse weight {tuple(weight.shape)} "
                f"{weight.dtype} was written after this step's 2:4 state (mask, W*M, compressed "
                "operands) was built, by a write that is no optimizer step, keeps the storage and "
                "bypasses the version counter: a write through .data such as "
                "`p.data -= lr * p.grad` or `p.data.copy_(ema)` (an EMA weight swap). The layer "
                "would compute with the old W*M. Fix: call megasparse.weights_changed(model) "
                "after such writes, or write in place under torch.no_grad() "
                "(`with torch.no_grad(): p.copy_(ema)`), which bumps the version counter."
            )

    # --- what the config adds to a step: S-STE's beta, MVUE seeds, flip rate -------------------

    def _new_step(self, weight, bits, backend, transposable, hold, sparsity) -> WeightStep:
        beta = None
        rule = gradient_rule(sparsity)
        if bits is not None and rule.fixed_scale:
            if self.sste_beta is None:  # the first sparse forward: fixed from now on
                self.sste_beta = rule.scale(weight, self._sum_group(weight))
            beta = self.sste_beta.to(weight.device)
        seed = None
        if sparsity.wgrad_sparsity is not None:
            seed = mvue.step_seed(sparsity.wgrad_seed, self.index, self.steps)
        return WeightStep(
            weight,
            bits,
            backend,
            transposable,
            hold,
            sparsity=sparsity,
            sste_beta=beta,
            wgrad_seed=seed,
            terms=self._terms,
        )

    def _sum_group(self, weight) -> Optional[dist.ProcessGroup]:
        """The group S-STE's beta is summed over (`process_group`); None for one rank."""
        group = self.process_group
        if callable(group):
            group = group(weight)
        return group if group is not None and group.size() > 1 else None

    def mask_of(self, weight, sparsity) -> torch.Tensor:
        """The 2:4 mask the config's rule gives for `weight` now (not held, not cached)."""
        return compute_mask(weight, sparsity, self.mask_source)

    def _mask_bits(self, weight, sparsity):
        interval = sparsity.mask_refresh_interval
        if interval > 1:
            held = self.held_mask_bits
            stale = (
                held is None
                or self.held_shape != tuple(weight.shape)
                or held.device != weight.device
                or self.steps - self.refreshed_at >= interval
                or self.steps < self.refreshed_at
            )
            if not stale and self._held_unchecked:
                stale = not self._restored_mask_follows_rule(held, weight, sparsity)
            if not stale:
                return held
        self._held_unchecked = False
        self.mask_computations += 1
        bits = pack_mask(self.mask_of(weight, sparsity))
        if sparsity.track_flip_rate:
            self.flips.record(bits, weight.shape, self.steps)
        if interval > 1:
            self.held_mask_bits, self.held_shape, self.refreshed_at = (
                bits,
                tuple(weight.shape),
                self.steps,
            )
            self._held_since_switch = True
        return bits

    def current_mask(self, weight, sparsity) -> torch.Tensor:
        """The bool mask the module computes with now (all True when it computes dense)."""
        if not sparsity.prunes_weights:
            return torch.ones_like(weight, dtype=torch.bool)
        if self._step is not None:  # keep the step's operands: the mask does not depend on them
            return self.step(weight, sparsity, self._step.backend, self._step.transposable).mask()
        from megasparse.core.backends import BACKENDS

        return self.step(weight, sparsity, BACKENDS["dense"]).mask()

    def last_mask(self, weight, sparsity) -> torch.Tensor:
        """The mask this state last computed `weight` with (its held mask before the first step,
        else the rule's mask of `weight`), without building a step: statistics read it between
        steps and must not cross a step boundary, record a flip or hold a mask taken from a weight
        that Megatron may still be gathering."""
        if not sparsity.prunes_weights:
            return torch.ones_like(weight, dtype=torch.bool)
        step = self._step
        if step is not None and step.pruned and step.weight.shape == weight.shape:
            return step.mask()
        if self.held_mask_bits is not None and self.held_shape == tuple(weight.shape):
            return unpack_mask(self.held_mask_bits, weight.shape)
        return self.mask_of(weight, sparsity)

    def held_bytes(self) -> dict:
        step = {} if self._step is None else self._step.held_bytes()
        if (
            self.held_mask_bits is not None
            and self._step is not None
            and step.get("mask") is not None
            and self._step.mask_bits is self.held_mask_bits
        ):
            return step
        if self.held_mask_bits is not None:
            step["held_mask"] = _nbytes(self.held_mask_bits)
        return step
