"""exllamav2: EXL2/GPTQ/FP16 LLM inference on every NVIDIA GPU from Turing up, and on the CPU."""

from .version import __version__
from .cache import ExLlamaV2Cache, ExLlamaV2CacheBase
from .config import ExLlamaV2Config
from .model import ExLlamaV2
from .lora import ExLlamaV2Lora
from .tokenizer import ExLlamaV2Tokenizer

__all__ = [
    "__version__",
    "ExLlamaV2",
    "ExLlamaV2Cache",
    "ExLlamaV2CacheBase",
    "ExLlamaV2Config",
    "ExLlamaV2Lora",
    "ExLlamaV2Tokenizer",
]
