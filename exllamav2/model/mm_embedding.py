"""ExLlamaV2MMEmbedding: precomputed input embeddings (e.g. image features) spliced into a prompt.

Each embedding owns a range of token ids at or above EMBEDDING_INDEX; its `text_alias` placed in a prompt
encodes to those ids (between the plain tokens `pre_ids` and `post_ids`: an image's start and end markers), or
to a `template` that interleaves them with plain tokens (Pixtral's [IMG_BREAK] after each row of patches).
Embeddings of equal content and layout share one range, and different ones never do, so the dynamic generator's
page cache, which hashes token ids, reuses a page only for the same image. Before a forward pass the generator
renumbers the ids of the embeddings a sequence uses into one flat table, the form the model's embedding layer
takes.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any, Sequence

import torch

from .embedding import EMBEDDING_INDEX

_index_lock = threading.Lock()
_reserved = 0   # embedding ids handed out so far
_by_content: dict[bytes, int] = {}    # content hash -> first index, so equal embeddings share their ids
SLOT = -1       # in a template: where the embedding's next row goes


def _reserve(length: int, key: bytes) -> int:
    global _reserved
    with _index_lock:
        if key in _by_content:
            return _by_content[key]
        start = _by_content[key] = _reserved
        _reserved += length
    return start


def content_hash(emb: torch.Tensor, layout: object) -> bytes:
    """Identity of an embedding: its values, shape, dtype and layout (an image's grid)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(emb.shape), str(emb.dtype), layout)).encode())
    h.update(emb.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()


class ExLlamaV2MMEmbedding:
    def __init__(self, model: Any, embeddings: torch.Tensor, text_alias: str | None = None,
                 pre_ids: Sequence[int] = (), post_ids: Sequence[int] = (),
                 mrope_grid: tuple[int, int, int] | None = None, template: Sequence[int] | None = None) -> None:
        """embeddings: (length, hidden_size) or (1, length, hidden_size). `mrope_grid`: (t, h, w) of the image's
        tokens in the text model, for MRoPE positions (Qwen2-VL); None for embeddings placed as text.
        `template`: the block between pre_ids and post_ids as plain ids with SLOT where the rows go, in order
        (one SLOT per row); None: the rows alone."""
        emb = embeddings.view(-1, embeddings.shape[-1])
        hidden = model.config.hidden_size
        if emb.shape[-1] != hidden:
            raise ValueError(f"embeddings have width {emb.shape[-1]} but the model's hidden size is {hidden}")
        if mrope_grid is not None and mrope_grid[0] * mrope_grid[1] * mrope_grid[2] != emb.shape[0]:
            raise ValueError(f"mrope_grid {mrope_grid} does not cover the {emb.shape[0]} embedding rows")
        if template is not None:
            _check_template(template, emb.shape[0], mrope_grid)
        self.model = model
        self.embeddings = emb
        self.length = emb.shape[0]
        self.pre_ids, self.post_ids = [int(i) for i in pre_ids], [int(i) for i in post_ids]
        self.mrope_grid = None if mrope_grid is None else tuple(int(x) for x in mrope_grid)
        self.template = None if template is None else tuple(int(i) for i in template)
        # the layout is part of the identity: the same rows in another block are other prompt ids
        self.content_hash = content_hash(emb, self.mrope_grid if self.template is None else (None, self.template))
        self.first_index = _reserve(self.length, self.content_hash)
        self.text_alias = text_alias or f"{{{{EMBED_{self.first_index}}}}}"

    def get_ids(self) -> list[int]:
        """The ids the text alias encodes to: the plain tokens before, the embedding's own ids (placed in the
        template, if any), those after."""
        own = range(EMBEDDING_INDEX + self.first_index, EMBEDDING_INDEX + self.first_index + self.length)
        if self.template is not None:
            rows = iter(own)
            own = [next(rows) if i == SLOT else i for i in self.template]
        return [*self.pre_ids, *own, *self.post_ids]

    def get_ids_tensor(self) -> torch.Tensor:
        return torch.tensor([self.get_ids()], dtype=torch.long)


def _check_template(template: Sequence[int], length: int, mrope_grid: object) -> None:
    slots = sum(1 for i in template if i == SLOT)
    if slots != length:
        raise ValueError(f"the template has {slots} slots for {length} embedding rows")
    if any(i != SLOT and not 0 <= i < EMBEDDING_INDEX for i in template):
        raise ValueError("a template holds plain token ids (below EMBEDDING_INDEX) and SLOT only")
    if mrope_grid is not None:
        raise ValueError("an embedding with mrope_grid takes no template (MRoPE positions assume consecutive rows)")


def remap_embeddings(
    ids: torch.Tensor, embeddings: Sequence[ExLlamaV2MMEmbedding] | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Renumber embedding ids in `ids` into a flat table of `embeddings`; returns (ids, table)."""
    if not embeddings or not bool((ids >= EMBEDDING_INDEX).any()):
        return ids, None
    embeddings = list({e.first_index: e for e in embeddings}.values())   # equal content: one range, once
    out = ids.clone()
    offset = 0
    known = ids < EMBEDDING_INDEX
    for e in embeddings:
        lo = EMBEDDING_INDEX + e.first_index
        inside = (ids >= lo) & (ids < lo + e.length)
        out[inside] = ids[inside] - lo + EMBEDDING_INDEX + offset
        known |= inside
        offset += e.length
    if not bool(known.all()):
        raise ValueError("the prompt holds embedding ids of an embedding that was not passed with it")
    return out, torch.cat([e.embeddings for e in embeddings], dim=0)


def check_aliases_present(rows: Sequence[torch.Tensor], embeddings: Sequence[ExLlamaV2MMEmbedding] | None) -> None:
    """A ValueError naming each embedding passed with a prompt whose text alias the prompt does not hold (it was
    misspelt, or the prompt was encoded without embeddings=): such an image would be silently left out."""
    present = set()
    for ids in rows:
        present.update(ids.view(-1)[ids.view(-1) >= EMBEDDING_INDEX].tolist())
    missing = [e.text_alias for e in embeddings or () if EMBEDDING_INDEX + e.first_index not in present]
    if missing:
        raise ValueError(f"the prompt does not hold the text alias of embedding(s) {', '.join(map(repr, missing))}; "
                         f"put each alias in the prompt and encode it with embeddings=[...]")
