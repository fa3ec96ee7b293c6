"""Launch flags: `add_args(parser)` (usable as Megatron-LM's extra_args_provider) and their config objects."""

import argparse
import math

from megasparse.config import (
    BACKENDS,
    check_decay,
    parse_activation_pattern,
    DEFAULT_TARGETS,
    FP8_FORMATS,
    FP8_ORDERS,
    Fp8Order,
    GRADIENT_MODES,
    MASK_KINDS,
    TARGETS,
    WEIGHT_PATTERNS,
    WGRAD_SPARSITY,
    SparsityConfig,
)
from megasparse.megatron.schedule import SparsitySchedule


def _none_or(value: str):
    return None if value.lower() == "none" else value


def _none_or_one_of(allowed) -> dict:
    """add_argument keywords of a flag taking 'none' or one of `allowed` (None among them): help,
    usage and errors spell the choices as typed ('none'), not as parsed (None)."""
    typed = ["none" if choice is None else choice for choice in allowed]

    def parse(value: str):
        choice = _none_or(value)
        if choice not in allowed:
            spelled = ", ".join(repr(t) for t in typed)
            raise argparse.ArgumentTypeError(f"expected one of {spelled}; got {value!r}")
        return choice

    return {"type": parse, "metavar": "{" + ",".join(typed) + "}"}


def _count(value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {value!r}")
    return number


def _non_negative_int(value: str) -> int:
    return _count(value, 0)


def _positive_int(value: str) -> int:
    return _count(value, 1)


def _iters_or_fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    # checked before int(number): int() of inf raises OverflowError, which argparse does not catch
    if not math.isfinite(number) or number < 0 or (number >= 1 and number != int(number)):
        raise argparse.ArgumentTypeError(
            f"expected an iteration count or a fraction in [0, 1), got {value!r}"
        )
    return number


def _decay(value: str) -> float:
    try:
        number = float(value)
        check_decay("decay", number, "2e-4")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {value!r}") from None
    return number


def _pattern(value: str, examples: str):
    pattern = _none_or(value)
    try:
        parse_activation_pattern(pattern)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'none', {examples} with V and M powers of two, N = 2 (M >= 4) or "
            f"N = 4 (M >= 8), e.g. '64:2:8' or '64:4:16'; got {value!r}"
        ) from None
    return pattern


def _activations(value: str):
    return _pattern(value, "'2:4' or 'V:N:M'")


def _activation_wgrad(value: str):
    return _pattern(value, "or 'V:N:M' (along tokens)")


def _decay_flag(group, flag: str, default: float, help: str) -> None:
    group.add_argument(flag, type=_decay, default=default, help=help)


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the --sparsity-* flags to a Megatron-LM (or any argparse) parser and return it."""
    g = parser.add_argument_group(
        "megasparse", "Sparse training with megasparse (2:4 weights, sparse activations)"
    )
    g.add_argument(
        "--sparsity-weights",
        default=None,
        **_none_or_one_of(WEIGHT_PATTERNS),
        help="Prune the targeted linears' weights with a 2:4 magnitude mask ('2:4') or not ('none', default).",
    )
    g.add_argument(
        "--sparsity-activations",
        type=_activations,
        default=None,
        metavar="{none,2:4,V:N:M}",
        help="Sparsify the FFN activation (fc2's input): 'none' (default), '2:4', 'V:2:M' (VENOM: "
        "per V tokens the 4 strongest of every M neurons, 2 of them per token; '64:2:8' keeps 25%%) "
        "or 'V:4:M' (all 4 chosen neurons; '64:4:16' keeps 25%%). With M >= 8 the activation is "
        "held compacted and the FFN GEMMs reading it skip 1 - 4/M of their work. Needs a "
        "non-gated Squared-ReLU FFN (--squared-relu, no --swiglu). Both specs: "
        "--transformer-impl local or transformer_engine (bf16/fp16; not with --fp8-format).",
    )
    g.add_argument(
        "--sparsity-activation-wgrad",
        type=_activation_wgrad,
        default=None,
        metavar="{none,V:N:M}",
        help="Both-ways weight gradients of the FFN: 'none' (default: exact) or 'V:4:M' (e.g. "
        "'64:4:8'): the operands of fc2's and fc1's weight-gradient GEMMs (the activation and "
        "its gradient) are sparsified again along tokens, 4 of every M tokens per V neurons, so "
        "those GEMMs skip work too. An approximation (biased top-k) of the weight gradients. "
        "Needs --sparsity-activations V:N:M with M >= 8.",
    )
    g.add_argument(
        "--sparsity-mask",
        default="1d",
        choices=MASK_KINDS,
        help="'1d': 2 of every 4 weights along the input dim. 'transposable': 2:4 along both dims "
        "(exact optimum per 4x4 tile), so the backward input-gradient GEMM is sparse too.",
    )
    g.add_argument(
        "--sparsity-grad",
        default="ste",
        choices=GRADIENT_MODES,
        help="Gradient of the dense master weight: 'ste' (dense gradient), 'masked' "
        "(zero for pruned weights), 'srste' (dense gradient plus "
        "--sparsity-srste-decay times the pruned weights), 'masked_decay' (Hu et "
        "al. ICML 2024: plus --sparsity-masked-decay-factor times the pruned "
        "weights, once per step), 'sste' (S-STE, Hu et al. NeurIPS 2024: forward "
        "weight beta * soft-threshold(W), straight-through gradient).",
    )
    _decay_flag(g, "--sparsity-srste-decay", 2e-4, "SR-STE decay lambda (default 2e-4).")
    g.add_argument(
        "--sparsity-targets",
        nargs="+",
        default=list(DEFAULT_TARGETS),
        choices=TARGETS,
        help="Which linears become sparse (default: fc1 fc2 experts). Embedding and output layer never do.",
    )
    g.add_argument(
        "--sparsity-backend",
        default="auto",
        choices=BACKENDS,
        help="Sparse GEMM backend: 'auto' (cuSPARSELt, else CUTLASS, else dense with a warning), "
        "'cusparselt', 'cutlass', or 'dense' (masked dense GEMM: exact, no speed-up).",
    )
    g.add_argument(
        "--sparsity-dense-warmup-iters",
        type=_non_negative_int,
        default=0,
        help="Train dense for this many iterations first (default 0).",
    )
    g.add_argument(
        "--sparsity-dense-final-iters",
        type=_iters_or_fraction,
        default=0,
        help="Train dense for the last N iterations, or the last fraction of --train-iters if < 1 (default 0).",
    )
    g.add_argument(
        "--sparsity-mask-refresh-iters",
        type=_positive_int,
        default=1,
        help="Recompute masks from the dense weights every N iterations (default 1: every iteration); "
        "held masks are saved in checkpoints.",
    )
    # training-quality options
    _decay_flag(
        g,
        "--sparsity-masked-decay-factor",
        6e-5,
        "lambda_W of --sparsity-grad masked_decay (default 6e-5, Hu et al.'s GPT-2 124M).",
    )
    g.add_argument(
        "--sparsity-wgrad",
        default=None,
        **_none_or_one_of(WGRAD_SPARSITY),
        help="'mvue': the weight-gradient GEMM uses the output gradient pruned 2:4 "
        "along tokens by the minimum-variance unbiased estimator (Chmiel et al. "
        "ICLR 2023); 'none' (default).",
    )
    g.add_argument(
        "--sparsity-wgrad-seed",
        type=int,
        default=0,
        help="Base seed of the MVUE draws (with the rank, the weight and the step).",
    )
    g.add_argument(
        "--sparsity-flip-rate",
        action="store_true",
        help="Track the mask flip rate (share of mask entries changed since the last "
        "mask, on the device) and log it with the kept |W| share to Megatron's "
        "tensorboard/wandb writers every --log-interval iterations.",
    )
    g.add_argument(
        "--sparsity-fp8",
        default=None,
        **_none_or_one_of(FP8_FORMATS),
        help="FP8 GEMMs in the sparse linears of the local spec (--transformer-impl local, "
        "which has no FP8 of its own): 'hybrid' (e4m3 forward, e5m2 gradients) or 'e4m3', "
        "current per-tensor scaling; FP8 2:4 on cuSPARSELt (sm90). With Transformer Engine use "
        "Megatron's --fp8-format instead. 'none' (default).",
    )
    g.add_argument(
        "--sparsity-hold-backward-weight",
        default="auto",
        choices=("auto", "true", "false"),
        help="The input-gradient GEMM's weight operand: held for the optimizer step ('auto', "
        "default, = 'true': W*M for 1d masks, the compressed (W*M)^T for transposable ones), or "
        "rebuilt in each backward ('false': saves one weight-sized tensor per sparse weight, "
        "costs an unpack + multiply per micro-batch).",
    )
    g.add_argument(
        "--sparsity-fp8-order",
        default=Fp8Order.PRUNE_THEN_QUANTIZE.value,
        choices=FP8_ORDERS,
        help="With --sparsity-fp8: mask W then quantize W*M (amax after pruning, default), or "
        "quantize W then take the mask of the FP8 values.",
    )
    return parser


def config_from_args(args) -> SparsityConfig:
    wgrad = getattr(args, "sparsity_activation_wgrad", None)
    activations = parse_activation_pattern(args.sparsity_activations)
    if wgrad is not None and not (activations is not None and activations.compacts):
        # both-ways weight gradients sparsify the compacted activation's operands along tokens
        raise ValueError(
            f"--sparsity-activation-wgrad {wgrad} needs a compacted activation, "
            f"--sparsity-activations V:N:M with M >= 8 (e.g. 64:4:16), got "
            f"--sparsity-activations {args.sparsity_activations or 'none'}; add one or drop "
            "--sparsity-activation-wgrad"
        )
    te_fp8 = getattr(args, "fp8", None)  # Megatron-LM's --fp8-format
    if (
        activations is not None
        and te_fp8
        and getattr(args, "transformer_impl", "local") == "transformer_engine"
    ):
        raise ValueError(
            f"--sparsity-activations {args.sparsity_activations} does not run under FP8 with "
            f"--transformer-impl transformer_engine (--fp8-format {te_fp8}): the sparse activation "
            "is a bf16/fp16 GEMM operand. Drop --fp8-format, or use --sparsity-activations none "
            "to keep FP8 with --sparsity-weights 2:4."
        )
    if getattr(args, "transformer_impl", "local") == "transformer_engine":
        if getattr(args, "sparsity_fp8", None) is not None:
            raise ValueError(
                f"--sparsity-fp8 {args.sparsity_fp8} is the local spec's FP8 path; with "
                "--transformer-impl transformer_engine the sparse TE linears follow Transformer "
                "Engine's FP8 (--fp8-format). Drop --sparsity-fp8, or use --transformer-impl local."
            )
        if args.sparsity_mask_refresh_iters != 1:
            raise ValueError(
                f"--sparsity-mask-refresh-iters {args.sparsity_mask_refresh_iters} holds masks "
                "across steps, which the sparse TE linears cannot checkpoint (TE's _extra_state "
                "carries its FP8 metadata). Use --sparsity-mask-refresh-iters 1 (masks are still "
                "computed once per optimizer step), or --transformer-impl local."
            )
    if activations is not None and getattr(args, "swiglu", False):
        raise ValueError(
            f"--sparsity-activations {args.sparsity_activations} needs a non-gated Squared-ReLU "
            "FFN, but --swiglu makes it gated; use --squared-relu without --swiglu, or "
            "--sparsity-activations none to keep 2:4 weights only"
        )
    return SparsityConfig(
        weights=args.sparsity_weights,
        activations=args.sparsity_activations,
        activation_wgrad=getattr(args, "sparsity_activation_wgrad", None),
        mask=args.sparsity_mask,
        gradient=args.sparsity_grad,
        srste_decay=args.sparsity_srste_decay,
        backend=args.sparsity_backend,
        mask_refresh_interval=args.sparsity_mask_refresh_iters,
        activation_function="squared_relu" if getattr(args, "squared_relu", False) else None,
        masked_decay_factor=getattr(args, "sparsity_masked_decay_factor", 6e-5),
        wgrad_sparsity=getattr(args, "sparsity_wgrad", None),
        wgrad_seed=getattr(args, "sparsity_wgrad_seed", 0),
        track_flip_rate=getattr(args, "sparsity_flip_rate", False),
        fp8=getattr(args, "sparsity_fp8", None),
        fp8_order=getattr(args, "sparsity_fp8_order", Fp8Order.PRUNE_THEN_QUANTIZE.value),
        hold_backward_weight=_HOLD[getattr(args, "sparsity_hold_backward_weight", "auto")],
    )


_HOLD = {"auto": None, "true": True, "false": False}


def schedule_from_args(args) -> SparsitySchedule:
    train_iters = getattr(args, "train_iters", None)
    final = args.sparsity_dense_final_iters
    if 0 < final < 1:
        if not train_iters:
            raise ValueError("--sparsity-dense-final-iters as a fraction needs --train-iters")
        final = round(final * train_iters)
    try:
        return SparsitySchedule(
            dense_warmup_iters=args.sparsity_dense_warmup_iters,
            dense_final_iters=int(final),
            train_iters=train_iters,
        )
    except ValueError as e:  # name the flags the user gave
        raise ValueError(
            f"--sparsity-dense-warmup-iters {args.sparsity_dense_warmup_iters}, "
            f"--sparsity-dense-final-iters {args.sparsity_dense_final_iters}, "
            f"--train-iters {train_iters}: {e}"
        ) from None
