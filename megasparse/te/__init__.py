"""megasparse.te: sparse Transformer Engine linears and experts, and their FP8 forward."""
