"""Compacted V:N:M activations with both-ways weight gradients under the Megatron features users turn
on, each bit for bit against the same run without the feature: activation recompute (the selection
recomputes identically), PP=2 1F1B with 4 micro-batches, Megatron DDP with its optimizer (overlapped
reduce, distributed optimizer, gradient_accumulation_fusion). GPT models built with sparsify_spec
on Megatron's local spec, 2:4 weights, dense warm-up iteration first. CPU over gloo.
"""

import os
import re

import pytest
import torch

from megasparse.testing import run_distributed

SEQ, MBS, VOCAB, HIDDEN, FFN = 48, 2, 128, 32, 64  # 96 tokens: a short last block of 64
SPARSITY = dict(activations="64:4:16", activation_wgrad="64:4:8")


def _config(**overrides):
    from megatron.core.activations import squared_relu
    from megatron.core.transformer import TransformerConfig

    settings = dict(
        num_layers=2,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        ffn_hidden_size=FFN,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        activation_func=squared_relu,
        add_bias_linear=False,  # see test_megatron_features: selective "mlp" recompute of biases
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    settings.update(overrides)
    return TransformerConfig(**settings)


MOE = dict(
    num_moe_experts=4,
    moe_router_topk=2,
    moe_ffn_hidden_size=FFN,
    moe_token_dispatcher_type="allgather",
    moe_aux_loss_coeff=0.0,
)


def _spec(moe=False):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megasparse import SparsityConfig, sparsify_spec

    base = get_gpt_layer_local_spec(num_experts=MOE["num_moe_experts"] if moe else None)
    return sparsify_spec(base, SparsityConfig(**SPARSITY))


def _gpt(config, pre_process=True, post_process=True):
    from megatron.core.models.gpt import GPTModel

    torch.manual_seed(0)
    return GPTModel(
        config,
        _spec(moe=config.num_moe_experts is not None),
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


def _causal():
    return torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)


def _loss(model, tokens, labels):
    positions = torch.arange(SEQ).expand(tokens.shape[0], SEQ)
    return model(tokens, positions, _causal(), labels=labels).mean()


# -- activation recompute --------------------------------------------------------------------------


def _train(moe, steps=3, **recompute):
    from megasparse.megatron.schedule import SparsitySchedule

    model = _gpt(_config(**(MOE if moe else {}), **recompute))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = SparsitySchedule(dense_warmup_iters=1)
    losses = []
    for it, (tokens, labels) in enumerate(_batches(steps)):
        schedule.apply(model, it)
        loss = _loss(model, tokens, labels)
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
        (False, dict(recompute_granularity="selective", recompute_modules=["mlp"])),
        (True, dict(recompute_granularity="selective", recompute_modules=["moe"])),
    ],
    ids=["full-uniform", "selective-mlp", "selective-moe"],
)
def test_activation_recompute_is_bit_exact(moe, recompute):
    reference_losses, reference = _train(moe)
    losses, params = _train(moe, **recompute)
    assert losses == reference_losses
    for name, p in params.items():
        assert torch.equal(p, reference[name]), name
    assert reference_losses[-1] != reference_losses[1]  # the sparse steps trained


# -- pipeline parallelism --------------------------------------------------------------------------

NUM_MICROBATCHES = 4


def _global_name(name, offset):
    return re.sub(
        r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name
    )


def _pipeline_worker(out_dir, pp):
    """One iteration of 4 micro-batches with Megatron's schedule: PP=1 writes the reference, PP=2
    loads its stage's weights from it and compares gradients and losses."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    rank = parallel_state.get_pipeline_model_parallel_rank()
    config = _config(pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32)
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
        return model(tokens, positions, _causal(), labels=labels), loss_func

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
    assert any(n.endswith("linear_fc1.weight") for n in grads)
    for name, grad in grads.items():
        assert grad is not None and torch.equal(grad, reference["grads"][name]), f"{rank}: {name}"
    if rank == pp - 1:
        assert losses == reference["losses"]


def test_pipeline_parallel_1f1b_is_bit_exact(tmp_path):
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
    """DP=2, two micro-batches per step, two Adam steps of a transformer block (every linear sparse,
    so gradient_accumulation_fusion needs no CUDA extension); rank 0 saves the parameters."""
    import contextlib

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megasparse import SparsityConfig, sparsify_spec
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = _config(gradient_accumulation_fusion=fusion)
    torch.manual_seed(0)
    spec = sparsify_spec(
        get_gpt_layer_local_spec(),
        SparsityConfig(**SPARSITY),
        targets=("qkv", "proj", "fc1", "fc2"),
    )
    block = TransformerBlock(config, spec)
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
    g = torch.Generator().manual_seed(10 + rank)
    for _ in range(2):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        for micro in range(2):
            x = torch.randn(SEQ, MBS, HIDDEN, generator=g)
            sync = contextlib.nullcontext() if micro == 1 else model.no_sync()
            with sync:
                block(x, attention_mask=_causal()).pow(2).mean().backward()
        model.finish_grad_sync()
        assert optimizer.step()[0]
    if rank == 0:
        params = {n: p.detach().clone() for n, p in block.named_parameters()}
        torch.save(params, os.path.join(out_dir, name))


def test_megatron_ddp_and_optimizer_are_bit_exact(tmp_path):
    every_option = dict(overlap_grad_reduce=True, use_distributed_optimizer=True)
    for name, settings, fusion in (("plain", {}, False), ("all", every_option, True)):
        run_distributed(
            _ddp_worker,
            world_size=2,
            args=(str(tmp_path), name, settings, fusion),
            cpu_training=True,
        )
    reference, got = torch.load(tmp_path / "plain"), torch.load(tmp_path / "all")
    assert any(n.endswith("mlp.linear_fc1.weight") for n in reference)
    for param, value in got.items():
        assert torch.equal(value, reference[param]), param
