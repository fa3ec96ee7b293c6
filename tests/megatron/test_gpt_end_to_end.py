"""A real megatron-core GPTModel from a sparsified spec over gloo (dense TP=2, MoE EP=2), trained on real text.

Also Megatron's dist_checkpointing: the TP=2 sparse checkpoint (with held masks) loads into a
TP=1 sparse model (resharding) and into a TP=1 dense model, and back, with nothing lost.
"""

import os

import torch
import torch.distributed as dist

from megasparse.testing import run_distributed

SEQ, BATCH, VOCAB = 32, 8, 256


def _text_batches(steps, seed=0):
    """Byte-level (input, label) batches from the Python standard library's own source."""
    from megasparse.tools.gpt_text import load_corpus

    data = load_corpus(400_000)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - SEQ - 1, (BATCH,), generator=g)
        windows = data[starts[:, None] + torch.arange(SEQ + 1)]
        out.append((windows[:, :-1], windows[:, 1:]))
    return out


def _gpt(tp, moe, sparse, held=False, ep=1):
    from megatron.core.activations import squared_relu
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from megasparse import SparsityConfig, sparsify_spec

    moe_kw = (
        dict(
            num_moe_experts=4,
            moe_router_topk=2,
            moe_ffn_hidden_size=128,
            moe_token_dispatcher_type="allgather",
            moe_aux_loss_coeff=0.0,
            add_bias_linear=False,
            expert_model_parallel_size=ep,
        )
        if moe
        else {}
    )
    cfg = TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        activation_func=squared_relu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **moe_kw,
    )
    spec = get_gpt_layer_local_spec(num_experts=4 if moe else None)
    if sparse:
        sparsity = SparsityConfig(activations="2:4", mask_refresh_interval=5 if held else 1)
        spec = sparsify_spec(spec, sparsity, targets=("qkv", "proj", "fc1", "fc2", "experts"))
    torch.manual_seed(0)
    return GPTModel(
        cfg,
        spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="learned_absolute",
    )


def _loss(model, tokens, labels):
    positions = torch.arange(SEQ).expand(tokens.shape[0], SEQ)
    causal = torch.triu(
        torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1
    )  # True = masked out
    return model(tokens, positions, causal, labels=labels).mean()


def _train_worker(moe, ckpt_dir):
    """Dense GPT: TP=2. MoE GPT: EP=2 (MoE with TP needs sequence parallelism, whose LayerNorm needs apex/TE).
    Both ranks see the same batches, so replicated parameters get the same gradients without a DDP wrapper."""
    from megatron.core import dist_checkpointing

    from megasparse.megatron.schedule import SparsitySchedule

    model = _gpt(
        tp=1 if moe else 2, moe=moe, sparse=True, held=ckpt_dir is not None, ep=2 if moe else 1
    )
    schedule = SparsitySchedule(dense_warmup_iters=5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for it, (tokens, labels) in enumerate(_text_batches(60)):
        schedule.apply(model, it)
        loss = _loss(model, tokens, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, f"loss did not go down: {first:.3f} -> {last:.3f}"
    assert all(m.sparsity.enabled for m in model.modules() if hasattr(m, "sparsity"))
    if ckpt_dir is None:
        return
    probe = _text_batches(1, seed=123)[0]
    with torch.no_grad():
        reference_loss = _loss(model.eval(), *probe).item()
    os.makedirs(os.path.join(ckpt_dir, "sparse_tp2"), exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), os.path.join(ckpt_dir, "sparse_tp2"))
    if dist.get_rank() == 0:
        torch.save(reference_loss, os.path.join(ckpt_dir, "reference_loss.pt"))


def _reload_worker(ckpt_dir):
    """TP=1: the TP=2 sparse checkpoint -> a sparse model (same loss) and a dense model -> back to sparse."""
    from megatron.core import dist_checkpointing

    probe = _text_batches(1, seed=123)[0]
    reference = torch.load(os.path.join(ckpt_dir, "reference_loss.pt"))

    sparse = _gpt(tp=1, moe=False, sparse=True, held=True)
    sparse.load_state_dict(
        dist_checkpointing.load(sparse.sharded_state_dict(), os.path.join(ckpt_dir, "sparse_tp2"))
    )
    with torch.no_grad():
        got = _loss(sparse.eval(), *probe).item()
    held = [
        m.weight_state.held_mask() is not None
        for m in sparse.modules()
        if hasattr(m, "weight_state")
    ]
    assert abs(got - reference) < 1e-4, (got, reference, held)  # resharded weights and held masks

    dense = _gpt(tp=1, moe=False, sparse=False)
    dense.load_state_dict(
        dist_checkpointing.load(dense.sharded_state_dict(), os.path.join(ckpt_dir, "sparse_tp2"))
    )
    for (name, p), q in zip(sparse.named_parameters(), dense.parameters()):
        assert torch.equal(p, q), (
            name
        )  # the dense model gets the dense master weights: nothing lost
    os.makedirs(os.path.join(ckpt_dir, "dense_tp1"))
    dist_checkpointing.save(dense.sharded_state_dict(), os.path.join(ckpt_dir, "dense_tp1"))
    back = _gpt(tp=1, moe=False, sparse=True)
    back.load_state_dict(
        dist_checkpointing.load(back.sharded_state_dict(), os.path.join(ckpt_dir, "dense_tp1"))
    )
    for (name, p), q in zip(back.named_parameters(), dense.parameters()):
        assert torch.equal(p, q), name


def test_sparse_gpt_tp2_trains_on_text_and_checkpoints_reshard(tmp_path):
    run_distributed(
        _train_worker, world_size=2, args=(False, str(tmp_path)), tensor_model_parallel_size=2
    )
    run_distributed(
        _reload_worker, world_size=1, args=(str(tmp_path),), tensor_model_parallel_size=1
    )


def test_sparse_moe_gpt_ep2_trains_on_text():
    run_distributed(
        _train_worker,
        world_size=2,
        args=(True, None),
        tensor_model_parallel_size=1,
        expert_model_parallel_size=2,
    )
