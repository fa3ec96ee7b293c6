"""Pretrain a GPT with megasparse through Megatron-LM's own loop, without patching Megatron-LM.

    torchrun --nproc-per-node 8 examples/pretrain_gpt_sparse.py \
        --tensor-model-parallel-size 2 --num-layers 24 --hidden-size 2048 \
        --num-attention-heads 16 --seq-length 4096 --max-position-embeddings 4096 \
        --micro-batch-size 2 --global-batch-size 256 \
        --train-iters 20000 --lr 3e-4 --bf16 --squared-relu --no-bias-gelu-fusion \
        --sparsity-weights 2:4 --sparsity-activations 2:4 --sparsity-dense-warmup-iters 1000 \
        --mock-data --tokenizer-type NullTokenizer --vocab-size 32000

It needs `megatron.training`, which megatron-core 0.17+ wheels ship (0.16 does not: apply patches/
to Megatron-LM's pretrain_gpt.py instead). All of Megatron-LM's flags work; megasparse adds the
`--sparsity-*` flags (megasparse.add_args). The model is Megatron-core's GPTModel with Megatron's
own layer spec for the flags (local or Transformer Engine), rewritten by megasparse.sparsify_spec;
the forward step puts every sparse layer in the iteration's dense/sparse phase.
Data: `--mock-data` or Megatron's indexed datasets (`--data-path`, `--split`).
"""

import inspect
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel

try:
    from megatron.training import get_args, get_tokenizer, pretrain, print_rank_0
    from megatron.training.arguments import core_transformer_config_from_args
except ImportError as error:  # megatron-core 0.16 and older ship no megatron.training
    raise SystemExit(
        "examples/pretrain_gpt_sparse.py needs megatron.training (megatron-core 0.17+ wheels, "
        "or a Megatron-LM checkout on PYTHONPATH); with older versions patch Megatron-LM "
        f"instead (patches/README.md): {error}"
    )

import megasparse
import megasparse.megatron_lm as megasparse_lm


def model_provider(
    pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None
):
    """Megatron-core's GPTModel, its layer spec made sparse by the --sparsity-* flags."""
    args = get_args()
    config = config if config is not None else core_transformer_config_from_args(args)
    extra = {"vp_stage": vp_stage} if vp_stage is not None else {}
    if pg_collection is not None and "pg_collection" in inspect.signature(GPTModel).parameters:
        extra["pg_collection"] = pg_collection
    return GPTModel(
        config=config,
        transformer_layer_spec=megasparse_lm.gpt_layer_spec_from_args(args),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        **extra,
    )


def _builds_data():
    """Every tensor-parallel rank of the first and last pipeline stages reads the (same) batches."""
    return parallel_state.is_pipeline_first_stage() or parallel_state.is_pipeline_last_stage()


def _blend(args):
    """--data-path as Megatron's (paths, weights) blend: "PATH" or "W1 PATH1 W2 PATH2 ..."."""
    if args.mock_data:
        return None
    if len(args.data_path) == 1:
        return args.data_path, None
    return list(args.data_path[1::2]), [float(weight) for weight in args.data_path[::2]]


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Megatron's GPT datasets: mock data with --mock-data, else --data-path / --split."""
    args = get_args()
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=_blend(args),
        split=args.split,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
    )
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0("> building GPT datasets ...")
    return BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples, _builds_data, config
    ).build()


train_valid_test_datasets_provider.is_distributed = True  # the provider decides where data is read


def _device():
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def get_batch(data_iterator):
    """This micro-batch's tensors on the model's device (None on middle pipeline stages)."""
    if not _builds_data():
        return None, None, None, None, None
    batch = next(data_iterator)
    keys = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")
    return tuple(
        batch[key].to(_device(), non_blocking=True) if batch.get(key) is not None else None
        for key in keys
    )


def loss_func(loss_mask, output_tensor):
    """Sum of the token losses, the number of tokens, and the 'lm loss' Megatron reports."""
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.detach().view(1), num_tokens.view(1)])}


def forward_step(data_iterator, model):
    """One micro-batch: the iteration's sparsity phase, then Megatron's GPT forward."""
    megasparse_lm.on_forward_step(model)
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator)
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels)
    return output_tensor, partial(loss_func, loss_mask)


def main():
    defaults = {"tokenizer_type": "GPT2BPETokenizer"}
    kwargs = dict(
        train_valid_test_dataset_provider=train_valid_test_datasets_provider,
        model_provider=model_provider,
        model_type=ModelType.encoder_or_decoder,
        forward_step_func=forward_step,
    )
    if (
        "cfg_container" in inspect.signature(pretrain).parameters
    ):  # megatron-core 0.18+: parse first
        from megatron.training.argument_utils import pretrain_cfg_container_from_args
        from megatron.training.arguments import parse_and_validate_args

        args = parse_and_validate_args(
            extra_args_provider=megasparse.add_args, args_defaults=defaults
        )
        kwargs["cfg_container"] = pretrain_cfg_container_from_args(args)
    else:  # megatron-core 0.17: pretrain parses the arguments itself
        kwargs.update(extra_args_provider=megasparse.add_args, args_defaults=defaults)
    pretrain(**kwargs)


if __name__ == "__main__":
    main()
