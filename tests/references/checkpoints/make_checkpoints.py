"""Write the checkpoint fixtures of tests/core/test_weight_checkpoint.py with a given megasparse.

The fixtures in this folder were written by megasparse at commit b80d88c (megatron-core 0.16.1):

    git worktree add /tmp/old-state b80d88c
    PYTHONPATH=/tmp/old-state:/tmp/old-state/tests/references \\
        .venv-mcore0.16.1/bin/python tests/references/checkpoints/make_checkpoints.py OUT_DIR

Two SparseColumnParallelLinear layers (8 -> 16, float64): "held" holds its masks for 3 steps,
"sste" trains with S-STE (a fixed beta). Each is trained 5 SGD steps and saved as a torch
state_dict (NAME_state_dict.pt) and as a Megatron dist checkpoint (NAME_dist/). expected.pt holds,
per layer, what the run had at the save (weight, held mask, step count, refreshed_at, beta) and
what it computed in 3 more steps from there (outputs, masks, final weight).
"""

import sys
from pathlib import Path

import torch

from megasparse import SparsityConfig
from megasparse.testing import free_port, init_megatron, shutdown_megatron

LAYERS = {
    "held": dict(mask_refresh_interval=3, backend="dense"),
    "sste": dict(gradient="sste", backend="dense"),
}
SAVED_STEPS, MORE_STEPS = 5, 3


def train(layer, opt, xs):
    """Optimizer steps, one per input: (output, mask) of each step."""
    seen = []
    for x in xs:
        opt.zero_grad()
        y, _ = layer(x)
        seen.append((y.detach().clone(), layer.sparsity_mask().clone()))
        y.square().sum().backward()
        opt.step()
    return seen


def main(out: Path) -> None:
    from megatron.core import dist_checkpointing, parallel_state
    from megatron_helpers import make_column, make_config

    import megasparse

    print("megasparse from", megasparse.__file__)
    init_megatron(0, 1, free_port(), tensor_model_parallel_size=1)
    try:
        g = torch.Generator().manual_seed(11)
        xs = [torch.randn(4, 8, dtype=torch.float64, generator=g) for _ in range(8)]
        out.mkdir(parents=True, exist_ok=True)
        meta = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
        expected = {"xs": xs}
        for name, sparsity in LAYERS.items():
            layer = make_column(make_config(), 8, 16, SparsityConfig(**sparsity))
            opt = torch.optim.SGD(layer.parameters(), lr=0.3)  # one optimizer for the whole run
            train(layer, opt, xs[:SAVED_STEPS])
            torch.save(layer.state_dict(), out / f"{name}_state_dict.pt")
            sharded = layer.sharded_state_dict("l.", metadata=meta)
            (out / f"{name}_dist").mkdir()
            dist_checkpointing.save(sharded, str(out / f"{name}_dist"))
            state = layer.weight_state
            at_save = {
                "weight": layer.weight.detach().clone(),
                "bias": layer.bias.detach().clone(),
                "held_mask": state.held_mask(),
                "step_count": state.step_count(),
                "refreshed_at": state.refreshed_at,
                "sste_beta": state.sste_beta,
            }
            more = train(layer, opt, xs[SAVED_STEPS:])
            at_save["outputs_after"] = [y for y, _ in more]
            at_save["masks_after"] = [m for _, m in more]
            at_save["weight_after"] = layer.weight.detach().clone()
            expected[name] = at_save
        torch.save(expected, out / "expected.pt")
    finally:
        shutdown_megatron()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
