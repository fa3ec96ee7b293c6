"""FP8 quantization emulated for float64 references: what the FP8 ops compute with."""

from megasparse.fp8.scaling import E4M3, quantize_with, scale_from_amax


def q64(t, dtype=E4M3, amax_of=None):
    """t quantized to `dtype` with the per-tensor scale of amax(amax_of or t), dequantized, float64."""
    s = scale_from_amax((t if amax_of is None else amax_of).detach().abs().amax(), dtype)
    return quantize_with(t.detach(), s, dtype).double() / s.double()
