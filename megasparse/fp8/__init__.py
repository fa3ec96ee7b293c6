"""megasparse.fp8: FP8 formats and scaling, the 2:4 FP8 GEMM and the FP8 sparse training op."""
