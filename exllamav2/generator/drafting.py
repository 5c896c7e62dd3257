"""Speculative-decoding helpers shared by the generators: n-gram proposals, which need no draft model,
and the check that a draft model can propose tokens for the main model at all.

A proposal is only a guess: the generators sample every proposed position with the main model and
keep the guesses only while they equal what was sampled, so a poor guess costs speed, never output.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..model import ExLlamaV2
    from ..tokenizer import ExLlamaV2Tokenizer

log = logging.getLogger(__name__)


def check_draft_vocab(draft_model: "ExLlamaV2", model: "ExLlamaV2", tokenizer: "ExLlamaV2Tokenizer") -> None:
    """A draft model must cover the tokenizer's ids; a different (padded) vocab size only gets a warning,
    since real pairs sharing a tokenizer often differ there (e.g. Qwen2.5 0.5B vs 7B)."""
    draft_vocab, vocab = draft_model.config.vocab_size, tokenizer.get_vocab_size()
    if draft_vocab < vocab:
        raise ValueError(
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
