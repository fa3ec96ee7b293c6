"""megasparse.megatron: Megatron layers, MLPs, experts (+ grouped GEMMs), the sparsity schedule, flags."""
