"""The filter interface: constrain which tokens may be sampled next.

Lifecycle, driven by the generators: `begin(prefix_str)` once per generation, then for every step
`next()` (or `get_next()`, which also collects a result computed in the background) returning
``(pass_tokens, end_tokens)``, and `feed(token)` with the token that was sampled.

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
    from ...model import ExLlamaV2
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

    def feed(self, token: int) -> None:
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
