"""KV caches: the full-precision cache (`base`), the quantized ones (`quant`, with the PyTorch codecs in
`kv_quant`). Upstream defines every cache class in `exllamav2.cache`; they are all importable from here."""

from .base import PAGE_SIZE, ExLlamaV2Cache, ExLlamaV2Cache_TP, ExLlamaV2CacheBase
from .quant import ExLlamaV2Cache_8bit, ExLlamaV2Cache_Q4, ExLlamaV2Cache_Q6, ExLlamaV2Cache_Q8

__all__ = [
    "PAGE_SIZE",
    "ExLlamaV2Cache",
    "ExLlamaV2CacheBase",
    "ExLlamaV2Cache_8bit",
    "ExLlamaV2Cache_Q4",
    "ExLlamaV2Cache_Q6",
    "ExLlamaV2Cache_Q8",
    "ExLlamaV2Cache_TP",
]
