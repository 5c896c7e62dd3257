"""Filters: allowed / end token sets against a brute-force scan of every token piece, and the base
class's background and clone hooks that grammar libraries (formatron) rely on."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from exllamav2.generator.filters import ExLlamaV2Filter, ExLlamaV2PrefixFilter, ExLlamaV2SelectFilter

PIECES = [
    "", "<eos>", "a", "ap", "app", "apple", "Ap", "APP", "le", "l", "e", "p", "b", "ban", "ana", "banana",
    "an", "n", " ", " a", "x", "pl", "Apple", "AP", "plE", "E", "ppl",
]


class FakeTokenizer:
    def __init__(self, pieces):
        self.pieces = pieces

    def get_id_to_piece_list(self, include_special_tokens: bool = False):
        return list(self.pieces)


TOK = FakeTokenizer(PIECES)


def brute_select(options, prefix, generated, case_insensitive):
    """Tokens t such that generated + piece(t) is a prefix of some prefix + option (exact on the
    prefix part, case-folded on the option part); end tokens complete an option."""

    def same(a, b, start):
        cut = max(0, min(len(a), len(prefix) - start))
        if not case_insensitive:
            return a == b
        return a[:cut] == b[:cut] and a[cut:].lower() == b[cut:].lower()

    allowed, ends = set(), set()
    for t, piece in enumerate(PIECES):
        if not piece:
            continue
        text = generated + piece
        for o in options:
            target = prefix + o
            if len(text) <= len(target) and same(text, target[: len(text)], 0):
                allowed.add(t)
                if len(text) == len(target):
                    ends.add(t)
    return allowed, ends


def feed_text(f, ids):
    for t in ids:
        f.feed(t)


@pytest.mark.parametrize("case_insensitive", [False, True])
@pytest.mark.parametrize("prefix,fed", [("", []), ("", [3]), ("", [12, 16]), ("A", []), ("A", [6]), ("A", [6, 11])])
def test_select_filter_matches_brute_force(case_insensitive, prefix, fed):
    options = ["pple", "pplE", "nana", "apple", "banana"] if prefix else ["apple", "Apple", "banana", "an"]
    f = ExLlamaV2SelectFilter(None, TOK, options, case_insensitive=case_insensitive)
    f.begin(prefix)
    feed_text(f, fed)
    generated = "".join(PIECES[t] for t in fed)
    want = brute_select(options, prefix, generated, case_insensitive)
    assert f.next() == want
    assert want[0], "case should allow something"


def test_select_filter_case_insensitive_allows_other_case_but_prefix_stays_exact():
    f = ExLlamaV2SelectFilter(None, TOK, ["pple"], case_insensitive=True)
    f.begin("A")
    allowed, ends = f.next()
    assert 6 in allowed and 22 in ends          # "Ap", "Apple" (exact prefix "A")
    assert 3 not in allowed                      # "ap" has the wrong case in the prefix part
    assert 23 in allowed                         # "AP": prefix "A" exact, "P" folded


def test_prefix_filter_until_satisfied_then_free():
    f = ExLlamaV2PrefixFilter(None, TOK, ["app", "ban"])
    f.begin("")
    allowed, ends = f.next()
    want = {t for t, p in enumerate(PIECES) if p and any(x.startswith(p) or p.startswith(x) for x in ("app", "ban"))}
    assert allowed == want and ends == set()
    f.feed(2)                                    # "a": only "app" remains
    allowed, _ = f.next()
    assert allowed == {t for t, p in enumerate(PIECES) if p and ("pp".startswith(p) or p.startswith("pp"))}
    f.feed(26)                                   # "ppl" runs past the prefix: satisfied
    assert f.next() == (None, set())


def test_prefix_filter_clone_is_independent():
    f = ExLlamaV2PrefixFilter(None, TOK, "banana")
    f.begin("")
    g = f.clone()
    f.feed(12)
    assert g.current_str == "" and f.current_str == "b"
    assert isinstance(g, ExLlamaV2PrefixFilter)


def test_background_next_and_get_next():
    f = ExLlamaV2SelectFilter(None, TOK, ["apple"])
    f.begin("")
    with ThreadPoolExecutor(1) as pool:
        f.background_next(pool)
        with pytest.raises(RuntimeError, match="pending"):
            f.background_next(pool)
        assert f.get_next() == f.next()
        assert f.background_result is None
        f.background_next(pool)
        f.background_drop()
        assert f.background_result is None


def test_base_filter_hooks_exist_with_upstream_defaults():
    base = ExLlamaV2Filter(None, TOK)
    assert base.allow_return_type_list is True
    assert base.use_background_worker() is False and base.can_mask_logits() is False
    for name in ("begin", "feed", "next", "prepare_logit_mask", "mask_logits"):
        assert callable(getattr(base, name))
    with pytest.raises(NotImplementedError):
        base.next()
    base.sequence_str = "abc"
    base.reset()
    assert base.sequence_str == ""
