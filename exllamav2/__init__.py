"""exllamav2: EXL2/GPTQ/FP16 LLM inference on every NVIDIA GPU from Turing up, and on the CPU."""

from .version import __version__
from .cache.base import ExLlamaV2Cache, ExLlamaV2Cache_TP, ExLlamaV2CacheBase
from .cache.quant import ExLlamaV2Cache_8bit, ExLlamaV2Cache_Q4, ExLlamaV2Cache_Q6, ExLlamaV2Cache_Q8
from .config import ExLlamaV2Config
from .model.model import ExLlamaV2
from .model.module import Intervention
from .model.lora import ExLlamaV2Lora
from .tokenizer import ExLlamaV2Tokenizer
from .util import SeqTensor, Timer
from .vlm import ExLlamaV2MultimodalProjector, ExLlamaV2VisionTower

# ExLlamaV2Cache_TP, ExLlamaV2VisionTower and ExLlamaV2MultimodalProjector are importable for clients but
# raise NotImplementedError when used: tensor parallelism and vision are not implemented in this fork.
__all__ = [
    "__version__",
    "ExLlamaV2",
    "ExLlamaV2Cache",
    "ExLlamaV2CacheBase",
    "ExLlamaV2Cache_8bit",
    "ExLlamaV2Cache_Q4",
    "ExLlamaV2Cache_Q6",
    "ExLlamaV2Cache_Q8",
    "ExLlamaV2Cache_TP",
    "ExLlamaV2Config",
    "ExLlamaV2Lora",
    "ExLlamaV2MultimodalProjector",
    "ExLlamaV2Tokenizer",
    "ExLlamaV2VisionTower",
    "Intervention",
    "SeqTensor",
    "Timer",
]
