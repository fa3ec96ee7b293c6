"""The demo's model and data, shared by the demo and the pruning tool: a megatron-core GPTModel
(Squared-ReLU, local spec, optionally sparsified) trained byte-level on the standard library's source."""

import glob
import os

import torch


def add_model_args(parser) -> None:
    """The model's and data's flags, shared by the demo and the pruning tool (same defaults)."""
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--corpus-bytes", type=int, default=2_000_000)
    parser.add_argument("--seed", type=int, default=0)


def load_corpus(max_bytes: int) -> torch.Tensor:
    """Bytes of the standard library's .py files, in a fixed order."""
    root = os.path.dirname(os.__file__)
    data = bytearray()
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        with open(path, "rb") as f:
            data += f.read()
        if len(data) >= max_bytes:
            break
    return torch.frombuffer(bytes(data[:max_bytes]), dtype=torch.uint8).long()


def text_batches(data, seq, batch, generator):
    """(tokens, labels), each [batch, seq]: random windows of the corpus and the next byte."""
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
    windows = data[starts[:, None] + torch.arange(seq + 1)]
    return windows[:, :-1], windows[:, 1:]


def build_gpt(args, sparsity, device):
    from megatron.core.activations import squared_relu
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from megasparse.specs import sparsify_spec

    config = TransformerConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        ffn_hidden_size=args.ffn,
        tensor_model_parallel_size=args.tp,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        activation_func=squared_relu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
    )
    spec = get_gpt_layer_local_spec()
    if sparsity is not None:
        spec = sparsify_spec(spec, sparsity, targets=args.targets)
    torch.manual_seed(args.seed)  # the same initialization for every recipe
    model = GPTModel(
        config,
        spec,
        vocab_size=256,
        max_sequence_length=args.seq,
        position_embedding_type="learned_absolute",
    )
    return model.to(device)


def gpt_loss(model, tokens, labels):
    seq = tokens.shape[1]
    positions = torch.arange(seq, device=tokens.device).expand_as(tokens)
    causal = torch.triu(
        torch.ones(1, 1, seq, seq, dtype=torch.bool, device=tokens.device), diagonal=1
    )
    return model(tokens, positions, causal, labels=labels).mean()
