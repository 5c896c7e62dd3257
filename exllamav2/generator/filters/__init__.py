from .base import ExLlamaV2Filter
from .prefix import ExLlamaV2PrefixFilter
from .select import ExLlamaV2SelectFilter

__all__ = ["ExLlamaV2Filter", "ExLlamaV2PrefixFilter", "ExLlamaV2SelectFilter"]
