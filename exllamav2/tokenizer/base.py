"""The small interface `ExLlamaV2Tokenizer` needs from a tokenizer library.

A backend knows its own vocabulary (ids ``0 .. vocab_size() - 1``), encodes and decodes, and can
say which bytes each token stands for. Raw pieces (`id_to_piece`) are the library's own token
strings ("Ġthe", "▁the", "<0x0A>"); `vocab` holds the text each token decodes to on its own
(" the", " the", "\\n"), with "" for control tokens.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod

# SentencePiece-style byte-fallback token, e.g. "<0x0A>"
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class ExLlamaV2TokenizerBase(ABC):

    def __init__(self) -> None:
        self._vocab: list[str] | None = None

    @abstractmethod
    def vocab_size(self) -> int:
        """One more than the highest id the backend knows."""

    @abstractmethod
    def id_to_piece(self, idx: int) -> str:
        """The backend's raw token string for `idx` ("" when there is none)."""

    @abstractmethod
    def piece_to_id(self, piece: str) -> int | None:
        """The id of a raw token string, or None if the vocabulary lacks it."""

    @abstractmethod
    def unk_id(self) -> int | None: ...

    @abstractmethod
    def encode(self, text: str, special: bool = False) -> list[int]:
        """Token ids for `text`, no BOS/EOS added. With `special`, special tokens the backend
        knows are parsed out of the text; without it they are encoded as plain text."""

    @abstractmethod
    def decode(self, ids: list[int], skip_special: bool = True) -> str: ...

    @abstractmethod
    def token_bytes(self, idx: int) -> bytes | None:
        """The bytes token `idx` stands for, or None for control/special tokens."""

    def parsed_added_tokens(self) -> dict[str, int]:
        """Added tokens (piece -> id) that `encode(text, special=True)` finds in raw text itself."""
        return {}

    def unk_token(self) -> str | None:
        idx = self.unk_id()
        return None if idx is None else self.id_to_piece(idx)

    def piece_text(self, idx: int) -> str:
        """What token `idx` decodes to on its own, keeping a leading space."""
        data = self.token_bytes(idx)
        return "" if data is None else data.decode("utf-8", errors="replace")

    @property
    def vocab(self) -> list[str]:
        """Decoded text of every token id (built once)."""
        if self._vocab is None:
            self._vocab = [self.piece_text(i) for i in range(self.vocab_size())]
        return self._vocab
