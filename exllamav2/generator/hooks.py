"""Post-sampling hooks: callables in `Settings.post_sampling_hooks` that may inspect or replace a
sampled token before the generator commits it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class ExLlamaV2PostSamplingResult:
    sampled_token: torch.Tensor | None = None       # (1, 1)
    sampled_prob: torch.Tensor | None = None        # (1, 1)
    candidate_tokens: torch.Tensor | None = None    # (1, 1, k) when top tokens were requested
    candidate_probs: torch.Tensor | None = None
    logits: torch.Tensor | None = None              # (1, 1, vocab)
    feed_filters: bool = True                       # a hook may turn this off to keep filters unfed


ExLlamaV2PostSamplingHook = Callable[[ExLlamaV2PostSamplingResult], None]


def run_post_sampling_hooks(
    hooks: list[ExLlamaV2PostSamplingHook],
    token: torch.Tensor,
    prob: torch.Tensor,
    candidate_tokens: torch.Tensor,
    candidate_probs: torch.Tensor,
    logits: torch.Tensor,
) -> ExLlamaV2PostSamplingResult:
    """Let each hook see (and possibly replace) the sampled token, in order."""
    result = ExLlamaV2PostSamplingResult(token, prob, candidate_tokens, candidate_probs, logits)
    for hook in hooks:
        hook(result)
    return result
