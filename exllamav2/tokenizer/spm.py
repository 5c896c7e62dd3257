"""Backend for a SentencePiece tokenizer.model."""

from __future__ import annotations

from sentencepiece import SentencePieceProcessor

from .base import BYTE_PIECE, ExLlamaV2TokenizerBase

SPACE_MARKER = "\u2581"  # "▁"


class ExLlamaV2TokenizerSPM(ExLlamaV2TokenizerBase):

    def __init__(self, tokenizer_model: str) -> None:
        super().__init__()
        self.spm = SentencePieceProcessor(model_file=tokenizer_model)

    def vocab_size(self) -> int:
        return self.spm.vocab_size()

    def id_to_piece(self, idx: int) -> str:
        if not 0 <= idx < self.vocab_size():
            return ""
        return self.spm.id_to_piece(idx)

    def piece_to_id(self, piece: str) -> int | None:
        # SentencePiece answers the unk id for unknown pieces
        idx = self.spm.piece_to_id(piece)
        return idx if self.spm.id_to_piece(idx) == piece else None

    def unk_id(self) -> int | None:
        idx = self.spm.unk_id()
        return idx if idx >= 0 else None

    def encode(self, text: str, special: bool = False) -> list[int]:
        # SentencePiece has no special tokens to parse from text; the caller splits them out
        return self.spm.encode(text)

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        # control tokens decode to "" either way
        return self.spm.decode(ids)

    def token_bytes(self, idx: int) -> bytes | None:
        sp = self.spm
        if sp.is_control(idx) or sp.is_unknown(idx) or sp.is_unused(idx):
            return None
        piece = sp.id_to_piece(idx)
        if sp.is_byte(idx):
            return bytes([int(BYTE_PIECE.fullmatch(piece).group(1), 16)])
        return piece.replace(SPACE_MARKER, " ").encode("utf-8")
