"""ExLlamaV2MMEmbedding: precomputed input embeddings (e.g. image features) spliced into a prompt.

Each embedding owns a unique range of token ids at or above EMBEDDING_INDEX; its `text_alias`
placed in a prompt encodes to those ids. Before a forward pass the generator renumbers the ids of
the embeddings a sequence uses into one flat table, the form the model's embedding layer takes.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import torch

from ..model.embedding import EMBEDDING_INDEX

_index_lock = threading.Lock()
_reserved = 0   # embedding ids handed out so far


def _reserve(length: int) -> int:
    global _reserved
    with _index_lock:
        start = _reserved
        _reserved += length
    return start


class ExLlamaV2MMEmbedding:
    def __init__(self, model: Any, embeddings: torch.Tensor, text_alias: str | None = None) -> None:
        """embeddings: (length, hidden_size) or (1, length, hidden_size)."""
        emb = embeddings.view(-1, embeddings.shape[-1])
        hidden = model.config.hidden_size
        if emb.shape[-1] != hidden:
            raise ValueError(f"embeddings have width {emb.shape[-1]} but the model's hidden size is {hidden}")
        self.model = model
        self.embeddings = emb
        self.length = emb.shape[0]
        self.first_index = _reserve(self.length)
        self.text_alias = text_alias or f"{{{{EMBED_{self.first_index}}}}}"

    def get_ids(self) -> list[int]:
        return list(range(EMBEDDING_INDEX + self.first_index, EMBEDDING_INDEX + self.first_index + self.length))

    def get_ids_tensor(self) -> torch.Tensor:
        return torch.tensor([self.get_ids()], dtype=torch.long)


def remap_embeddings(
    ids: torch.Tensor, embeddings: Sequence[ExLlamaV2MMEmbedding] | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Renumber embedding ids in `ids` into a flat table of `embeddings`; returns (ids, table)."""
    if not embeddings or not bool((ids >= EMBEDDING_INDEX).any()):
        return ids, None
    out = ids.clone()
    offset = 0
    for e in embeddings:
        lo = EMBEDDING_INDEX + e.first_index
        inside = (ids >= lo) & (ids < lo + e.length)
        out[inside] = ids[inside] - lo + EMBEDDING_INDEX + offset
        offset += e.length
    if bool((out >= EMBEDDING_INDEX + offset).any()):
        raise ValueError("the prompt holds embedding ids of an embedding that was not passed with it")
    return out, torch.cat([e.embeddings for e in embeddings], dim=0)
