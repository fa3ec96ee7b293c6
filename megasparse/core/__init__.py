"""megasparse.core (torch only): masks, operands, backends, per-step weight state, gradients, the op."""
