"""megasparse.fp8: FP8 formats and scaling, the 2:4 FP8 GEMM, the FP8 training op and its layer."""
