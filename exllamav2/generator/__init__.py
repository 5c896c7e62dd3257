from .base import ExLlamaV2BaseGenerator
from .dynamic import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob
from .dynamic_async import ExLlamaV2DynamicGeneratorAsync, ExLlamaV2DynamicJobAsync
from .dynamic_embeddings import ExLlamaV2MMEmbedding
from .hooks import ExLlamaV2PostSamplingHook, ExLlamaV2PostSamplingResult
from .sampler import ExLlamaV2Sampler
from .streaming import ExLlamaV2StreamingGenerator

__all__ = [
    "ExLlamaV2BaseGenerator",
    "ExLlamaV2DynamicGenerator",
    "ExLlamaV2DynamicGeneratorAsync",
    "ExLlamaV2DynamicJob",
    "ExLlamaV2DynamicJobAsync",
    "ExLlamaV2MMEmbedding",
    "ExLlamaV2PostSamplingHook",
    "ExLlamaV2PostSamplingResult",
    "ExLlamaV2Sampler",
    "ExLlamaV2StreamingGenerator",
]
