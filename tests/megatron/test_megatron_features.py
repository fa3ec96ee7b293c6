"""Megatron features users turn on, with sparse models built through megasparse's public API
(sparsify_spec on Megatron's GPT layer specs), each against the same run without the feature,
bit for bit: activation recompute (full; selective mlp / moe), PP=2 1F1B with 4 micro-batches,
Megatron DDP (overlap_grad_reduce, distributed optimizer, gradient_accumulation_fusion) with
Megatron's optimizer step. CPU over gloo.
"""

import contextlib
import os
import re

import pytest
import torch

from megasparse.testing import run_distributed

SEQ, MBS, VOCAB, HIDDEN = 16, 2, 128, 32
TARGETS = ("qkv", "proj", "fc1", "fc2", "experts")


def _config(**overrides):
    from megatron.core.activations import squared_relu
    from megatron.core.transformer import TransformerConfig

    settings = dict(
        num_layers=2,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        ffn_hidden_size=64,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        activation_func=squared_relu,
        hidden_dropout=0.1,
        attention_dropout=0.1,
    )
    settings.update(overrides)
    return TransformerConfig(**settings)


def _sparse_spec(moe=False, refresh=2):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megasparse import SparsityConfig, sparsify_spec

    sparsity = SparsityConfig(activations="2:4", mask_refresh_interval=refresh)
    return sparsify_spec(
        get_gpt_layer_local_spec(num_experts=4 if moe else None), sparsity, targets=TARGETS
    )


def _gpt(config, moe=False, pre_process=True, post_process=True):
    from megatron.core.models.gpt import GPTModel

    torch.manual_seed(0)
    return GPTModel(
        config,
        _sparse_spec(moe),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="learned_absolute",
    )


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, MBS, SEQ + 1), generator=g)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def _gpt_loss(model, tokens, labels):
    positions = torch.arange(SEQ).expand(tokens.shape[0], SEQ)
    causal = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    return model(tokens, positions, causal, labels=labels)


# -- activation recompute --------------------------------------------------------------------------

MOE = dict(
    num_moe_experts=4,
    moe_router_topk=2,
    moe_ffn_hidden_size=64,
    moe_token_dispatcher_type="allgather",
    moe_aux_loss_coeff=0.0,
    add_bias_linear=False,
)


def _train_gpt(moe, steps=3, **recompute):
    """Losses and final parameters of a few SGD steps (dropout on, held masks refreshed every 2).

    No linear biases: Megatron's selective "mlp" recompute returns fc2's bias Parameter
    (skip_bias_add) from its CheckpointFunction, which makes the bias a non-leaf and recurses
    without end in the backward - with Megatron's dense MLP too (megatron-core 0.16.1 on CPU)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megasparse.megatron.schedule import SparsitySchedule

    model = _gpt(_config(**(MOE if moe else dict(add_bias_linear=False)), **recompute), moe=moe)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = SparsitySchedule(dense_warmup_iters=1)
    model_parallel_cuda_manual_seed(5)
    torch.manual_seed(5)
    losses = []
    for it, (tokens, labels) in enumerate(_batches(steps)):
        schedule.apply(model, it)
        loss = _gpt_loss(model, tokens, labels).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.usefixtures("megatron_tp1")
@pytest.mark.parametrize(
    "moe,recompute",
    [
        (
            False,
            dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
        ),
        (
            False,
            dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
        ),
        (False, dict(recompute_granularity="selective", recompute_modules=["mlp"])),
        (True, dict(recompute_granularity="selective", recompute_modules=["moe"])),
    ],
    ids=["full-uniform", "full-block", "selective-mlp", "selective-moe"],
)
def test_activation_recompute_is_bit_exact(moe, recompute):
    reference_losses, reference = _train_gpt(moe)
    losses, params = _train_gpt(moe, **recompute)
    assert losses == reference_losses
    for name, p in params.items():
        assert torch.equal(p, reference[name]), name
    assert reference_losses[-1] != reference_losses[0]


# -- pipeline parallelism --------------------------------------------------------------------------

NUM_MICROBATCHES = 4


def _global_name(name, offset):
    return re.sub(
        r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name
    )


def _pipeline_worker(out_dir, pp):
    """One training iteration of 4 micro-batches with Megatron's schedule for this PP size: PP=1
    writes the reference (weights, gradients, losses), PP=2 loads its stage's weights from it and
    compares."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    rank = parallel_state.get_pipeline_model_parallel_rank()
    config = _config(
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    model = _gpt(config, pre_process=rank == 0, post_process=rank == pp - 1)
    offset = rank * config.num_layers // pp
    reference_file = os.path.join(out_dir, "pp1.pt")
    if pp > 1:
        reference = torch.load(reference_file)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(reference["weights"][_global_name(name, offset)])
    batches = iter(_batches(NUM_MICROBATCHES, seed=1))
    losses = []

    def forward_step(data_iterator, model):
        tokens, labels = next(data_iterator)

        def loss_func(output):
            loss = output.float().mean()
            losses.append(loss.item())
            return loss, {"loss": loss.detach()}

        positions = torch.arange(SEQ).expand(MBS, SEQ)
        causal = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
        return model(tokens, positions, causal, labels=labels), loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=[model],
        num_microbatches=NUM_MICROBATCHES,
        seq_length=SEQ,
        micro_batch_size=MBS,
        forward_only=False,
    )
    grads = {_global_name(n, offset): p.grad for n, p in model.named_parameters()}
    if pp == 1:
        weights = {n: p.detach() for n, p in model.named_parameters()}
        torch.save({"weights": weights, "grads": grads, "losses": losses}, reference_file)
        return
    assert len(grads) > 0 and all(g is not None for g in grads.values())
    for name, grad in grads.items():
        assert torch.equal(grad, reference["grads"][name]), f"stage {rank}: {name}"
    if rank == pp - 1:
        assert losses == reference["losses"]


def test_pipeline_parallel_1f1b_four_microbatches_is_bit_exact(tmp_path):
    run_distributed(_pipeline_worker, world_size=1, args=(str(tmp_path), 1), cpu_training=True)
    run_distributed(
        _pipeline_worker,
        world_size=2,
        args=(str(tmp_path), 2),
        cpu_training=True,
        pipeline_model_parallel_size=2,
    )


# -- Megatron DDP and optimizer --------------------------------------------------------------------


def _ddp_worker(out_dir, name, ddp_settings, fusion):
    """DP=2, two micro-batches per step, two optimizer steps; the parameters after them are saved.
    gradient_accumulation_fusion needs every linear sparse (Megatron's dense linears need a CUDA
    extension for it): the model is a transformer block with all four linears sparse."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.transformer_block import TransformerBlock

    config = _config(gradient_accumulation_fusion=fusion, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    block = TransformerBlock(config, _sparse_spec(refresh=1))
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, **ddp_settings)
    model = DistributedDataParallel(config, ddp_config, block)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-2,
            use_distributed_optimizer=ddp_config.use_distributed_optimizer,
        ),
        [model],
    )
    rank = torch.distributed.get_rank()
    g = torch.Generator().manual_seed(10 + rank)  # each data-parallel rank its own data
    causal = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    for _ in range(2):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        for micro in range(2):
            x = torch.randn(SEQ, MBS, HIDDEN, generator=g)
            sync = contextlib.nullcontext() if micro == 1 else model.no_sync()  # reduce on the last
            with sync:
                loss = block(x, attention_mask=causal).pow(2).mean()
                loss.backward()
        model.finish_grad_sync()
        update_successful, _, _ = optimizer.step()
        assert update_successful
    if rank == 0:
        torch.save(
            {n: p.detach().clone() for n, p in block.named_parameters()},
            os.path.join(out_dir, name),
        )


DDP_VARIANTS = {
    "overlap": (dict(overlap_grad_reduce=True), False),
    "distributed-optimizer": (dict(use_distributed_optimizer=True), False),
    "grad-accumulation-fusion": ({}, True),
    "all": (dict(overlap_grad_reduce=True, use_distributed_optimizer=True), True),
}


def test_megatron_ddp_and_optimizer_are_bit_exact(tmp_path):
    run_distributed(
        _ddp_worker, world_size=2, args=(str(tmp_path), "plain", {}, False), cpu_training=True
    )
    reference = torch.load(tmp_path / "plain")
    for name, (ddp_settings, fusion) in DDP_VARIANTS.items():
        run_distributed(
            _ddp_worker,
            world_size=2,
            args=(str(tmp_path), name, ddp_settings, fusion),
            cpu_training=True,
        )
        got = torch.load(tmp_path / name)
        for param, value in got.items():
            assert torch.equal(value, reference[param]), f"{name}: {param}"
    assert any(n.endswith("mlp.linear_fc1.weight") for n in reference)
