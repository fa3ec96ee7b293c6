"""Megatron features users turn on, with sparse models built through megasparse's public API
(sparsify_spec on Megatron's GPT layer specs), each against the same run without the feature,
bit for bit: activation recompute (full; selective mlp / moe), PP=2 1F1B with 4 micro-batches,
Megatron DDP (overlap_grad_reduce, distributed optimizer, gradient_accumulation_fusion) with
Megatron's optimizer step. CPU over gloo.
"""

import pytest
import torch

from gpt_features import (
    SmallGpt,
    check_megatron_ddp_is_bit_exact,
    check_pipeline_parallel_is_bit_exact,
    train,
)

GPT = SmallGpt(dict(activations="2:4", mask_refresh_interval=2))


# -- activation recompute --------------------------------------------------------------------------


def _train_gpt(moe, **recompute):
    """A few SGD steps with dropout on and held masks refreshed every 2.

    No linear biases: Megatron's selective "mlp" recompute returns fc2's bias Parameter
    (skip_bias_add) from its CheckpointFunction, which makes the bias a non-leaf and recurses
    without end in the backward - with Megatron's dense MLP too (megatron-core 0.16.1 on CPU)."""
    config = GPT.config(
        hidden_dropout=0.1,
        attention_dropout=0.1,
        add_bias_linear=False,
        **(GPT.moe() if moe else {}),
        **recompute,
    )
    return train(GPT, config)


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


# -- pipeline parallelism, Megatron DDP and optimizer ----------------------------------------------


def test_pipeline_parallel_1f1b_four_microbatches_is_bit_exact(tmp_path):
    check_pipeline_parallel_is_bit_exact(GPT, tmp_path)


DDP_VARIANTS = {
    "overlap": (dict(overlap_grad_reduce=True), False),
    "distributed-optimizer": (dict(use_distributed_optimizer=True), False),
    "grad-accumulation-fusion": ({}, True),
    "all": (dict(overlap_grad_reduce=True, use_distributed_optimizer=True), True),
}


def test_megatron_ddp_and_optimizer_are_bit_exact(tmp_path):
    gpt = SmallGpt(dict(activations="2:4", mask_refresh_interval=1))
    check_megatron_ddp_is_bit_exact(gpt, tmp_path, DDP_VARIANTS)
