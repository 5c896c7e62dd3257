"""Backend for a HF `tokenizers` tokenizer.json."""

from __future__ import annotations

import json
import threading
from typing import Any

from tokenizers import Tokenizer

from .base import BYTE_PIECE, ExLlamaV2TokenizerBase


def _byte_level_alphabet() -> dict[str, int]:
    """Map each char of the byte-level BPE alphabet back to its byte. Bytes that are printable
    Latin-1 stand for themselves; the other 68 are shifted, in order, to U+0100 and up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    char_to_byte = {chr(b): b for b in printable}
    shifted = sorted(set(range(256)) - set(printable))
    for n, b in enumerate(shifted):
        char_to_byte[chr(256 + n)] = b
    return char_to_byte


BYTE_LEVEL_CHARS = _byte_level_alphabet()


def _decoder_steps(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The tokenizer.json decoder as a flat list of steps (a "Sequence" decoder is unrolled)."""
    decoder = spec.get("decoder") or {}
    if decoder.get("type") == "Sequence":
        return list(decoder.get("decoders") or [])
    return [decoder] if decoder else []


def _space_marker(steps: list[dict[str, Any]]) -> str | None:
    """The char the decoder turns into a space ("▁" for SentencePiece-style vocabularies)."""
    for step in steps:
        if step.get("type") == "Metaspace":
            return step.get("replacement", "\u2581")
        if step.get("type") == "Replace" and step.get("content") == " ":
            pattern = step.get("pattern") or {}
            if "String" in pattern:
                return pattern["String"]
    return None


class ExLlamaV2TokenizerHF(ExLlamaV2TokenizerBase):

    def __init__(self, tokenizer_json: str, spec: dict[str, Any] | None = None) -> None:
        """`spec` is the parsed tokenizer.json when the caller has read it already."""
        super().__init__()
        self.hf_tokenizer = Tokenizer.from_file(tokenizer_json)
        if spec is None:
            with open(tokenizer_json, encoding="utf-8") as f:
                spec = json.load(f)
        # `encode_special_tokens` is a switch on the shared Rust object, so flip it under a lock
        self._encode_lock = threading.Lock()

        added = self.hf_tokenizer.get_added_tokens_decoder()
        self._added_text = {i: t.content for i, t in added.items() if not t.special}
        self._special_ids = {i for i, t in added.items() if t.special}
        self._added_pieces = {t.content: i for i, t in added.items()}
        self._vocab_size = 1 + max(self.hf_tokenizer.get_vocab(with_added_tokens=True).values())

        model = spec.get("model") or {}
        steps = _decoder_steps(spec)
        self._byte_level = any(s.get("type") == "ByteLevel" for s in steps)
        self._byte_fallback = bool(model.get("byte_fallback")) or any(
            s.get("type") == "ByteFallback" for s in steps
        )
        self._space_marker = _space_marker(steps)
        unk = model.get("unk_token")
        if unk is None and model.get("unk_id") is not None:  # Unigram models store an id
            unk = self.hf_tokenizer.id_to_token(model["unk_id"])
        self._unk_token = unk

    def vocab_size(self) -> int:
        return self._vocab_size

    def id_to_piece(self, idx: int) -> str:
        return self.hf_tokenizer.id_to_token(idx) or ""

    def piece_to_id(self, piece: str) -> int | None:
        return self.hf_tokenizer.token_to_id(piece)

    def unk_id(self) -> int | None:
        return None if self._unk_token is None else self.piece_to_id(self._unk_token)

    def unk_token(self) -> str | None:
        return self._unk_token

    def parsed_added_tokens(self) -> dict[str, int]:
        return self._added_pieces

    def encode(self, text: str, special: bool = False) -> list[int]:
        with self._encode_lock:
            # True means "treat special tokens in the text as plain text"
            self.hf_tokenizer.encode_special_tokens = not special
            return self.hf_tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.hf_tokenizer.decode(ids, skip_special_tokens=skip_special)

    def token_bytes(self, idx: int) -> bytes | None:
        if idx in self._special_ids:
            return None
        if idx in self._added_text:
            return self._added_text[idx].encode("utf-8")
        token = self.hf_tokenizer.id_to_token(idx)
        if token is None:
            return None
        if self._byte_level and all(c in BYTE_LEVEL_CHARS for c in token):
            return bytes(BYTE_LEVEL_CHARS[c] for c in token)
        if self._byte_fallback:
            match = BYTE_PIECE.fullmatch(token)
            if match:
                return bytes([int(match.group(1), 16)])
        if self._space_marker:
            token = token.replace(self._space_marker, " ")
        return token.encode("utf-8")
