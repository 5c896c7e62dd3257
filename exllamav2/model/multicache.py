"""model.forward(ids, [cache_0, cache_1, ...]): one cache per batch row, as upstream accepts.

Each row runs as its own forward pass against its own cache, so the caches may hold different
lengths and each advances by the row's length, exactly as separate calls would. The rows' logits
(and last states) are stacked back into one batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..cache.base import ExLlamaV2CacheBase

if TYPE_CHECKING:
    from .model import ExLlamaV2


def _row(value: Any, i: int) -> Any:
    """Row i of a per-batch tensor argument (None and scalars pass through)."""
    return value[i : i + 1] if isinstance(value, torch.Tensor) and value.dim() > 0 else value


def check_caches(caches: list | tuple, bsz: int) -> None:
    """One distinct ExLlamaV2Cache-like object per batch row, or a clear error naming the mismatch."""
    if len(caches) != bsz:
        raise ValueError(f"a list of caches needs one cache per batch row: got {len(caches)} caches for "
                         f"{bsz} rows of input_ids")
    for i, c in enumerate(caches):
        if not isinstance(c, ExLlamaV2CacheBase):
            raise TypeError(f"cache[{i}] is a {type(c).__name__}, not an ExLlamaV2 cache")
    if len({id(c) for c in caches}) != len(caches):
        raise ValueError("the same cache appears twice in the list; each batch row needs its own cache")


def forward_per_row_caches(model: "ExLlamaV2", input_ids: torch.Tensor, caches: list | tuple,
                           input_mask: torch.Tensor | None, preprocess_only: bool, last_id_only: bool,
                           loras: Any, return_last_state: bool, position_offsets: torch.Tensor | None,
                           abort_event: Any, cpu_logits: bool, **kwargs: Any) -> Any:
    """Run row i of `input_ids` (and of input_mask / position_offsets) against caches[i]; returns what
    one batched forward would. Other keyword arguments (an embedding table) are shared by all rows."""
    if "attn_params" in kwargs:
        raise ValueError("attn_params (paged attention) cannot be combined with a list of caches")
    check_caches(caches, input_ids.shape[0])
    outs = []
    for i, cache in enumerate(caches):
        out = model.forward(input_ids[i : i + 1], cache, input_mask=_row(input_mask, i),
                            preprocess_only=preprocess_only, last_id_only=last_id_only, loras=loras,
                            return_last_state=return_last_state, position_offsets=_row(position_offsets, i),
                            abort_event=abort_event, cpu_logits=cpu_logits, **kwargs)
        if abort_event is not None and abort_event.is_set():
            return None
        outs.append(out)
    if preprocess_only:
        return None
    if return_last_state:
        return torch.cat([o[0] for o in outs], dim=0), torch.cat([o[1] for o in outs], dim=0)
    return torch.cat(outs, dim=0)
