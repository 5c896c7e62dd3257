"""Bidirectional attention among an image's tokens in the text model (the architecture row's
image_attention="bidirectional": Gemma 3).

Text tokens attend causally; each token of an image (a run of consecutive embedding ids) attends to everything
before the image and to every token of the image. For a query span made of exactly one image that is plain
non-causal attention over the keys up to the image's end, which every backend (flash-attn and the paged path
too) computes with no mask. So a forward splits its queries into spans: text spans causal, each image one
non-causal span (attention.py runs one backend call per span; the keys and values are written once).

That needs the whole image in one forward: a forward chunk must never end inside an image. chunk_end moves
chunk ends accordingly, and a forward whose input ends on an image's token is refused, as the image could
continue in the next forward, whose tokens its first part would never have seen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import InputError
from .embedding import EMBEDDING_INDEX

Span = tuple[int, int, bool]        # (start, end, causal) of a run of query positions


def image_mask(input_ids: torch.Tensor) -> list[bool] | None:
    """Which positions of a (batch, length) input hold an image's tokens, the same in every row; None when none
    does. An InputError where rows hold images at different positions (no span split serves them all)."""
    is_image = input_ids >= EMBEDDING_INDEX
    if not bool(is_image.any()):
        return None
    if not bool((is_image == is_image[:1]).all()):
        raise InputError("the rows of this batch hold images at different positions, which this model's "
                         "bidirectional image attention cannot run in one forward: forward the prompts one at a "
                         "time, or use the dynamic generator")
    return is_image[0].tolist()


def check_input_end(input_ids: torch.Tensor) -> None:
    """Refuse an input whose last token is an image's: the image might continue in the next forward."""
    if bool((input_ids[:, -1] >= EMBEDDING_INDEX).any()):
        raise InputError("the input ends on an image's token: with this model's bidirectional image attention an "
                         "image must be forwarded whole, together with the token after it (an image block ends "
                         "with its end marker; do not split a prompt inside an image)")


def attention_spans(is_image: Sequence[bool] | None) -> list[Span] | None:
    """The query spans of a forward: text runs causal, each image run non-causal; None without images."""
    if is_image is None:
        return None
    spans: list[Span] = []
    start = 0
    for i in range(1, len(is_image) + 1):
        if i == len(is_image) or is_image[i] != is_image[start]:
            spans.append((start, i, not is_image[start]))
            start = i
    return spans


def chunk_end(is_image: Sequence[bool] | None, start: int, end: int, limit: int) -> int:
    """The end of the forward chunk [start, end) moved so that it cuts no image: back to the start of an image
    it would cut, or, for a chunk that starts within that image, past the image's end and the token after it
    (when there is one). An InputError when that exceeds `limit` tokens."""
    if is_image is None or end >= len(is_image) or not is_image[end - 1]:
        return end
    first = end - 1
    while first > start and is_image[first - 1]:
        first -= 1
    if first > start:
        return first
    while end < len(is_image) and is_image[end]:
        end += 1
    end = min(end + 1, len(is_image))
    if end - start > limit:
        raise InputError(f"an image of {end - start - 1} tokens does not fit a forward chunk of {limit} tokens: "
                         f"raise max_input_len (or the generator's max_chunk_size)")
    return end
