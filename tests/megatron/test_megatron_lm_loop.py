"""examples/pretrain_gpt_sparse.py under Megatron-LM's own loop (megatron.training.pretrain),
on CPU over gloo, at TP=2 and at PP=2: the model holds megasparse's modules, the dense warm-up
switches to sparse at its boundary, the loss falls, and a torch_dist checkpoint resumed mid-run
(held masks included) reproduces the uninterrupted run's losses bit for bit.
"""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from megasparse.testing import run_megatron_lm

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "pretrain_gpt_sparse.py"
ITERS, SAVE_AT, WARMUP, REFRESH = 20, 10, 4, 3

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("megatron.training") is None,
    reason="megatron-core < 0.17 ships no megatron.training (Megatron-LM's loop); "
    "run with MCORE=0.19.2",
)

FLAGS = f"""
--distributed-backend gloo --num-layers 2 --hidden-size 64 --num-attention-heads 4
--ffn-hidden-size 256
--seq-length 32 --max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 8
--train-iters {ITERS} --lr 3e-3 --lr-decay-style constant --seed 7
--squared-relu --no-bias-gelu-fusion --no-bias-dropout-fusion --transformer-impl local
--no-persist-layer-norm
--no-gradient-accumulation-fusion --hidden-dropout 0 --attention-dropout 0
--mock-data --tokenizer-type NullTokenizer --vocab-size 256 --num-workers 0
--log-interval 1 --eval-iters 0 --eval-interval 1000
--sparsity-weights 2:4 --sparsity-activations 2:4 --sparsity-dense-warmup-iters {WARMUP}
--sparsity-mask-refresh-iters {REFRESH} --sparsity-backend dense
--ckpt-format torch_dist --save-interval {SAVE_AT}
""".split()


def _entry(out_dir):
    """One rank: run the example's main(), recording per micro-batch the iteration, the loss and the
    sparse modules' state (only the last pipeline stage computes the loss)."""
    import megatron.training

    from megasparse.megatron.schedule import sparse_modules

    spec = importlib.util.spec_from_file_location("pretrain_gpt_sparse", SCRIPT)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    records, losses = [], []
    forward_step, loss_func = example.forward_step, example.loss_func

    def recorded_forward_step(data_iterator, model):
        output = forward_step(data_iterator, model)
        modules = sparse_modules(model)
        records.append(
            {
                "iteration": megatron.training.get_args().curr_iteration,
                "enabled": sorted({m.sparsity.enabled for m in modules}),
                "fp8": sorted({m.sparsity.fp8 for m in modules}, key=str),
                "classes": sorted(
                    {
                        type(m).__name__
                        for m in model.modules()
                        if type(m).__name__.startswith("Sparse")
                    }
                ),
            }
        )
        return output

    def recorded_loss_func(loss_mask, output_tensor):
        loss, num_tokens, report = loss_func(loss_mask, output_tensor)
        losses.append([megatron.training.get_args().curr_iteration, loss.item(), int(num_tokens)])
        return loss, num_tokens, report

    example.forward_step, example.loss_func = recorded_forward_step, recorded_loss_func
    example.main()
    rank = torch.distributed.get_rank()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"records": records, "losses": losses}))


def _run(tmp_path, name, parallel, extra):
    out = tmp_path / name
    out.mkdir()
    run_megatron_lm(_entry, FLAGS + parallel + extra, world_size=2, args=(str(out),))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize(
    "parallel",
    [
        ["--tensor-model-parallel-size", "2"],
        ["--pipeline-model-parallel-size", "2"],
        # the local FP8 path from the launch flag: dense FP8 in the warm-up, then FP8 2:4
        ["--tensor-model-parallel-size", "2", "--sparsity-fp8", "hybrid"],
    ],
    ids=["tp2", "pp2", "tp2-fp8"],
)
def test_example_trains_switches_phase_and_resumes_bit_for_bit(tmp_path, parallel):
    ckpt = str(tmp_path / "ckpt")
    full = _run(tmp_path, "full", parallel, ["--save", ckpt])
    resumed = _run(tmp_path, "resumed", parallel, ["--load", ckpt, "--ckpt-step", str(SAVE_AT)])

    for (
        rank
    ) in full:  # every rank (TP shards, PP stages) holds sparse FFN modules, in the right phase
        assert {"SparseColumnParallelLinear", "SparseRowParallelLinear", "SparseMLP"} <= set(
            rank["records"][0]["classes"]
        ), rank["records"][0]
        assert rank["records"][0]["fp8"] == [("hybrid" if "--sparsity-fp8" in parallel else None)]
        phases = {r["iteration"]: r["enabled"] for r in rank["records"]}
        assert sorted(phases) == list(range(ITERS))
        assert all(phases[i] == [i >= WARMUP] for i in phases), phases
    losses = [loss for rank in full for loss in rank["losses"]]
    assert {it for it, _, _ in losses} == set(range(ITERS))
    per_iter = [
        sum(v for it, v, _ in losses if it == i) / sum(n for it, _, n in losses if it == i)
        for i in range(ITERS)
    ]
    assert sum(per_iter[-3:]) / 3 < sum(per_iter[:3]) / 3 - 0.3, per_iter

    assert os.path.isdir(os.path.join(ckpt, f"iter_{SAVE_AT:07d}"))
    for before, after in zip(full, resumed):
        assert [r["iteration"] for r in after["records"]][0] == SAVE_AT
        tail = [entry for entry in before["losses"] if entry[0] >= SAVE_AT]
        assert (
            after["losses"] == tail
        )  # bit for bit (Python floats round-trip through JSON exactly)
