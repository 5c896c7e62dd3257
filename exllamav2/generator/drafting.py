"""Draft proposals for speculative decoding that need no draft model, shared by the generators.

A proposal is only a guess: the generators sample every proposed position with the main model and
keep the guesses only while they equal what was sampled, so a poor guess costs speed, never output.
"""

from __future__ import annotations


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
