"""Constrain generation to exactly one of a list of strings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ExLlamaV2Filter
from .pieces import piece_index, piece_of

if TYPE_CHECKING:
    import torch

    from ...model.model import ExLlamaV2
    from ...tokenizer import ExLlamaV2Tokenizer


class ExLlamaV2SelectFilter(ExLlamaV2Filter):
    """Allows only continuations of `prefix + option` for some option. A token that completes an
    option is an end token. With `case_insensitive`, options match in any case while the prefix
    passed to `begin` must still match exactly."""

    def __init__(
        self,
        model: "ExLlamaV2",
        tokenizer: "ExLlamaV2Tokenizer",
        options: list[str],
        case_insensitive: bool = False,
    ) -> None:
        super().__init__(model, tokenizer)
        self.options = list(options)
        self.case_insensitive = case_insensitive
        self.prefix = ""

    def clone(self, c: ExLlamaV2Filter | None = None) -> ExLlamaV2Filter:
        c = super().clone(c)
        c.options = self.options
        c.case_insensitive = self.case_insensitive
        c.prefix = self.prefix
        return c

    def begin(self, prefix_str: str = "") -> None:
        self.sequence_str = ""
        self.prefix = prefix_str

    def reset(self) -> None:
        self.sequence_str = ""
        self.prefix = ""

    def feed(self, token: "torch.Tensor | int") -> None:
        self.sequence_str += piece_of(self.tokenizer, int(token))

    def _same(self, a: str, b: str, start: int) -> bool:
        """a == b for two strings placed at offset `start` of prefix + option."""
        if not self.case_insensitive:
            return a == b
        cut = max(0, min(len(a), len(self.prefix) - start))
        return a[:cut] == b[:cut] and a[cut:].lower() == b[cut:].lower()

    def next(self) -> tuple[set[int], set[int]]:
        index = piece_index(self.tokenizer, self.case_insensitive)
        done = len(self.sequence_str)
        pass_tokens: set[int] = set()
        end_tokens: set[int] = set()
        for option in self.options:
            target = self.prefix + option
            if len(target) <= done or not self._same(self.sequence_str, target[:done], 0):
                continue
            rest = target[done:]
            for token_id in index.prefixes_of(rest):
                piece = index.pieces[token_id]
                if not self._same(piece, rest[: len(piece)], done):
                    continue
                pass_tokens.add(token_id)
                if len(piece) == len(rest):
                    end_tokens.add(token_id)
        return pass_tokens, end_tokens
