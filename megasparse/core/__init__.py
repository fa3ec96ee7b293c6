"""megasparse.core (torch only): masks, sparse operands, backends, per-step weight state and its checkpoints, gradient rules, MVUE, the op."""
