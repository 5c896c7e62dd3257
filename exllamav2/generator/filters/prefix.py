"""Force the generated text to begin with one of a set of strings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ExLlamaV2Filter
from .pieces import piece_index, piece_of

if TYPE_CHECKING:
    import torch

    from ...model.model import ExLlamaV2
    from ...tokenizer import ExLlamaV2Tokenizer


class ExLlamaV2PrefixFilter(ExLlamaV2Filter):
    """Until the text starts with one of `prefix_strings`, only tokens that keep it on the way to
    one are allowed (a token may run past the end of a prefix). After that it stops constraining.
    When two prefixes share a start, reaching the shorter one already satisfies the filter."""

    def __init__(
        self,
        model: "ExLlamaV2",
        tokenizer: "ExLlamaV2Tokenizer",
        prefix_strings: str | list[str],
    ) -> None:
        super().__init__(model, tokenizer)
        self.prefix_strings = [prefix_strings] if isinstance(prefix_strings, str) else list(prefix_strings)
        self.current_prefixes: set[str] = set(self.prefix_strings)
        self.current_str = ""

    def clone(self, c: ExLlamaV2Filter | None = None) -> ExLlamaV2Filter:
        c = super().clone(c)
        c.prefix_strings = self.prefix_strings
        c.current_prefixes = set(self.current_prefixes)
        c.current_str = self.current_str
        return c

    def begin(self, prefix_str: str = "") -> None:
        self.current_prefixes = set(self.prefix_strings)
        self.current_str = ""

    def reset(self) -> None:
        self.begin()

    def feed(self, token: "torch.Tensor | int") -> None:
        self.current_str += piece_of(self.tokenizer, int(token))
        s = self.current_str
        self.current_prefixes = {p for p in self.current_prefixes if p.startswith(s) or s.startswith(p)}

    def _satisfied(self) -> bool:
        return not self.current_prefixes or any(self.current_str.startswith(p) for p in self.current_prefixes)

    def next(self) -> tuple[set[int] | None, set[int]]:
        if self._satisfied():
            return None, set()
        index = piece_index(self.tokenizer)
        pass_tokens: set[int] = set()
        for prefix in self.current_prefixes:
            rest = prefix[len(self.current_str):]
            pass_tokens |= index.prefixes_of(rest) | index.starting_with(rest)
        return pass_tokens, set()
