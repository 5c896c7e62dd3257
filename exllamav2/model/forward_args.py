"""The keyword arguments `ExLlamaV2.forward(..., **kwargs)` takes besides its named parameters.

Upstream (0.3.2) passes forward's **kwargs on to `forward_chunk` and from there to every module's
forward; the names below are those something on that path reads. Upstream ignored any other name
silently, so a misspelt argument (`input_masks=`, `position_offset=`) changed nothing and went
unnoticed; here it is a TypeError naming it.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

FORWARD_KWARGS: tuple[str, ...] = (
    "attn_params",            # Params / PagedParams the caller built (the dynamic generator's block tables)
    "indexed_embeddings",     # embeddings for ids >= EMBEDDING_INDEX (multimodal prompts)
    "mrope_positions",        # (3, batch, length) MRoPE positions of the tokens given (Qwen2-VL prompts with images)
    "extract_state_indices",  # upstream's forward_chunk option; forward itself returns no states, so no effect
)
_ACCEPTED = frozenset(FORWARD_KWARGS)


def check_forward_kwargs(forward: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
    """A TypeError naming every keyword in `kwargs` that `forward` does not take, and those it takes."""
    if kwargs.keys() <= _ACCEPTED:          # the common case, once per forward: no allocation
        return
    unknown = sorted(set(kwargs) - _ACCEPTED)
    named = [name for name, p in inspect.signature(forward).parameters.items()
             if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    raise TypeError(
        f"{getattr(forward, '__qualname__', 'forward')}() got unexpected keyword argument"
        f"{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; it takes "
        f"{', '.join(named + list(FORWARD_KWARGS))}"
    )
