"""Lookups from text to the tokens whose decoded pieces match it, shared by the string filters."""

from __future__ import annotations

import bisect
from functools import lru_cache
from typing import Any


class PieceIndex:
    """Token pieces (decoded text of each id) indexed for prefix queries. Empty pieces are left out:
    they would match everywhere and never advance a constraint."""

    def __init__(self, pieces: list[str], lowercase: bool = False) -> None:
        self.pieces = pieces
        self.lowercase = lowercase
        self.by_piece: dict[str, list[int]] = {}
        for token_id, piece in enumerate(pieces):
            if not piece:
                continue
            key = piece.lower() if lowercase else piece
            self.by_piece.setdefault(key, []).append(token_id)
        self.sorted_keys = sorted(self.by_piece)
        self.max_len = max((len(k) for k in self.sorted_keys), default=0)

    def prefixes_of(self, text: str) -> set[int]:
        """Ids of every piece that `text` starts with."""
        key = text.lower() if self.lowercase else text
        found: set[int] = set()
        for n in range(1, min(len(key), self.max_len) + 1):
            found.update(self.by_piece.get(key[:n], ()))
        return found

    def starting_with(self, text: str) -> set[int]:
        """Ids of every piece that starts with `text` (including `text` itself)."""
        key = text.lower() if self.lowercase else text
        found: set[int] = set()
        i = bisect.bisect_left(self.sorted_keys, key)
        while i < len(self.sorted_keys) and self.sorted_keys[i].startswith(key):
            found.update(self.by_piece[self.sorted_keys[i]])
            i += 1
        return found


@lru_cache(maxsize=8)
def piece_index(tokenizer: Any, lowercase: bool = False) -> PieceIndex:
    return PieceIndex(tokenizer.get_id_to_piece_list(), lowercase)


def piece_of(tokenizer: Any, token_id: int) -> str:
    return piece_index(tokenizer).pieces[token_id]
