"""Speculative-decoding helpers shared by the generators: n-gram proposals, which need no draft model,
and the check that a draft model can propose tokens for the main model at all.

A proposal is only a guess: the generators sample every proposed position with the main model and
keep the guesses only while they equal what was sampled, so a poor guess costs speed, never output.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..errors import GenerationArgumentError

if TYPE_CHECKING:
    from ..model.model import ExLlamaV2
    from ..tokenizer import ExLlamaV2Tokenizer

log = logging.getLogger(__name__)


def check_draft_vocab(draft_model: "ExLlamaV2", model: "ExLlamaV2", tokenizer: "ExLlamaV2Tokenizer") -> None:
    """A draft model must cover the tokenizer's ids; a different (padded) vocab size only gets a warning,
    since real pairs sharing a tokenizer often differ there (e.g. Qwen2.5 0.5B vs 7B)."""
    draft_vocab, vocab = draft_model.config.vocab_size, tokenizer.get_vocab_size()
    if draft_vocab < vocab:
        raise GenerationArgumentError(
            f"the draft model's vocabulary has {draft_vocab} tokens but the tokenizer's has {vocab}; the "
            f"draft model must use the same tokenizer as the main model"
        )
    if draft_vocab != model.config.vocab_size:
        log.warning("the draft model's vocab_size (%d) differs from the model's (%d); drafts are only useful "
                    "if both use the same tokenizer", draft_vocab, model.config.vocab_size)


def ngram_draft(context: list[int], k: int, max_ngram: int) -> list[int]:
    """Up to `k` tokens that followed the most recent earlier occurrence of the context's longest
    repeated suffix (at most `max_ngram` tokens long); [] when not even the last token repeats."""
    for n in range(min(max_ngram, len(context) - 1), 0, -1):
        suffix = context[-n:]
        first = suffix[0]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start] == first and context[start : start + n] == suffix:
                return context[start + n : start + n + k]
    return []


class NgramCache:
    """How often each token followed each n-gram (min_len..max_len tokens) of the text seen so far.
    Drafts follow the longest matching n-gram whose best continuation was seen `threshold` times."""

    def __init__(self, min_len: int, max_len: int, preload: "NgramCache | None" = None) -> None:
        self.min_len, self.max_len = min_len, max_len
        self.counts: dict[tuple[int, ...], dict[int, int]] = {}
        if preload is not None:
            for key, followers in preload.counts.items():
                if min_len <= len(key) <= max_len:
                    self.counts[key] = dict(followers)

    def update(self, ids: list[int], start: int = 1) -> None:
        """Count, for every position i >= start of `ids`, the n-grams that end just before it."""
        for i in range(max(start, 1), len(ids)):
            follower = ids[i]
            for n in range(self.min_len, min(self.max_len, i) + 1):
                followers = self.counts.setdefault(tuple(ids[i - n : i]), {})
                followers[follower] = followers.get(follower, 0) + 1

    def predict(self, context: list[int], max_inf: int, threshold: int) -> int | None:
        """The most frequent follower of the longest suffix (at most `max_inf` tokens) of `context`
        seen at least `threshold` times; ties go to the lower token id so drafts are reproducible."""
        for n in range(min(max_inf, self.max_len, len(context)), self.min_len - 1, -1):
            followers = self.counts.get(tuple(context[-n:]))
            if not followers:
                continue
            token, count = min(followers.items(), key=lambda kv: (-kv[1], kv[0]))
            if count >= threshold:
                return token
        return None

    def draft(self, context: list[int], k: int, max_inf: int, threshold: int) -> list[int]:
        """Up to `k` tokens, each predicted from the context extended by the ones before it."""
        drafted: list[int] = []
        for _ in range(k):
            token = self.predict(context + drafted, max_inf, threshold)
            if token is None:
                break
            drafted.append(token)
        return drafted


def check_ngram_settings(min_len: int, max_len: int, max_inf: int, threshold: int) -> None:
    """Refuse n-gram settings that could never draft, naming the setting."""
    if not 1 <= min_len <= max_len:
        raise GenerationArgumentError(f"speculative_ngram_min ({min_len}) must be at least 1 and at most "
                         f"speculative_ngram_max ({max_len})")
    if max_inf < min_len:
        raise GenerationArgumentError(f"speculative_ngram_max_inf ({max_inf}) must be at least speculative_ngram_min ({min_len})")
    if threshold < 1:
        raise GenerationArgumentError(f"speculative_ngram_threshold must be at least 1, got {threshold}")
