"""Compacted V:N:M activations with both-ways weight gradients under the Megatron features users turn
on, each bit for bit against the same run without the feature: activation recompute (the selection
recomputes identically; dense MLP and MoE experts), PP=2 1F1B with 4 micro-batches, Megatron DDP with
its optimizer (overlapped reduce, distributed optimizer, gradient_accumulation_fusion). GPT models
built with sparsify_spec on Megatron's local spec, 2:4 weights, a dense warm-up iteration first.
CPU over gloo.
"""

import pytest
import torch

from gpt_features import (
    SmallGpt,
    check_megatron_ddp_is_bit_exact,
    check_pipeline_parallel_is_bit_exact,
    train,
)

# 96 tokens per micro-batch: a short last block of 64 tokens
GPT = SmallGpt(dict(activations="64:4:16", activation_wgrad="64:4:8"), seq=48)


def _train(moe, **recompute):
    # no linear biases: see test_megatron_features (selective "mlp" recompute of fc2's bias)
    return train(GPT, GPT.config(add_bias_linear=False, **(GPT.moe() if moe else {}), **recompute))


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


def test_pipeline_parallel_1f1b_is_bit_exact(tmp_path):
    check_pipeline_parallel_is_bit_exact(GPT, tmp_path)


def test_megatron_ddp_and_optimizer_are_bit_exact(tmp_path):
    every_option = dict(overlap_grad_reduce=True, use_distributed_optimizer=True)
    check_megatron_ddp_is_bit_exact(GPT, tmp_path, {"all": (every_option, True)})
