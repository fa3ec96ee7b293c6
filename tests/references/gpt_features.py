"""Small sparse GPT models (sparsify_spec on Megatron's local spec) and the PP / Megatron-DDP runs
the feature tests compare bit for bit against the same run without the feature (CPU over gloo)."""

import contextlib
import os
import re
from dataclasses import dataclass, field

import torch

from megasparse.testing import run_distributed

VOCAB, HIDDEN, MBS = 128, 32, 2
TARGETS = ("qkv", "proj", "fc1", "fc2", "experts")  # every linear sparse (Megatron DDP's fusion)
NUM_MICROBATCHES = 4


@dataclass(frozen=True)
class SmallGpt:
    """A 2-layer GPT (hidden 32, Squared-ReLU) with `sparsity` (SparsityConfig keyword arguments,
    picklable for the spawned workers) on the `targets` linears; batches of MBS x seq tokens."""

    sparsity: dict = field(default_factory=dict)
    seq: int = 16
    ffn: int = 64

    def config(self, **overrides):
        from megatron.core.activations import squared_relu
        from megatron.core.transformer import TransformerConfig

        settings = dict(
            num_layers=2,
            hidden_size=HIDDEN,
            num_attention_heads=4,
            ffn_hidden_size=self.ffn,
            use_cpu_initialization=True,
            params_dtype=torch.float32,
            activation_func=squared_relu,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
        settings.update(overrides)
        return TransformerConfig(**settings)

    def moe(self) -> dict:
        """The config overrides of an MoE model: 4 experts, top-2, allgather dispatcher."""
        return dict(
            num_moe_experts=4,
            moe_router_topk=2,
            moe_ffn_hidden_size=self.ffn,
            moe_token_dispatcher_type="allgather",
            moe_aux_loss_coeff=0.0,
        )

    def spec(self, moe=False):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        from megasparse import SparsityConfig, sparsify_spec

        base = get_gpt_layer_local_spec(num_experts=4 if moe else None)
        return sparsify_spec(base, SparsityConfig(**self.sparsity), targets=TARGETS)

    def gpt(self, config, pre_process=True, post_process=True):
        from megatron.core.models.gpt import GPTModel

        torch.manual_seed(0)
        return GPTModel(
            config,
            self.spec(moe=config.num_moe_experts is not None),
            vocab_size=VOCAB,
            max_sequence_length=self.seq,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=False,
            position_embedding_type="learned_absolute",
        )

    def batches(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, VOCAB, (n, MBS, self.seq + 1), generator=g)
        return [(t[:, :-1], t[:, 1:]) for t in tokens]

    def causal_mask(self):
        return torch.triu(torch.ones(1, 1, self.seq, self.seq, dtype=torch.bool), diagonal=1)

    def losses(self, model, tokens, labels):
        """The per-token losses of a batch."""
        positions = torch.arange(self.seq).expand(tokens.shape[0], self.seq)
        return model(tokens, positions, self.causal_mask(), labels=labels)


def train(gpt: SmallGpt, config, steps=3):
    """Losses and final parameters of a few SGD steps, the first one a dense warm-up
    (SparsitySchedule), with fixed seeds for dropout."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megasparse.megatron.schedule import SparsitySchedule

    model = gpt.gpt(config)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = SparsitySchedule(dense_warmup_iters=1)
    model_parallel_cuda_manual_seed(5)
    torch.manual_seed(5)
    losses = []
    for it, (tokens, labels) in enumerate(gpt.batches(steps)):
        schedule.apply(model, it)
        loss = gpt.losses(model, tokens, labels).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


# -- pipeline parallelism --------------------------------------------------------------------------


def _global_name(name, offset):
    return re.sub(
        r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name
    )


def _pipeline_worker(gpt: SmallGpt, out_dir, pp):
    """One training iteration of 4 micro-batches with Megatron's schedule for this PP size: PP=1
    writes the reference (weights, gradients, losses), PP=2 loads its stage's weights from it and
    compares."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    rank = parallel_state.get_pipeline_model_parallel_rank()
    config = gpt.config(pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32)
    model = gpt.gpt(config, pre_process=rank == 0, post_process=rank == pp - 1)
    offset = rank * config.num_layers // pp
    reference_file = os.path.join(out_dir, "pp1.pt")
    if pp > 1:
        reference = torch.load(reference_file)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(reference["weights"][_global_name(name, offset)])
    batches = iter(gpt.batches(NUM_MICROBATCHES, seed=1))
    losses = []

    def forward_step(data_iterator, model):
        tokens, labels = next(data_iterator)

        def loss_func(output):
            loss = output.float().mean()
            losses.append(loss.item())
            return loss, {"loss": loss.detach()}

        return gpt.losses(model, tokens, labels), loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=[model],
        num_microbatches=NUM_MICROBATCHES,
        seq_length=gpt.seq,
        micro_batch_size=MBS,
        forward_only=False,
    )
    grads = {_global_name(n, offset): p.grad for n, p in model.named_parameters()}
    if pp == 1:
        weights = {n: p.detach() for n, p in model.named_parameters()}
        torch.save({"weights": weights, "grads": grads, "losses": losses}, reference_file)
        return
    assert any(n.endswith("linear_fc1.weight") for n in grads)
    assert len(grads) > 0 and all(g is not None for g in grads.values())
    for name, grad in grads.items():
        assert torch.equal(grad, reference["grads"][name]), f"stage {rank}: {name}"
    if rank == pp - 1:
        assert losses == reference["losses"]


def check_pipeline_parallel_is_bit_exact(gpt: SmallGpt, out_dir) -> None:
    """PP=2 1F1B with 4 micro-batches gives PP=1's gradients and losses, bit for bit."""
    run_distributed(_pipeline_worker, world_size=1, args=(gpt, str(out_dir), 1), cpu_training=True)
    run_distributed(
        _pipeline_worker,
        world_size=2,
        args=(gpt, str(out_dir), 2),
        cpu_training=True,
        pipeline_model_parallel_size=2,
    )


# -- Megatron DDP and optimizer --------------------------------------------------------------------


def _ddp_worker(gpt: SmallGpt, out_dir, name, ddp_settings, fusion):
    """DP=2, two micro-batches per step, two optimizer steps; the parameters after them are saved.
    gradient_accumulation_fusion needs every linear sparse (Megatron's dense linears need a CUDA
    extension for it): the model is a transformer block with all four linears sparse."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.transformer_block import TransformerBlock

    config = gpt.config(gradient_accumulation_fusion=fusion)
    torch.manual_seed(0)
    block = TransformerBlock(config, gpt.spec())
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
    for _ in range(2):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        for micro in range(2):
            x = torch.randn(gpt.seq, MBS, HIDDEN, generator=g)
            sync = contextlib.nullcontext() if micro == 1 else model.no_sync()  # reduce on the last
            with sync:
                loss = block(x, attention_mask=gpt.causal_mask()).pow(2).mean()
                loss.backward()
        model.finish_grad_sync()
        update_successful, _, _ = optimizer.step()
        assert update_successful
    if rank == 0:
        torch.save(
            {n: p.detach().clone() for n, p in block.named_parameters()},
            os.path.join(out_dir, name),
        )


def check_megatron_ddp_is_bit_exact(gpt: SmallGpt, out_dir, variants: dict) -> None:
    """Each variant {name: (DistributedDataParallelConfig settings, gradient_accumulation_fusion)}
    ends with the parameters of plain DDP, bit for bit."""
    run = lambda name, settings, fusion: run_distributed(  # noqa: E731
        _ddp_worker,
        world_size=2,
        args=(gpt, str(out_dir), name, settings, fusion),
        cpu_training=True,
    )
    run("plain", {}, False)
    reference = torch.load(os.path.join(out_dir, "plain"))
    assert any(n.endswith("mlp.linear_fc1.weight") for n in reference)
    for name, (ddp_settings, fusion) in variants.items():
        run(name, ddp_settings, fusion)
        got = torch.load(os.path.join(out_dir, name))
        for param, value in got.items():
            assert torch.equal(value, reference[param]), f"{name}: {param}"
