"""megasparse.core: masks, sparse operands, backends, per-step weight state, gradient rules, the op."""
