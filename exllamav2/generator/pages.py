"""The dynamic generator's page table: a batch-1 cache viewed as pages of `page_size` tokens.

A page remembers which tokens its keys/values belong to and the chain hash of everything before
it, so a later sequence with the same prefix can reuse it: whole pages by chain hash (shared,
read-only), and the start of a partly matching page by copying its keys/values (or by taking the
page over when nobody holds it). Unreferenced pages keep their contents until they are recycled,
least recently used first.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field


def chain_hash(prev: bytes | None, tokens: list[int]) -> bytes:
    """Hash of a page's tokens together with the hash of every page before it."""
    h = hashlib.blake2b(digest_size=16)
    if prev is not None:
        h.update(prev)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(eq=False)
class Page:
    index: int
    ref_count: int = 0
    tokens: list[int] = field(default_factory=list)  # tokens whose keys/values the page holds
    prev_hash: bytes | None = None                   # chain hash of the pages before it
    hash: bytes | None = None                        # its own chain hash, once registered for reuse
    last_used: int = 0


class PageTable:
    def __init__(self, num_pages: int, page_size: int) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.reset()

    def reset(self) -> None:
        self.pages = [Page(i) for i in range(self.num_pages)]
        self.by_hash: dict[bytes, Page] = {}
        self.clock = 0

    def _touch(self, page: Page) -> None:
        self.clock += 1
        page.last_used = self.clock

    def free_count(self) -> int:
        return sum(1 for p in self.pages if p.ref_count == 0)

    def lookup(self, h: bytes) -> Page | None:
        return self.by_hash.get(h)

    def acquire(self, page: Page) -> Page:
        page.ref_count += 1
        self._touch(page)
        return page

    def release(self, page: Page) -> None:
        if page.ref_count <= 0:
            raise RuntimeError(f"page {page.index} released more often than acquired")
        page.ref_count -= 1
        self._touch(page)

    def register(self, page: Page) -> None:
        """Offer a full page for reuse by later sequences."""
        if len(page.tokens) != self.page_size or page.hash is not None:
            return
        page.hash = chain_hash(page.prev_hash, page.tokens)
        self.by_hash.setdefault(page.hash, page)

    def unregister(self, page: Page) -> None:
        if page.hash is not None and self.by_hash.get(page.hash) is page:
            del self.by_hash[page.hash]
        page.hash = None

    def allocate(self) -> Page:
        """The least recently used unreferenced page, emptied and referenced once."""
        free = [p for p in self.pages if p.ref_count == 0]
        if not free:
            raise RuntimeError("no free cache page; the generator admitted more work than the cache holds")
        page = min(free, key=lambda p: p.last_used)
        self.unregister(page)
        page.tokens = []
        page.prev_hash = None
        return self.acquire(page)

    def best_partial(self, prev_hash: bytes | None, tokens: list[int]) -> tuple[Page | None, int]:
        """The page whose contents, after the same preceding pages, share the longest start with `tokens`."""
        best, best_n = None, 0
        for page in self.pages:
            if page.tokens and page.prev_hash == prev_hash:
                n = common_prefix(page.tokens, tokens)
                if n > best_n:
                    best, best_n = page, n
        return best, best_n
