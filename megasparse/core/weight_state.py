"""The per-optimizer-step state of a sparse weight: its mask and the GEMM operands derived from it.

Weights change only at the optimizer step, and a step runs k micro-batches. So everything that
depends only on the weight is built at the first use after a step boundary and reused by every
micro-batch's forward, backward and recompute in that step (a `WeightStep`):
- the 2:4 mask, bit-packed (1/16 of a bf16 weight), held for `mask_refresh_interval` steps;
- the forward GEMM operand: W*M compressed for the sparse backends (W*M itself for `dense`);
- the input-gradient operand: the compressed (W*M)^T for transposable masks, W*M for 1d masks;
  held for the step or rebuilt in each backward (`SparsityConfig.hold_backward_weight`).

The step-boundary rule (also in the README). The state is rebuilt from the current weight at the
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

This module is the only copy of the mask policy (`compute_mask`) and of held-mask checkpoint I/O;
every sparse module (local and TE linears, experts, FP8) goes through it.

Training-quality pieces (each marked "quality" below, all off unless the config asks):
- S-STE (gradient="sste", Hu, Zhu, Chen, NeurIPS 2024): the step's forward weight is
  beta * S(W) (megasparse.core.gradients.SsteRule) instead of W*M; same hard mask M (the
  support of S(W) lies inside it). beta is computed once per weight, at its first sparse
  forward (so after a dense warm-up, from the warmed-up weight), summed over the weight's
  tensor-parallel group (`SparseWeightState.tp_group`, else Megatron's TP group of the
  weight: TP-invariant), and saved in the extra state (`extra_state` / `restore_extra_state`).
- MVUE weight gradients (wgrad_sparsity="mvue"): `WeightStep.wgrad_generator()` is a
  torch.Generator on the weight's device, seeded once per step from (wgrad_seed, global rank,
  weight index, step count): reproducible, no host sync.
- Flip rate (track_flip_rate, Hu et al., ICML 2024): at every mask computation the new bits
  are XOR-ed with the previous mask's and counted on the device (a popcount table): the share
  of mask entries that changed since the last mask (`flip_rate`, a 0-dim tensor).
"""

import itertools
import os
from typing import Optional

import torch
import torch.distributed as dist

from megasparse.core import step_clock
from megasparse.core.backends import _warn_once
from megasparse.config import _MASK_RULE_FIELDS
from megasparse.core.gradients import gradient_rule, wgrad_rule
from megasparse.fp8.scaling import quantized_weight
from megasparse.core.masks import check_finite, follows_pattern, weight_mask

VERIFY_ENV = "MEGASPARSE_VERIFY_STATE"

_BIT_WEIGHTS = {}
_POPCOUNT = {}  # quality: bits set in each uint8 value, per device (flip rate)
_STATE_INDEX = itertools.count()  # quality: weight index for the MVUE seeds (construction order)
_CONFIG_SERIALS = itertools.count(1)  # one per SparsityConfig object, never reused (unlike id())


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


def compute_mask(weight: torch.Tensor, sparsity) -> torch.Tensor:
    """The 2:4 mask the config's rule gives for `weight` (bool, shaped like it).
    FP8 quantize-then-prune: the mask of the e4m3 values of W (megasparse.fp8.linear)."""
    weight = weight.detach()
    if getattr(sparsity, "fp8_order", None) == "quantize-then-prune":
        if sparsity.nonfinite_weights == "error":  # saturation would hide an Inf
            check_finite(weight)
        weight = quantized_weight(weight)
    return weight_mask(weight, sparsity.mask, sparsity.nonfinite_weights)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bits, 8 elements per byte (the flattened tensor, zero-padded)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    key = mask.device
    if key not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[key] = 2 ** torch.arange(8, device=mask.device, dtype=torch.uint8)
    return (flat.view(-1, 8).to(torch.uint8) * _BIT_WEIGHTS[key]).sum(-1, dtype=torch.uint8)


def unpack_mask(bits: torch.Tensor, shape) -> torch.Tensor:
    numel = 1
    for size in shape:
        numel *= size
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return ((bits.unsqueeze(-1) >> shifts) & 1).bool().reshape(-1)[:numel].reshape(shape)


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
        """quality: this step's generator of MVUE draws (created and seeded once per step)."""
        if self._wgrad_generator is None:
            generator = torch.Generator(device=self.weight.device)
            generator.manual_seed(0 if self.wgrad_seed is None else self.wgrad_seed)
            self._wgrad_generator = generator
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
        # a held 1d backward (a transposable backward uses the compressed (W*M)^T instead), or
        # the caller's dense GEMM
        if hold or self.backend.name == "dense" or (self.hold_backward and not self.transposable):
            self._dense = masked
        return masked

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
        for key, value in self._extras.items():  # objects listing their tensors: held_tensors()
            held[str(key)] = sum(_nbytes(t) for t in value.held_tensors())
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


class SparseWeightState:
    """The per-step state of one weight of a sparse module (see the module docstring)."""

    def __init__(self):
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
        # quality (see the module docstring)
        self.index = next(_STATE_INDEX)
        self.tp_group = None  # S-STE's beta is summed over it (None: Megatron's TP group)
        self.sste_beta: Optional[torch.Tensor] = None
        self.flip_prev_bits = None
        self.flip_rate: Optional[torch.Tensor] = None  # share changed at the last mask
        self.flip_step = None  # the step count of that mask
        self._flip_shape = None

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
        hold = (
            transposable if sparsity.hold_backward_weight is None else sparsity.hold_backward_weight
        )
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
            _warn_once(
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
        _warn_once(
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

    # --- quality: S-STE's beta, MVUE seeds, flip rate ------------------------------------------

    def _new_step(self, weight, bits, backend, transposable, hold, sparsity) -> WeightStep:
        beta = None
        rule = gradient_rule(sparsity)
        if bits is not None and rule.fixed_scale:
            if self.sste_beta is None:  # the first sparse forward: fixed from now on
                self.sste_beta = rule.scale(weight, _tp_group_of(weight, self.tp_group))
            beta = self.sste_beta.to(weight.device)
        seed = None
        if sparsity.wgrad_sparsity is not None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            seed = hash((sparsity.wgrad_seed, rank, self.index, self.steps)) & (2**63 - 1)
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

    def _record_flips(self, bits, shape) -> None:
        """Share of mask entries that differ from the previous mask's (on the device, no sync)."""
        prev = self.flip_prev_bits
        if (
            prev is not None
            and prev.shape == bits.shape
            and prev.device == bits.device
            and self._flip_shape == tuple(shape)
        ):
            table = _POPCOUNT.get(bits.device)
            if table is None:
                values = torch.arange(256, device=bits.device)
                table = sum((values >> k) & 1 for k in range(8)).to(torch.int32)
                _POPCOUNT[bits.device] = table
            changed = table[(prev ^ bits).long()].sum(dtype=torch.int64)
            numel = 1
            for size in shape:
                numel *= size
            self.flip_rate = changed.to(torch.float32) / numel
            self.flip_step = self.steps
        self.flip_prev_bits, self._flip_shape = bits, tuple(shape)

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
        bits = pack_mask(compute_mask(weight, sparsity))
        if sparsity.track_flip_rate:  # quality: flip rate
            self._record_flips(bits, weight.shape)
        if interval > 1:
            self.held_mask_bits, self.held_shape, self.refreshed_at = (
                bits,
                tuple(weight.shape),
                self.steps,
            )
            self._held_since_switch = True
        return bits

    def _restored_mask_follows_rule(self, bits, weight, sparsity) -> bool:
        """A held mask from a checkpoint must be 2:4 under the layer's rule (checked once, one
        host sync); else it is recomputed from the weight, with a warning."""
        self._held_unchecked = False
        mask = unpack_mask(bits, weight.shape)
        if follows_pattern(mask, sparsity.mask):
            return True
        if sparsity.mask == "transposable" and follows_pattern(mask, "1d"):
            problem = "its transpose is not 2:4 (a 1d mask, e.g. saved by a mask='1d' layer)"
        else:
            problem = "some group of 4 along the input dim does not keep exactly 2"
        _warn_once(
            f"megasparse: a held mask restored from a checkpoint for a weight "
            f"{tuple(weight.shape)} is not 2:4 under the layer's rule mask={sparsity.mask!r}: "
            f"{problem}. It is recomputed from the restored weight now."
        )
        return False

    def current_mask(self, weight, sparsity) -> torch.Tensor:
        """The bool mask the module computes with now (all True when it computes dense)."""
        if not sparsity.prunes_weights:
            return torch.ones_like(weight, dtype=torch.bool)
        if self._step is not None:  # keep the step's operands: the mask does not depend on them
            return self.step(weight, sparsity, self._step.backend, self._step.transposable).mask()
        from megasparse.core.backends import BACKENDS

        return self.step(weight, sparsity, BACKENDS["dense"]).mask()

    # --- held masks in checkpoints --------------------------------------------------------
    # The torch state_dict carries them in the module's `_extra_state` entry (the parent's keys);
    # dist checkpoints carry them as a tensor sharded like the weight, so TP resharding works.

    def held_mask(self) -> Optional[torch.Tensor]:
        if self.held_mask_bits is None:
            return None
        return unpack_mask(self.held_mask_bits, self.held_shape)

    def extra_state(self, sparsity) -> Optional[dict]:
        state = {}
        if sparsity.mask_refresh_interval > 1:  # held masks: where in the interval the run is
            state["megasparse_step_count"] = self.step_count()
            if self.held_mask_bits is not None:
                state["megasparse_held_mask"] = self.held_mask()
                state["refreshed_at"] = self.refreshed_at
        if self.sste_beta is not None:  # quality: S-STE's fixed beta
            state["megasparse_sste_beta"] = self.sste_beta.detach().cpu().clone()
        return state or None  # None: exactly the parent's value

    def restore_extra_state(self, state, weight) -> None:
        """Restore what `extra_state` saved (held mask, step count, S-STE's beta); None or {}:
        nothing saved."""
        state = state if isinstance(state, dict) else {}
        self.restore_held_mask(
            state.get("megasparse_held_mask"),
            state.get("refreshed_at", 0),
            weight,
            state.get("megasparse_step_count"),
        )
        beta = state.get("megasparse_sste_beta")
        self.sste_beta = None if beta is None else torch.as_tensor(beta).clone()

    def restore_held_mask(self, mask, refreshed_at, weight, step_count=None) -> None:
        """Restore a held mask and the step count from a checkpoint. mask None, or of another
        shape: the next use recomputes it. step_count None: a checkpoint written before step
        counts were saved (the count resumes at the mask's refresh step, with a warning)."""
        self._step = None
        if step_count is not None:  # the run goes on where it was saved
            self.steps = int(step_count)
            self._watch.reset()  # the saved count includes a step taken since the last use
            self._terms, self._terms_before_owner = StepTerms(), 0
        if mask is None or weight is None or tuple(mask.shape) != tuple(weight.shape):
            self.held_mask_bits = None
            return
        self.held_mask_bits = pack_mask(mask.to(device=weight.device, dtype=torch.bool))
        self.held_shape = tuple(weight.shape)
        self.refreshed_at = int(refreshed_at)
        if step_count is None:
            _warn_once(
                "megasparse: this checkpoint's held masks have no step count (written by an "
                "older megasparse); the step count resumes at each mask's refresh step, so the "
                "next mask refresh may come at another step than in the run that saved it. "
                "Checkpoints saved from now on carry the step count."
            )
            self.steps = max(self.steps, self.refreshed_at)  # held until the next refresh point
        self._rule = None  # a restored mask is not dropped by the first use's rule check
        self._held_unchecked = True  # but checked against the rule at its first use

    def sharded_entries(self, weight, sparsity) -> dict:
        """The held-mask tensors for a dist checkpoint (always present for held-mask layers).

        megasparse_refreshed_at is [refreshed_at, step count, 1]; checkpoints written before
        the step count was saved hold [refreshed_at] and load as [refreshed_at, 0, 0] (its
        sharded tensor allows a shape mismatch and zero-fills): `parse_refreshed_at`."""
        held = self.held_mask()
        if held is None:
            held = compute_mask(weight, sparsity)
        return {
            "megasparse_held_mask": held.to(torch.uint8),
            "megasparse_refreshed_at": torch.tensor([self.refreshed_at, self.step_count(), 1]),
        }

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


def parse_refreshed_at(entry):
    """(refreshed_at, step count or None) from a dist checkpoint's megasparse_refreshed_at."""
    values = [int(v) for v in entry.reshape(-1).tolist()]
    has_count = len(values) >= 3 and values[2] == 1
    return values[0], values[1] if has_count else None


def _tp_group_of(weight, group):
    """quality: the group S-STE's beta is summed over: `group`, else Megatron's tensor-parallel
    group of a weight marked tensor-parallel (the expert TP group for expert weights), else None."""
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
