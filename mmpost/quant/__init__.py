"""Post-training weight quantization: integer weights with per-group or per-channel scales, stored in the
compressed-tensors ``pack-quantized`` format. ``methods`` holds the arithmetic (round-to-nearest and GPTQ)."""

from mmpost.quant.apply import QuantReport, is_quantized, quantize
from mmpost.quant.calibrate import calibration_samples
from mmpost.quant.options import PRESETS, QuantizeOptions, load_options

__all__ = [
    "PRESETS",
    "QuantReport",
    "QuantizeOptions",
    "calibration_samples",
    "is_quantized",
    "load_options",
    "quantize",
]
