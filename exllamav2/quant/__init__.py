"""Quantized weight formats: EXL2 and GPTQ (issue 4)."""

from .exl2 import group_layout, pack_exl2, quantize_rtn
from .qlinear import (Exl2Weight, GptqWeight, QuantWeight, TensorSource, forward_many, is_quantized_tensor,
                      load_quantized, release_scratch, stored_format)

__all__ = [
    "Exl2Weight",
    "GptqWeight",
    "QuantWeight",
    "TensorSource",
    "forward_many",
    "group_layout",
    "is_quantized_tensor",
    "load_quantized",
    "pack_exl2",
    "quantize_rtn",
    "release_scratch",
    "stored_format",
]
