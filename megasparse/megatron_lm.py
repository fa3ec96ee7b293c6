"""Hooks for Megatron-LM's pretrain_gpt.py (see patches/): flags, the per-iteration schedule, the spec.

    pretrain(..., extra_args_provider=megasparse.megatron_lm.extra_args_provider(other_provider))
    forward_step(...):  megasparse.megatron_lm.on_forward_step(model)
    launch flag:        --spec megasparse.megatron_lm sparse_gpt_layer_spec

megatron.training is imported only when these run inside Megatron-LM.
"""

from megatron.core.transformer.spec_utils import ModuleSpec

from megasparse.megatron.args import add_args, config_from_args, schedule_from_args
from megasparse.specs import require_transformer_engine, sparsify_spec

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
    """Put the model's sparse layers in the phase of the current iteration. Cheap; call every
    forward_step.

    With --sparsity-flip-rate it also logs the sparse layers' flip rate and kept |W| share to
    Megatron's tensorboard / wandb writers every --log-interval iterations (`log_sparsity_stats`).
    """
    args = args if args is not None else _megatron_args()
    key = id(args)
    if key not in _schedules:
        _schedules.clear()
        _schedules[key] = schedule_from_args(args)
    iteration = getattr(args, "curr_iteration", 0) or 0
    if getattr(args, "sparsity_flip_rate", False):
        _log_once_per_interval(model, iteration, getattr(args, "log_interval", 100) or 100)
    return _schedules[key].apply(model, iteration)


# --- quality: flip rate and kept |W| to Megatron's writers --------------------------------

_last_logged = {"iteration": None}


def _log_once_per_interval(model, iteration: int, interval: int) -> None:
    """Called by every micro-batch's forward_step: log at the first call of every interval-th
    iteration."""
    if iteration % interval or _last_logged["iteration"] == iteration:
        return
    _last_logged["iteration"] = iteration
    from megatron.training import get_tensorboard_writer, get_wandb_writer

    log_sparsity_stats(model, iteration, get_tensorboard_writer(), get_wandb_writer())


def sparsity_scalars(model) -> dict:
    """{name: float}: each sparse layer's flip rate (share of its mask entries changed at its last
    mask computation; Hu et al., ICML 2024) and kept |W| share, with their means over the layers.

    This rank's shards only (Megatron's writers live on the last rank). One host sync (the read).
    """
    import torch

    from megasparse.statistics import stats

    names, values = [], []
    for name, entry in stats(model).items():
        names.append(f"kept_weight_l1/{name}")
        values.append(entry["kept_weight_l1"].float().reshape(()))
        if entry.get("flip_rate") is not None:
            names.append(f"flip_rate/{name}")
            values.append(entry["flip_rate"].float().reshape(()))
    if not values:
        return {}
    result = dict(zip(names, torch.stack([v.to(values[0].device) for v in values]).tolist()))
    for kind in ("flip_rate", "kept_weight_l1"):
        own = [v for n, v in result.items() if n.startswith(kind + "/")]
        if own:
            result[f"{kind}/mean"] = sum(own) / len(own)
    return result


def log_sparsity_stats(model, iteration: int, tb_writer=None, wandb_writer=None) -> dict:
    """Write `sparsity_scalars(model)` as megasparse/<name> to a tensorboard SummaryWriter and/or
    a wandb run (Megatron's `get_tensorboard_writer()` / `get_wandb_writer()`). Returns them."""
    if tb_writer is None and wandb_writer is None:
        return {}
    scalars = {f"megasparse/{name}": value for name, value in sparsity_scalars(model).items()}
    if tb_writer is not None:
        for name, value in scalars.items():
            tb_writer.add_scalar(name, value, iteration)
    if wandb_writer is not None and scalars:
        wandb_writer.log(scalars, iteration)
    return scalars


def gpt_layer_spec_from_args(args):
    """Megatron-LM's own GPT layer spec for these arguments, made sparse by the --sparsity-* flags."""
    from megatron.core.models.gpt import gpt_layer_specs

    sparsity = config_from_args(args)
    if sparsity.weights is None and sparsity.activations is None:
        raise ValueError(
            "--spec megasparse.megatron_lm sparse_gpt_layer_spec needs --sparsity-weights 2:4 and/or "
            "--sparsity-activations"
        )
    freq = getattr(args, "moe_layer_freq", 1)
    if getattr(args, "num_experts", None) and freq not in (1, None):
        raise NotImplementedError(
            "megasparse: --moe-layer-freq mixes dense and MoE layers, which needs a block spec; build it with "
            "get_gpt_decoder_block_spec and pass it through megasparse.sparsify_spec in your own builder"
        )
    common = dict(
        num_experts=getattr(args, "num_experts", None),
        moe_grouped_gemm=getattr(args, "moe_grouped_gemm", False),
        qk_layernorm=getattr(args, "qk_layernorm", False),
        multi_latent_attention=getattr(args, "multi_latent_attention", False),
    )
    if getattr(args, "transformer_impl", "local") == "transformer_engine":
        require_transformer_engine("--transformer-impl transformer_engine (Megatron-LM's default)")
        base = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**common)
    else:
        base = gpt_layer_specs.get_gpt_layer_local_spec(
            **common,
            normalization=getattr(args, "normalization", None),
            qk_l2_norm=getattr(args, "qk_l2_norm", False),
        )
    return sparsify_spec(base, sparsity, args.sparsity_targets)


class MegatronLMSpec(ModuleSpec):
    """A layer spec that Megatron-LM's `--spec` can name: resolved from the run's arguments when the
    model is built (Megatron-LM reads the named object itself, without calling it)."""

    def __init__(self, args=None):  # pylint: disable=super-init-not-called  (fields resolve lazily)
        self.__dict__["_args"] = args
        self.__dict__["_resolved"] = None

    def _spec(self):
        if self.__dict__["_resolved"] is None:
            if self.__dict__["_args"] is None:
                self.__dict__["_args"] = megatron_lm_args()
            args = self.__dict__["_args"]
            self.__dict__["_resolved"] = gpt_layer_spec_from_args(args)
        return self.__dict__["_resolved"]

    module = property(lambda self: self._spec().module)
    params = property(lambda self: self._spec().params)
    submodules = property(lambda self: self._spec().submodules)
    metainfo = property(lambda self: getattr(self._spec(), "metainfo", {}))

    def __repr__(self):
        return "MegatronLMSpec(<GPT layer spec from Megatron-LM's arguments and the --sparsity-* flags>)"


# Megatron-LM: --spec megasparse.megatron_lm sparse_gpt_layer_spec
sparse_gpt_layer_spec = MegatronLMSpec()
