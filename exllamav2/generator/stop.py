"""From sampled tokens to streamed text, with stop strings and banned strings that may span tokens.

`TextStream` holds back the newest tokens while their text could still turn into a stop string or
a banned string, and releases them once it cannot. Text is decoded over a few tokens of context,
so tokenizers that drop a leading space or emit a UTF-8 character over several byte tokens stream
exactly the text a full decode gives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

# Released tokens kept as decoding context for the next ones.
CONTEXT_TOKENS = 4


def decode_ids(tokenizer: Any, ids: list[int], special: bool) -> str:
    if not ids:
        return ""
    return tokenizer.decode(torch.tensor(ids, dtype=torch.long), decode_special_tokens=special)


def split_stop_conditions(conditions: Iterable[int | str] | None) -> tuple[set[int], list[str]]:
    """Stop conditions are token ids or strings; anything else is a caller error."""
    tokens: set[int] = set()
    strings: list[str] = []
    for c in conditions or ():
        if isinstance(c, str):
            if c and c not in strings:
                strings.append(c)
        elif isinstance(c, int):
            tokens.add(c)
        else:
            raise ValueError(f"stop conditions are token ids (int) or strings, got {type(c).__name__}: {c!r}")
    return tokens, strings


@dataclass
class StreamStep:
    """What one pushed token did. `released` tokens leave the front of the held list with `text`;
    on a banned string the newest `rewind` tokens are dropped and `ban_token` must not be sampled
    again at the position the rewind returns to."""

    text: str = ""
    released: list[int] = field(default_factory=list)
    stop_string: str | None = None
    rewind: int = 0
    ban_token: int | None = None
    suppressed_text: str = ""


@dataclass
class TokenExtras:
    """What the sampler reported for one token, held with the token until the stream releases it."""

    prob: torch.Tensor          # (1, 1) probability of the sampled token
    top_tokens: torch.Tensor    # (1, 1, k) candidates (meta tensors when k is 0)
    top_probs: torch.Tensor     # (1, 1, k)
    logits: torch.Tensor        # (rows, 1, vocab)


def join_extras(held: list[TokenExtras], *, probs: bool, top_k: int, logits: bool) -> dict[str, torch.Tensor]:
    """The released tokens' extras along the token axis, only those asked for; empty tensors when no token
    was released: "probs" (1, n), "top_tokens" and "top_probs" (1, n, k), "logits" (rows, n, vocab)."""
    out: dict[str, torch.Tensor] = {}
    if probs:
        out["probs"] = torch.cat([h.prob for h in held], dim=-1) if held else torch.zeros((1, 0))
    if top_k:
        out["top_tokens"] = (torch.cat([h.top_tokens for h in held], dim=1) if held
                             else torch.zeros((1, 0, top_k), dtype=torch.long))
        out["top_probs"] = torch.cat([h.top_probs for h in held], dim=1) if held else torch.zeros((1, 0, top_k))
    if logits:
        out["logits"] = torch.cat([h.logits for h in held], dim=1) if held else torch.zeros((1, 0, 0))
    return out


class TextStream:
    def __init__(
        self,
        tokenizer: Any,
        stop_strings: Iterable[str] = (),
        banned_strings: Iterable[str] = (),
        decode_special_tokens: bool = False,
        context: Iterable[int] = (),
        healed_token: int | None = None,
    ) -> None:
        """context: token ids before the first streamed one (the prompt's tail). healed_token: a
        prompt token removed for token healing; the first streamed token repeats its text, and
        only the rest is streamed."""
        self.tokenizer = tokenizer
        self.stop_strings = list(stop_strings)
        self.banned = [s.lower() for s in banned_strings if s]   # banned strings match in any case
        self.special = decode_special_tokens
        # Decoding without specials cuts at EOS; an EOS that does not end the stream must not hide
        # the text after it, and it has no text of its own then.
        self.hidden = set() if decode_special_tokens else {getattr(tokenizer, "eos_token_id", None)}
        self.context = [t for t in context if t not in self.hidden][-CONTEXT_TOKENS:]
        self.context_text = self._decode(self.context)
        self.held: list[int] = []
        self.healed_text = ""
        if healed_token is not None:
            self.held = [healed_token]
            self.healed_text = self._text()
            self.held = []

    @property
    def watching(self) -> bool:
        return bool(self.stop_strings or self.banned)

    def _decode(self, ids: list[int]) -> str:
        return decode_ids(self.tokenizer, [t for t in ids if t not in self.hidden], self.special)

    def _text(self, count: int | None = None) -> str:
        """Text of the first `count` held tokens (all by default)."""
        held = self.held if count is None else self.held[:count]
        full = self._decode(self.context + held)
        base = self.context_text
        text = full[len(base):] if full.startswith(base) else full[len(os.path.commonprefix([full, base])):]
        if self.healed_text and text.startswith(self.healed_text):
            text = text[len(self.healed_text):]
        return text

    def _release(self, count: int, text: str) -> StreamStep:
        released, self.held = self.held[:count], self.held[count:]
        if released:
            self.context = (self.context + [t for t in released if t not in self.hidden])[-CONTEXT_TOKENS:]
            self.context_text = self._decode(self.context)
            self.healed_text = ""
        return StreamStep(text=text, released=released)

    def _boundaries(self) -> list[int]:
        """End offset in the held text of each held token."""
        return [len(self._text(i + 1)) for i in range(len(self.held))]

    def _hold_from(self, text: str) -> int | None:
        """Earliest offset from which the text could still grow into a watched string."""
        low = text.lower()
        for i in range(len(text)):
            tail, tail_low = text[i:], low[i:]
            if any(s.startswith(tail) for s in self.stop_strings) or any(b.startswith(tail_low) for b in self.banned):
                return i
        return None

    def push(self, token: int) -> StreamStep:
        self.held.append(token)
        text = self._text()
        if text.endswith("\ufffd"):                 # a character still missing bytes
            return StreamStep()
        if not self.watching:
            return self._release(len(self.held), text)

        low = text.lower()
        hits = [(low.find(b), b) for b in self.banned if b in low]
        if hits:
            start = min(hits)[0]
            ends = self._boundaries()
            first = next(i for i, end in enumerate(ends) if end > start)
            before = ends[first - 1] if first else 0
            step = StreamStep(rewind=len(self.held) - first, ban_token=self.held[first], suppressed_text=text[before:])
            self.held = self.held[:first]
            return step

        stops = [(text.find(s), -len(s), s) for s in self.stop_strings if s in text]
        if stops:
            at, _, s = min(stops)
            step = self._release(len(self.held), text[:at])
            step.stop_string = s
            return step

        hold = self._hold_from(text)
        if hold is None:
            return self._release(len(self.held), text)
        ends = self._boundaries()
        count = sum(1 for end in ends if end <= hold)
        return self._release(count, text[: ends[count - 1]] if count else "")

    def flush(self) -> StreamStep:
        """Release everything held (generation ended for another reason)."""
        return self._release(len(self.held), self._text() if self.held else "")
