"""megasparse.megatron: Megatron layers, MLPs, experts (+ grouped GEMMs), the module mixin, stats, schedule, flags."""
