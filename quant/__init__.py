"""Low-bit linear layers: FP8 (float8_e4m3fn) and INT8 weights with per-output-channel scales and
dynamic per-token activation scales, computed by `torch._scaled_mm` / `torch._int_mm`.

Knows nothing of Wan or of the launcher: `launcher.wan.quantize` decides which linears of the DiT
are quantized and when they run low precision.
"""
