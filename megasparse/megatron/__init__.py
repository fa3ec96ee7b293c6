"""megasparse.megatron: drop-in Megatron-core layers, MLPs, experts, layer specs, the sparsity schedule and flags."""
