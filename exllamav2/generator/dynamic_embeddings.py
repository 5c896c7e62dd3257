"""Upstream's import path of ExLlamaV2MMEmbedding, which lives in the model kit (model/mm_embedding.py) so that
the vision tower below the generators can make one."""

from __future__ import annotations

from ..model.mm_embedding import ExLlamaV2MMEmbedding, check_aliases_present, content_hash, remap_embeddings

__all__ = ["ExLlamaV2MMEmbedding", "check_aliases_present", "content_hash", "remap_embeddings"]
