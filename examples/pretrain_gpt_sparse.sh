#!/usr/bin/env bash
# Megatron-LM pretraining with 2:4 sparse FFNs and Squared-ReLU activation sparsity.
#   MEGATRON_LM=/path/to/Megatron-LM bash examples/pretrain_gpt_sparse.sh
# Needs: a GPU node, Megatron-LM (core_v0.16.x or core_v0.19.x) and megasparse installed in one env.
# Not run in CI (no GPUs there); the flags are tested in tests/megatron/test_schedule_and_args.py.
set -euo pipefail
: "${MEGATRON_LM:?set MEGATRON_LM to your Megatron-LM checkout}"
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/patches/apply.sh" "$MEGATRON_LM"

GPUS=${GPUS:-8}
torchrun --nproc-per-node "$GPUS" "$MEGATRON_LM/pretrain_gpt.py" \
  --tensor-model-parallel-size 2 --sequence-parallel \
  --num-layers 24 --hidden-size 2048 --ffn-hidden-size 8192 --num-attention-heads 16 \
  --seq-length 4096 --max-position-embeddings 4096 \
  --micro-batch-size 2 --global-batch-size 256 --train-iters 20000 \
  --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 500 --weight-decay 0.1 --clip-grad 1.0 \
  --bf16 --squared-relu --disable-bias-linear \
  --transformer-impl local \
  --spec megasparse.megatron_lm sparse_gpt_layer_spec \
  --sparsity-weights 2:4 --sparsity-mask transposable --sparsity-grad ste \
  --sparsity-activations 2:4 --sparsity-targets fc1 fc2 experts \
  --sparsity-dense-warmup-iters 1000 --sparsity-dense-final-iters 0.1 \
  --mock-data --tokenizer-type NullTokenizer --vocab-size 32000 \
  --log-interval 10 --save-interval 1000 --save "${CHECKPOINTS:-/tmp/megasparse-ckpt}" \
  "$@"
