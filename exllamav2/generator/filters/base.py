"""The filter interface: constrain which tokens may be sampled next.

Lifecycle, driven by the generators: `begin(prefix_str)` once per generation, then for every step
`next()` (or `get_next()`, which also collects a result computed in the background) returning
``(pass_tokens, end_tokens)``, and `feed(token)` with the token that was sampled, as a (1, 1) long
tensor like upstream passes it (filter libraries read it as ``int(token[0][0])``).

Filters that only duck-type this class (lm-format-enforcer's ExLlamaV2TokenEnforcerFilter has just
begin/feed/next/clone) are wrapped by `as_filter`, which supplies the optional members' defaults.

- ``pass_tokens``: a set or list of allowed token ids, or None when the filter no longer constrains.
- ``end_tokens``: ids that complete the constraint; sampling one of them ends the filter.

Filters that can mask logits themselves (grammar engines such as formatron) return True from
`can_mask_logits()`; when every active filter does, the sampler calls `prepare_logit_mask()` (via
`get_next(mask=True)`) and then `mask_logits(logits)` instead of building a mask from token sets.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Iterable

import torch

if TYPE_CHECKING:
    from ...model.model import ExLlamaV2
    from ...tokenizer import ExLlamaV2Tokenizer


class ExLlamaV2Filter:

    # Tells filter libraries that `next()` may return lists as well as sets.
    allow_return_type_list: bool = True

    def __init__(self, model: "ExLlamaV2", tokenizer: "ExLlamaV2Tokenizer") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.sequence_str = ""
        self.background_result: Future | None = None

    def clone(self, c: "ExLlamaV2Filter | None" = None) -> "ExLlamaV2Filter":
        if c is None:
            c = type(self).__new__(type(self))
        c.model = self.model
        c.tokenizer = self.tokenizer
        c.sequence_str = self.sequence_str
        c.background_result = None
        return c

    # constraint ---------------------------------------------------------------------------

    def begin(self, prefix_str: str = "") -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Return to the state before `begin`; filters with extra state override this."""
        self.sequence_str = ""

    def feed(self, token: torch.Tensor) -> None:
        """`token`: the sampled id as a (1, 1) long tensor (`int(token)` reads it; ints are accepted too)."""
        raise NotImplementedError

    def next(self) -> tuple[Iterable[int] | None, Iterable[int] | None]:
        raise NotImplementedError

    # logit masking (optional) ------------------------------------------------------------

    def can_mask_logits(self) -> bool:
        return False

    def prepare_logit_mask(self) -> bool:
        raise NotImplementedError

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Return `logits` (1-D, vocab) with every excluded token set to -inf."""
        raise NotImplementedError

    # background evaluation ----------------------------------------------------------------

    def use_background_worker(self) -> bool:
        """True for CPU-heavy filters: the generator then runs `next()` on a thread pool while
        the model computes the next forward pass."""
        return False

    def background_next(self, pool: ThreadPoolExecutor) -> None:
        if self.background_result is not None:
            raise RuntimeError("filter already has a pending background result; call get_next() first")
        self.background_result = pool.submit(self.next)

    def background_prepare_logit_mask(self, pool: ThreadPoolExecutor) -> None:
        if self.background_result is not None:
            raise RuntimeError("filter already has a pending background result; call get_next() first")
        self.background_result = pool.submit(self.prepare_logit_mask)

    def background_drop(self) -> None:
        """Wait for and discard a pending background result (used when generation ends early)."""
        if self.background_result is not None:
            self.background_result.result()
            self.background_result = None

    def get_next(self, mask: bool = False) -> Any:
        """The pending background result if there is one, else compute it now."""
        if self.background_result is not None:
            result = self.background_result.result()
            self.background_result = None
            return result
        return self.prepare_logit_mask() if mask else self.next()


# Members a filter must have; everything else in ExLlamaV2Filter has a default.
_REQUIRED = ("begin", "feed", "next")


class _DuckTypedFilter(ExLlamaV2Filter):
    """An ExLlamaV2Filter around an object that implements the filter protocol without inheriting it.
    State stays in the wrapped object; missing optional members behave as the base class's defaults."""

    def __init__(self, inner: Any) -> None:
        super().__init__(getattr(inner, "model", None), getattr(inner, "tokenizer", None))
        self.inner = inner

    def clone(self, c: "ExLlamaV2Filter | None" = None) -> "ExLlamaV2Filter":
        clone = getattr(self.inner, "clone", None)
        return _DuckTypedFilter(clone() if clone is not None else self.inner)

    def begin(self, prefix_str: str = "") -> None:
        self.inner.begin(prefix_str)

    def reset(self) -> None:
        reset = getattr(self.inner, "reset", None)
        if reset is not None:
            reset()

    def feed(self, token: torch.Tensor) -> None:
        self.inner.feed(token)

    def next(self) -> tuple[Iterable[int] | None, Iterable[int] | None]:
        return self.inner.next()

    def can_mask_logits(self) -> bool:
        method = getattr(self.inner, "can_mask_logits", None)
        return bool(method()) if method is not None else False

    def prepare_logit_mask(self) -> bool:
        return self.inner.prepare_logit_mask()

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return self.inner.mask_logits(logits)

    def use_background_worker(self) -> bool:
        method = getattr(self.inner, "use_background_worker", None)
        return bool(method()) if method is not None else False


def as_filter(f: Any) -> ExLlamaV2Filter:
    """`f` itself if it is an ExLlamaV2Filter, else a wrapper giving a duck-typed filter the optional
    members it lacks. An object missing a required member is refused, naming it."""
    if isinstance(f, ExLlamaV2Filter):
        return f
    missing = [name for name in _REQUIRED if not callable(getattr(f, name, None))]
    if missing:
        raise TypeError(
            f"{type(f).__name__} is not a filter: it has no {', '.join(missing)}(); a filter subclasses "
            f"exllamav2.generator.filters.ExLlamaV2Filter or implements begin(prefix_str), feed(token) and next()"
        )
    return _DuckTypedFilter(f)


def as_filters(filters: Iterable[Any] | None) -> list[ExLlamaV2Filter]:
    """The generators' view of a `filters=` argument: a list of ExLlamaV2Filter (see as_filter)."""
    if filters is None:
        return []
    if isinstance(filters, ExLlamaV2Filter) or not isinstance(filters, (list, tuple)):
        raise TypeError(f"filters must be a list of filters, got {type(filters).__name__}; wrap it: filters=[f]")
    return [as_filter(f) for f in filters]


def feed_filters(filters: list[ExLlamaV2Filter], token_id: int) -> None:
    """Feed the sampled token to every filter as a (1, 1) long tensor, as upstream's generators do."""
    if not filters:
        return
    token = torch.tensor([[token_id]], dtype=torch.long)
    for f in filters:
        f.feed(token)
