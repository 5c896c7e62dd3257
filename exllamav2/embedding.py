"""Upstream's module path for the embedding layer and `EMBEDDING_INDEX` (clients import them from here);
the layer lives in the model kit."""

from .model.embedding import EMBEDDING_INDEX, ExLlamaV2Embedding

__all__ = ["EMBEDDING_INDEX", "ExLlamaV2Embedding"]
