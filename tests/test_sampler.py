"""ExLlamaV2Sampler: each truncation rule against a direct implementation of its definition, the
inverse-CDF pick, sampling frequencies, and the penalties.

Every expected distribution here is computed from scratch with plain Python loops over a
hand-made distribution; the sampler's final distribution is read back through
`return_top_tokens = vocab` (temperature 1, so it is exactly the truncated distribution).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from exllamav2.generator.filters import ExLlamaV2PrefixFilter, ExLlamaV2SelectFilter
from exllamav2.generator.sampler import ExLlamaV2Sampler

Settings = ExLlamaV2Sampler.Settings

# A hand-made distribution over 8 tokens, deliberately not in id order.
PROBS = {3: 0.30, 6: 0.22, 0: 0.16, 5: 0.12, 1: 0.09, 7: 0.06, 2: 0.03, 4: 0.02}
V = len(PROBS)


class FakeTokenizer:
    """Just enough tokenizer for the sampler: pieces, vocab size, EOS, special tokens."""

    def __init__(self, pieces: list[str], eos: int = 0, special: dict[int, str] | None = None):
        self.pieces = pieces
        self.eos_token_id = eos
        self.extended_id_to_piece = special or {}

    def get_id_to_piece_list(self, include_special_tokens: bool = False) -> list[str]:
        return list(self.pieces)

    def get_vocab_size(self) -> int:
        return len(self.pieces)

    def single_id(self, s: str) -> int:
        return self.pieces.index(s)


TOK = FakeTokenizer([f"t{i}" for i in range(V)])


def plain(**kw) -> Settings:
    """No truncation, no penalties, temperature 1: the identity sampler, plus `kw`."""
    base = dict(temperature=1.0, token_repetition_penalty=1.0, top_k=0, top_p=0.0)
    base.update(kw)
    return Settings(**base)


def logits_of(probs: dict[int, float], rows: int = 1) -> torch.Tensor:
    x = torch.full((V,), -math.inf)
    for t, p in probs.items():
        x[t] = math.log(p)
    return x.view(1, 1, V).repeat(rows, 1, 1)


def final_distribution(settings: Settings, logits: torch.Tensor, seq=None, tok=TOK) -> dict[int, float]:
    seq = torch.zeros((logits.shape[0], 0), dtype=torch.long) if seq is None else seq
    _, top_t, top_p, _, _ = ExLlamaV2Sampler.sample(
        logits, settings, seq, 0.5, tok, return_top_tokens=logits.shape[-1]
    )
    return {int(t): float(p) for t, p in zip(top_t[0, 0], top_p[0, 0]) if p > 0}


def normalized(d: dict[int, float]) -> dict[int, float]:
    s = sum(d.values())
    return {t: p / s for t, p in d.items()}


def assert_dist(got: dict[int, float], want: dict[int, float], tol: float = 1e-5):
    assert set(got) == set(want), f"kept {sorted(got)} expected {sorted(want)}"
    for t in want:
        assert got[t] == pytest.approx(want[t], abs=tol), t


def by_prob(d: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))


# truncation rules ---------------------------------------------------------------------------


def test_identity_settings_keep_the_distribution():
    assert_dist(final_distribution(plain(), logits_of(PROBS)), PROBS)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_top_k(k):
    want = normalized(dict(by_prob(PROBS)[:k]))
    assert_dist(final_distribution(plain(top_k=k), logits_of(PROBS)), want)


@pytest.mark.parametrize("top_p", [0.25, 0.5, 0.52, 0.7, 0.9])
def test_top_p_is_the_smallest_head_reaching_p(top_p):
    head, mass = {}, 0.0
    for t, p in by_prob(PROBS):
        if mass >= top_p:
            break
        head[t] = p
        mass += p
    assert_dist(final_distribution(plain(top_p=top_p), logits_of(PROBS)), normalized(head))


@pytest.mark.parametrize("min_p", [0.12, 0.3, 0.5, 0.75])
def test_min_p(min_p):
    pmax = max(PROBS.values())
    want = normalized({t: p for t, p in PROBS.items() if p >= min_p * pmax})
    assert_dist(final_distribution(plain(min_p=min_p), logits_of(PROBS)), want)


@pytest.mark.parametrize("top_a", [0.2, 0.5, 1.0])
def test_top_a(top_a):
    pmax = max(PROBS.values())
    want = normalized({t: p for t, p in PROBS.items() if p >= top_a * pmax * pmax})
    assert_dist(final_distribution(plain(top_a=top_a), logits_of(PROBS)), want)


# Ties at a threshold: in exact arithmetic each case below puts one token exactly at the cut
# (top-a 1.0: 0.09 = 0.30²; min-p 0.4: 0.12 = 0.4·0.30; top-p 0.52: 0.30 + 0.22 before token 0).
# float32 rounding may land either side, and which side differs between CPUs, so the tied token's
# logit is nudged by a few float32 ulps both ways: the outcome must not move.
TIES = [
    (dict(top_a=1.0), 1, True),     # a probability at the top-a threshold is kept
    (dict(min_p=0.4), 5, True),     # a probability at the min-p threshold is kept
    (dict(top_p=0.52), 0, False),   # a token whose preceding mass reaches top-p is cut
]


@pytest.mark.parametrize("nudge", [-4, -1, 0, 1, 4])
@pytest.mark.parametrize("setting,tied,kept", TIES)
def test_ties_at_a_threshold_fall_the_same_way(setting, tied, kept, nudge):
    logits = logits_of(PROBS)
    x = logits[0, 0, tied]
    step = torch.nextafter(x, torch.tensor(math.inf if nudge > 0 else -math.inf)) - x
    logits[0, 0, tied] = x + abs(nudge) * step
    got = final_distribution(plain(**setting), logits)
    assert (tied in got) == kept, f"{setting}: token {tied} at its threshold, nudged {nudge} ulp"


def test_tie_tolerance_is_narrow():
    # A value clearly below its threshold (1e-4 relative, ten times the tolerance) is still below it.
    from exllamav2.generator.sampler import TIE_RTOL, reaches, within

    t = torch.tensor([0.09 * (1 - 10 * TIE_RTOL), 0.09 * (1 - TIE_RTOL / 10), 0.09])
    assert reaches(t, 0.09).tolist() == [False, True, True]
    assert within(torch.tensor([0.5 * (1 + 10 * TIE_RTOL), 0.5 * (1 + TIE_RTOL / 10)]), 0.5).tolist() == [False, True]
    pmax = max(PROBS.values())
    below = {t: p for t, p in PROBS.items() if p >= (1 + 1e-3) * pmax * pmax}
    assert_dist(final_distribution(plain(top_a=1.0 + 1e-3), logits_of(PROBS)), normalized(below))


@pytest.mark.parametrize("mass", [0.2, 0.5, 0.8, 0.95])
def test_typical(mass):
    entropy = -sum(p * math.log(p) for p in PROBS.values())
    order = sorted(PROBS, key=lambda t: (abs(-math.log(PROBS[t]) - entropy), t))
    kept, acc = {}, 0.0
    for t in order:
        if acc >= mass:
            break
        kept[t] = PROBS[t]
        acc += PROBS[t]
    assert_dist(final_distribution(plain(typical=mass), logits_of(PROBS)), normalized(kept))


@pytest.mark.parametrize("z", [0.3, 0.6, 0.9, 0.99])
def test_tail_free(z):
    ranked = by_prob(PROBS)
    p = [q for _, q in ranked]
    d = [abs(p[i] - 2 * p[i + 1] + p[i + 2]) for i in range(len(p) - 2)]
    total = sum(d)
    count, acc = 0, 0.0
    for di in d:
        acc += di / total
        if acc > z:
            break
        count += 1
    want = normalized(dict(ranked[: count + 1]))
    assert_dist(final_distribution(plain(tfs=z), logits_of(PROBS)), want)


def test_temperature_scales_log_probs():
    t = 0.6
    want = normalized({k: math.exp(math.log(p) / t) for k, p in PROBS.items()})
    assert_dist(final_distribution(plain(temperature=t), logits_of(PROBS)), want)


def test_temperature_last_truncates_before_scaling():
    # top-k first on the untempered distribution, then the temperature on the survivors
    t, k = 2.5, 3
    head = dict(by_prob(PROBS)[:k])
    want = normalized({tok: p ** (1 / t) for tok, p in head.items()})
    got = final_distribution(plain(temperature=t, top_k=k, temperature_last=True), logits_of(PROBS))
    assert_dist(got, want)
    # without temperature_last the min-p cut sees the tempered distribution instead
    hot = normalized({tok: p ** (1 / t) for tok, p in PROBS.items()})
    cut = 0.5 * max(hot.values())
    want_first = normalized({tok: p for tok, p in hot.items() if p >= cut})
    assert_dist(final_distribution(plain(temperature=t, min_p=0.5), logits_of(PROBS)), want_first)


def test_dynamic_temperature_from_entropy():
    lo, hi, e = 0.5, 1.5, 1.3
    entropy = -sum(p * math.log(p) for p in PROBS.values())
    temp = lo + (hi - lo) * (entropy / math.log(V)) ** e
    want = normalized({k: p ** (1 / temp) for k, p in PROBS.items()})
    got = final_distribution(plain(min_temp=lo, max_temp=hi, temp_exponent=e), logits_of(PROBS))
    assert_dist(got, want)


def test_smoothing_factor_is_quadratic_in_logit_distance():
    sf = 0.7
    logits = logits_of(PROBS)
    top = max(math.log(p) for p in PROBS.values())
    want = normalized({k: math.exp(-sf * (math.log(p) - top) ** 2) for k, p in PROBS.items()})
    assert_dist(final_distribution(plain(smoothing_factor=sf), logits), want)


def test_xtc_with_certainty_removes_all_top_choices_but_the_least():
    thr = 0.1
    above = [t for t, p in by_prob(PROBS) if p >= thr]           # 3, 6, 0, 5
    removed = set(above[:-1])
    want = normalized({t: p for t, p in PROBS.items() if t not in removed})
    got = final_distribution(plain(xtc_probability=1.0, xtc_threshold=thr, xtc_ignore_tokens=frozenset()), logits_of(PROBS))
    assert_dist(got, want)


def test_xtc_partial_probability_is_the_mixture_and_respects_ignored_tokens():
    q, thr = 0.4, 0.1
    ignore = frozenset({6})
    above = [t for t, p in by_prob(PROBS) if p >= thr and t not in ignore]   # 3, 0, 5
    removed = set(above[:-1])
    without = normalized({t: p for t, p in PROBS.items() if t not in removed})
    want = {t: (1 - q) * PROBS[t] + q * without.get(t, 0.0) for t in PROBS}
    got = final_distribution(plain(xtc_probability=q, xtc_threshold=thr, xtc_ignore_tokens=ignore), logits_of(PROBS))
    assert_dist(got, want)


def test_mirostat_cuts_at_surprise_mu_and_updates_mu():
    tau, eta = 1.5, 0.1
    s = plain(mirostat=True, mirostat_tau=tau, mirostat_eta=eta)
    target = 2 ** (-2 * tau)                                     # mu starts at 2 tau
    want = normalized({t: p for t, p in PROBS.items() if p >= target})
    got = final_distribution(s, logits_of(PROBS))
    assert_dist(got, want)
    # mu moves by eta * (tau - surprise of the sampled token)
    s = plain(mirostat=True, mirostat_tau=tau, mirostat_eta=eta)
    tok, _, _, prob, _ = ExLlamaV2Sampler.sample(logits_of(PROBS), s, torch.zeros((1, 0), dtype=torch.long), 0.0, TOK)
    assert int(tok) == 3
    assert s.mirostat_mu[0] == pytest.approx(2 * tau + eta * (tau + math.log2(want[3])), abs=1e-5)


# the pick -----------------------------------------------------------------------------------


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(16, 1, 1000)
    for r in (0.0, 0.3, 0.999):
        tok, _, _, prob, _ = ExLlamaV2Sampler.sample(
            logits.clone(), Settings.greedy(), torch.zeros((16, 0), dtype=torch.long), r, None
        )
        assert torch.equal(tok.view(-1), logits.view(16, -1).argmax(-1))
        assert torch.allclose(prob, torch.ones_like(prob))
    # near-zero temperature also means greedy, whatever the other settings
    tok, *_ = ExLlamaV2Sampler.sample(logits.clone(), Settings(temperature=0.0), torch.zeros((16, 0), dtype=torch.long), 0.9, None)
    assert torch.equal(tok.view(-1), logits.view(16, -1).argmax(-1))


def test_inverse_cdf_pick_in_descending_probability_order():
    ranked = by_prob(PROBS)
    cum = 0.0
    for t, p in ranked:
        for r in (cum + 1e-4, cum + p - 1e-4):
            tok, _, _, prob, _ = ExLlamaV2Sampler.sample(logits_of(PROBS), plain(), torch.zeros((1, 0), dtype=torch.long), r, TOK)
            assert int(tok) == t, (r, t)
            assert float(prob) == pytest.approx(p, abs=1e-5)
        cum += p


def test_skew_bends_the_random_point():
    skew = 1.2
    r = 0.6
    bent = r ** math.exp(-skew)
    cum, want = 0.0, None
    for t, p in by_prob(PROBS):
        cum += p
        if cum > bent:
            want = t
            break
    tok, *_ = ExLlamaV2Sampler.sample(logits_of(PROBS), plain(skew=skew), torch.zeros((1, 0), dtype=torch.long), r, TOK)
    assert int(tok) == want


def test_sampling_frequencies_match_the_distribution():
    """Chi-square goodness of fit over 4000 seeded draws (one batch row each)."""
    n = 4000
    rng = random.Random(1234)
    randoms = [rng.random() for _ in range(n)]
    for settings, expected in (
        (plain(), PROBS),
        (plain(temperature=0.7, top_k=5), normalized({t: p ** (1 / 0.7) for t, p in by_prob(PROBS)[:5]})),
    ):
        tok, *_ = ExLlamaV2Sampler.sample(
            logits_of(PROBS, rows=n), settings, torch.zeros((n, 0), dtype=torch.long), randoms, TOK
        )
        counts = torch.bincount(tok.view(-1), minlength=V).tolist()
        assert sum(counts[t] for t in range(V) if t not in expected) == 0
        chi2 = sum((counts[t] - n * p) ** 2 / (n * p) for t, p in expected.items())
        # 99.9th percentile of chi-square with 7 degrees of freedom is 24.3
        assert chi2 < 24.3, (counts, chi2)


def test_same_random_same_token_and_rows_get_their_own_randoms():
    torch.manual_seed(1)
    logits = torch.randn(4, 1, 50)
    seq = torch.zeros((4, 0), dtype=torch.long)
    a = ExLlamaV2Sampler.sample(logits.clone(), plain(), seq, [0.1, 0.5, 0.9, 0.3], TOK)[0]
    b = ExLlamaV2Sampler.sample(logits.clone(), plain(), seq, [0.1, 0.5, 0.9, 0.3], TOK)[0]
    assert torch.equal(a, b)
    for row, r in enumerate([0.1, 0.5, 0.9, 0.3]):
        single = ExLlamaV2Sampler.sample(logits[row : row + 1].clone(), plain(), seq[:1], r, TOK)[0]
        assert int(single) == int(a[row])


# penalties ----------------------------------------------------------------------------------


def reference_penalties(logits: list[float], seq: list[int], rep: float, rng: int, decay: int, freq: float, pres: float):
    """Walk back from the newest token; the first (newest) sighting of a token applies the
    multiplicative and presence penalties, every sighting the frequency penalty; from `rng`
    tokens back the penalties shrink by 1/decay of their strength per token."""
    out = list(logits)
    sustain = len(seq) if rng == -1 else rng
    seen = set()
    for back, t in enumerate(reversed(seq)):
        if back >= sustain + decay:
            break
        w = 1.0 if back < sustain else 1.0 - (back - sustain) / decay
        r = rep + (1.0 - rep) * (1.0 - w)
        if t not in seen:
            seen.add(t)
            out[t] = out[t] / r if out[t] > 0 else out[t] * r
            out[t] -= pres * w
        out[t] -= freq * w
    return out


@pytest.mark.parametrize(
    "rep,rng,decay,freq,pres",
    [(1.3, -1, 0, 0.0, 0.0), (1.3, 4, 0, 0.0, 0.0), (1.5, 3, 4, 0.0, 0.0), (1.0, -1, 0, 0.2, 0.5), (1.2, 5, 3, 0.1, 0.3)],
)
def test_repetition_frequency_presence_penalties(rep, rng, decay, freq, pres):
    torch.manual_seed(2)
    vocab = 12
    base = (torch.randn(vocab) * 2).tolist()
    seq = [3, 5, 3, 7, 1, 5, 9, 3, 11, 2, 5]
    want = reference_penalties(base, seq, rep, rng, decay, freq, pres)
    s = plain(token_repetition_penalty=rep, token_repetition_range=rng, token_repetition_decay=decay,
              token_frequency_penalty=freq, token_presence_penalty=pres)
    tok = FakeTokenizer([f"t{i}" for i in range(vocab)])
    got = final_distribution(s, torch.tensor(base).view(1, 1, -1), torch.tensor([seq]), tok)
    want_p = torch.softmax(torch.tensor(want), -1)
    assert_dist(got, {t: float(want_p[t]) for t in range(vocab)}, tol=1e-6)


def reference_dry(seq: list[int], vocab: int, mult: float, base: float, allowed: int, breakers: set[int], max_ngram: int):
    """For each token that followed an earlier occurrence of the context's last token, extend the
    match backwards while tokens agree and are not breakers; penalise by the longest match."""
    pen = [0.0] * vocab
    longest: dict[int, int] = {}
    last = seq[-1]
    if last in breakers:
        return pen
    for i in range(len(seq) - 1):
        if seq[i] != last or seq[i + 1] in breakers:
            continue
        n = 1
        while n < max_ngram and i - n >= 0:
            prev = seq[-(n + 1)]
            if seq[i - n] != prev or prev in breakers:
                break
            n += 1
        longest[seq[i + 1]] = max(n, longest.get(seq[i + 1], 0))
    for t, n in longest.items():
        if n >= allowed:
            pen[t] = mult * base ** (n - allowed)
    return pen


@pytest.mark.parametrize(
    "seq,breakers",
    [
        ([1, 2, 3, 4, 5, 1, 2, 3], set()),                  # "4" repeats a 3-gram
        ([1, 2, 3, 4, 5, 1, 2, 3], {1}),                    # a breaker inside the match cuts it short
        ([7, 7, 7, 7, 7, 7], set()),                         # self-overlapping repeats
        ([1, 2, 6, 1, 2, 8, 3, 1, 2], {8}),                  # breaker as the following token is spared
        ([4, 5, 6, 9, 4, 5, 6, 10, 4, 5, 6], set()),         # two continuations of the same 3-gram
    ],
)
def test_dry_penalty(seq, breakers):
    vocab, mult, base, allowed = 12, 0.8, 1.75, 2
    torch.manual_seed(3)
    logits = torch.randn(vocab)
    pen = reference_dry(seq, vocab, mult, base, allowed, breakers, 20)
    assert any(pen), "the case should exercise a penalty"
    s = plain(dry_multiplier=mult, dry_base=base, dry_allowed_length=allowed, dry_sequence_breakers=breakers)
    tok = FakeTokenizer([f"t{i}" for i in range(vocab)])
    got = final_distribution(s, logits.view(1, 1, -1), torch.tensor([seq]), tok)
    want_p = torch.softmax(logits - torch.tensor(pen), -1)
    assert_dist(got, {t: float(want_p[t]) for t in range(vocab)}, tol=1e-6)


def test_dry_default_breakers_come_from_token_text():
    pieces = ["a", "b", ".", "c", "<s>"]
    tok = FakeTokenizer(pieces, special={4: "<s>"})
    seq = [0, 1, 2, 0, 1, 3, 0, 1]   # "a b" was followed by "." (a breaker: spared) and by "c"
    s = plain(dry_multiplier=1.0)
    got = final_distribution(s, torch.zeros(1, 1, 5), torch.tensor([seq]), tok)
    want_p = torch.softmax(torch.tensor([0.0, 0.0, 0.0, -1.0, 0.0]), -1)
    assert_dist(got, {t: float(want_p[t]) for t in range(5)})


# biases, masks, CFG, filters ----------------------------------------------------------------


def test_token_bias_disallow_and_allow():
    tok = FakeTokenizer([f"t{i}" for i in range(V)])
    tok.config = type("C", (), {"vocab_size": V})()
    s = plain()
    s.disallow_tokens(tok, [3, 6])
    assert s.token_bias.shape[0] == 32                           # padded like the model's head
    assert_dist(final_distribution(s, logits_of(PROBS), tok=tok), normalized({t: p for t, p in PROBS.items() if t not in (3, 6)}))
    s = plain()
    s.allow_tokens(tok, [5, "t1"])
    assert_dist(final_distribution(s, logits_of(PROBS), tok=tok), normalized({5: PROBS[5], 1: PROBS[1]}))
    with pytest.raises(ValueError, match="allow_tokens"):
        plain().allow_tokens(tok, [1.5])


def test_blocked_tokens_and_padded_vocabulary():
    logits = torch.cat((logits_of(PROBS), torch.full((1, 1, 4), 50.0)), dim=-1)   # head wider than vocab
    _, t, p, _, _ = ExLlamaV2Sampler.sample(logits, plain(), torch.zeros((1, 0), dtype=torch.long), 0.5, TOK,
                                            return_top_tokens=V + 4, blocked_tokens=[3])
    got = {int(a): float(b) for a, b in zip(t[0, 0], p[0, 0]) if b > 0}
    assert_dist(got, normalized({k: v for k, v in PROBS.items() if k != 3}))


def test_cfg_mixes_log_probs_of_two_rows():
    torch.manual_seed(4)
    logits = torch.randn(2, 1, V)
    scale = 1.8
    lp = torch.log_softmax(logits.view(2, -1), -1)
    want = torch.softmax(scale * lp[0] + (1 - scale) * lp[1], -1)
    got = final_distribution(plain(cfg_scale=scale), logits, torch.zeros((2, 0), dtype=torch.long))
    assert_dist(got, {t: float(want[t]) for t in range(V)})
    with pytest.raises(ValueError, match="CFG"):
        ExLlamaV2Sampler.sample(logits[:1], plain(cfg_scale=scale), torch.zeros((1, 0), dtype=torch.long), 0.5, TOK)


def test_token_healing_restricts_to_tokens_extending_the_prefix():
    tok = FakeTokenizer(["a", " th", " the", " then", " x", "the"])
    logits = torch.zeros(1, 1, 6)
    _, t, p, _, _ = ExLlamaV2Sampler.sample(logits, plain(), torch.zeros((1, 0), dtype=torch.long), 0.5, tok,
                                            prefix_token=torch.tensor([[1]]), return_top_tokens=6)
    got = {int(a) for a, b in zip(t[0, 0], p[0, 0]) if b > 0}
    assert got == {1, 2, 3}


def test_select_filter_in_sampler_and_end_detection():
    pieces = ["<eos>", "y", "ye", "yes", "n", "no", "s", "o", "x"]
    tok = FakeTokenizer(pieces, eos=0)
    f = ExLlamaV2SelectFilter(None, tok, ["yes", "no"])
    f.begin("")
    logits = torch.zeros(1, 1, len(pieces))
    logits[0, 0, 8] = 10.0                                       # the model prefers "x", which is not allowed
    seq = torch.zeros((1, 0), dtype=torch.long)
    _, t, p, _, end = ExLlamaV2Sampler.sample(logits, plain(), seq, 0.5, tok, filters=[f], return_top_tokens=9)
    allowed = {int(a) for a, b in zip(t[0, 0], p[0, 0]) if b > 0}
    assert allowed == {1, 2, 3, 4, 5}
    tok_id, *_, end = ExLlamaV2Sampler.sample(logits, plain(), seq, 0.999, tok, filters=[f])
    assert int(tok_id) in {1, 2, 3, 4, 5}
    assert end == (pieces[int(tok_id)] in ("yes", "no"))
    # after "ye" only "s" is left: the single-token shortcut returns it with probability 1 and ends
    f.begin("")
    f.feed(2)
    tok_id, _, _, prob, end = ExLlamaV2Sampler.sample(logits, plain(), seq, 0.5, tok, filters=[f])
    assert int(tok_id) == 6 and float(prob) == 1.0 and end


def test_filter_prefer_eos_and_exhausted_filter():
    tok = FakeTokenizer(["<eos>", "a", "b"], eos=0)

    class Fixed(ExLlamaV2PrefixFilter):
        def __init__(self, allowed):
            super().__init__(None, tok, "")
            self.allowed = allowed

        def next(self):
            return set(self.allowed), set()

    logits = torch.tensor([[[0.0, 5.0, 5.0]]])
    seq = torch.zeros((1, 0), dtype=torch.long)
    tok_id, *_ = ExLlamaV2Sampler.sample(logits, plain(), seq, 0.5, tok, filters=[Fixed({0, 1, 2})], filter_prefer_eos=True)
    assert int(tok_id) == 0
    with pytest.raises(RuntimeError, match="allow no token"):
        ExLlamaV2Sampler.sample(logits, plain(), seq, 0.5, tok, filters=[Fixed({1}), Fixed({2})])


def test_mask_logits_filters_take_the_mask_path():
    tok = FakeTokenizer(["a", "b", "c", "d"])

    class Masker(ExLlamaV2SelectFilter):
        prepared = 0

        def can_mask_logits(self):
            return True

        def prepare_logit_mask(self):
            Masker.prepared += 1
            return True

        def mask_logits(self, logits):
            out = torch.full_like(logits, -math.inf)
            out[2] = logits[2]
            return out

    logits = torch.tensor([[[3.0, 2.0, 1.0, 0.0]]])
    tok_id, *_ = ExLlamaV2Sampler.sample(logits, plain(), torch.zeros((1, 0), dtype=torch.long), 0.5, tok,
                                         filters=[Masker(None, tok, ["c"])])
    assert int(tok_id) == 2 and Masker.prepared == 1


# settings -----------------------------------------------------------------------------------


def test_settings_defaults_and_helpers():
    s = Settings()
    assert (s.temperature, s.top_k, s.top_p, s.token_repetition_penalty, s.token_repetition_range) == (0.8, 50, 0.8, 1.025, -1)
    assert (s.dry_allowed_length, s.dry_base, s.dry_max_ngram, s.xtc_threshold, s.mirostat_tau) == (2, 1.75, 20, 0.1, 1.5)
    assert s.cfg_scale is None and s.token_bias is None and s.post_sampling_hooks == []
    g = Settings.greedy(top_p=0.5)
    assert (g.temperature, g.top_k, g.top_p, g.token_repetition_penalty) == (1.0, 1, 0.5, 1.0)
    c = s.clone()
    c.post_sampling_hooks.append(print)
    assert s.post_sampling_hooks == []
    s.token_presence_penalty, s.dry_multiplier, s.xtc_probability = 0.3, 0.5, 0.2
    gc = s.greedy_clone()
    assert gc.top_k == 1 and gc.token_presence_penalty == 0.3 and gc.dry_multiplier == 0.5 and gc.xtc_probability == 0.2


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="bsz, 1, vocab"):
        ExLlamaV2Sampler.sample(torch.zeros(1, 2, 4), plain(), torch.zeros((1, 0), dtype=torch.long), 0.5, None)
    with pytest.raises(ValueError, match="masked"):
        ExLlamaV2Sampler.sample(torch.full((1, 1, 4), -math.inf), plain(), torch.zeros((1, 0), dtype=torch.long), 0.5, None)


# each step alone --------------------------------------------------------------------------------
# Every step of the pipeline (exllamav2.generator.sampler) on its own input, against a direct
# implementation of its definition on PROBS or on plain lists.

from exllamav2.generator import sampler as steps  # noqa: E402


def candidates(probs: dict[int, float] = PROBS) -> "steps.Candidates":
    ranked = by_prob(probs)
    p = torch.tensor([[q for _, q in ranked]])
    order = torch.tensor([[t for t, _ in ranked]])
    return steps.Candidates(p, p > 0, order, torch.arange(len(ranked)).expand(1, -1))


def kept(c: "steps.Candidates") -> dict[int, float]:
    return {int(t): float(q) for t, q, k in zip(c.order[0], c.p[0], c.keep[0]) if k}


def ref_top_p(probs, top_p):
    head, mass = {}, 0.0
    for t, p in by_prob(probs):
        if mass >= top_p:
            break
        head[t] = p
        mass += p
    return normalized(head)


def ref_tail_free(probs, z):
    ranked = by_prob(probs)
    p = [q for _, q in ranked]
    d = [abs(p[i] - 2 * p[i + 1] + p[i + 2]) for i in range(len(p) - 2)]
    count, acc = 0, 0.0
    for di in d:
        acc += di / sum(d)
        if acc > z:
            break
        count += 1
    return normalized(dict(ranked[: count + 1]))


def ref_typical(probs, mass):
    entropy = -sum(p * math.log(p) for p in probs.values())
    kept_, acc = {}, 0.0
    for t in sorted(probs, key=lambda t: (abs(-math.log(probs[t]) - entropy), t)):
        if acc >= mass:
            break
        kept_[t] = probs[t]
        acc += probs[t]
    return normalized(kept_)


PMAX = max(PROBS.values())
REFERENCES = {
    steps.top_k_step: lambda k: normalized(dict(by_prob(PROBS)[:k])),
    steps.top_p_step: lambda top_p: ref_top_p(PROBS, top_p),
    steps.top_a_step: lambda a: normalized({t: p for t, p in PROBS.items() if p >= a * PMAX * PMAX}),
    steps.min_p_step: lambda m: normalized({t: p for t, p in PROBS.items() if p >= m * PMAX}),
    steps.tail_free_step: lambda z: ref_tail_free(PROBS, z),
    steps.typical_step: lambda mass: ref_typical(PROBS, mass),
}
# values just either side of a cut, so a step that is off by a little keeps or drops a token too many
TRUNCATION_STEPS = [
    (steps.top_k_step, 1), (steps.top_k_step, 3),
    (steps.top_p_step, 0.25), (steps.top_p_step, 0.6), (steps.top_p_step, 0.9),
    (steps.top_a_step, 0.5), (steps.top_a_step, 0.9),
    (steps.min_p_step, 0.31), (steps.min_p_step, 0.5),
    (steps.tail_free_step, 0.3), (steps.tail_free_step, 0.7), (steps.tail_free_step, 0.9),
    (steps.typical_step, 0.3), (steps.typical_step, 0.5), (steps.typical_step, 0.8),
]


@pytest.mark.parametrize("step,value", TRUNCATION_STEPS, ids=[f"{s.__name__}-{v}" for s, v in TRUNCATION_STEPS])
def test_each_truncation_step_alone(step, value):
    c = candidates()
    before = (c.p.clone(), c.keep.clone())
    out = step(c, value)
    assert_dist(kept(out), REFERENCES[step](value))
    assert len(kept(out)) < V, "the case should cut something"
    assert torch.equal(c.p, before[0]) and torch.equal(c.keep, before[1]), "a step leaves its input as it was"


@pytest.mark.parametrize("step,off", [
    (steps.top_k_step, 0), (steps.top_k_step, V), (steps.top_p_step, 0.0), (steps.top_p_step, 1.0),
    (steps.top_a_step, 0.0), (steps.min_p_step, 0.0), (steps.tail_free_step, 1.0), (steps.typical_step, 0.0),
])
def test_truncation_steps_are_off_at_their_neutral_setting(step, off):
    c = candidates()
    assert step(c, off) is c


def test_truncation_steps_respect_earlier_cuts():
    # min-p after top-k 2 sees the renormalised head: pmax is 0.30 / 0.52, and 0.22 / 0.52 >= 0.7 * that
    c = steps.min_p_step(steps.top_k_step(candidates(), 2), 0.7)
    assert_dist(kept(c), normalized({3: PROBS[3], 6: PROBS[6]}))


def test_mirostat_steps_alone():
    mu = steps.mirostat_target([0.0, 3.5], tau=1.5, device=torch.device("cpu"))
    assert mu.tolist() == [3.0, 3.5]                                  # a fresh row starts at 2 tau
    two = steps.Candidates(*(torch.cat([t, t]) for t in (candidates().p, candidates().keep, candidates().order, candidates().rank)))
    out = steps.mirostat_step(two, mu)
    for row, m in enumerate([3.0, 3.5]):
        want = normalized({t: p for t, p in PROBS.items() if -math.log2(p) <= m})
        got = {int(t): float(q) for t, q, k in zip(out.order[row], out.p[row], out.keep[row]) if k}
        assert_dist(got, want)
    new = steps.mirostat_update(mu, torch.tensor([[0.25], [0.5]]), tau=1.5, eta=0.1)
    assert new == pytest.approx([3.0 + 0.1 * (1.5 - 2.0), 3.5 + 0.1 * (1.5 - 1.0)])


def test_late_temperature_step_alone():
    head = steps.top_k_step(candidates(), 3)
    t = 1.7
    want = normalized({tok: p ** (1 / t) for tok, p in by_prob(PROBS)[:3]})
    assert_dist(kept(steps.late_temperature_step(head, t, 0.0, 0.0, 1.0)), want)
    lo, hi, e = 0.4, 2.0, 0.8
    h = normalized(dict(by_prob(PROBS)[:3]))
    entropy = -sum(p * math.log(p) for p in h.values())
    dyn = lo + (hi - lo) * (entropy / math.log(3)) ** e
    assert_dist(kept(steps.late_temperature_step(head, 1.0, lo, hi, e)), normalized({k: p ** (1 / dyn) for k, p in h.items()}))
    assert steps.late_temperature_step(head, 1.0, 0.0, 0.0, 1.0) is head


def test_xtc_step_alone():
    removable = torch.tensor([[t != 0 for t, _ in by_prob(PROBS)]])     # token 0 is never removed
    above = [t for t, p in by_prob(PROBS) if p >= 0.1 and t != 0]       # 3, 6, 5: all but 5 go
    want = normalized({t: p for t, p in PROBS.items() if t not in above[:-1]})
    out = steps.xtc_step(candidates(), removable, 1.0, 0.1)
    assert_dist({t: p for t, p in kept(out).items() if p > 0}, want)
    c = candidates()
    assert steps.xtc_step(c, removable, 0.0, 0.1) is c


def test_skew_randoms_alone():
    r = torch.tensor([0.2, 0.6, 0.9])
    assert torch.allclose(steps.skew_randoms(r, 0.7), torch.tensor([x ** math.exp(-0.7) for x in (0.2, 0.6, 0.9)]))
    assert steps.skew_randoms(r, 0.0) is r


def test_pick_alone_is_the_inverse_cdf_over_kept_candidates():
    c = steps.top_k_step(candidates(), 4)
    head = normalized(dict(by_prob(PROBS)[:4]))
    cum = 0.0
    for t, p in head.items():
        for r in (cum + 1e-4, cum + p - 1e-4):
            tok, prob = steps.pick(c, torch.tensor([r]))
            assert int(tok) == t and float(prob) == pytest.approx(p, abs=1e-5)
        cum += p
    tok, _ = steps.pick(c, torch.tensor([0.99999994]))
    assert int(tok) in head, "a random point at the end never falls past the last kept candidate"
    top_t, top_p = steps.top_candidates(c, 6)
    assert top_t[0, 0].tolist()[:4] == list(head) and top_p[0, 0].tolist()[4:] == [0.0, 0.0]


def test_temper_and_rank_candidates_alone():
    x = torch.log(torch.tensor([[PROBS[t] for t in range(V)]]))
    c = steps.rank_candidates(steps.temper(x, 0.5, 0.0), 0, 0)
    assert c.order[0].tolist() == [t for t, _ in by_prob(PROBS)]
    assert_dist(kept(c), normalized({t: p ** 2 for t, p in PROBS.items()}))
    top = math.log(PMAX)
    smooth = steps.rank_candidates(steps.temper(x, 2.0, 0.6), 0, 0)
    assert_dist(kept(smooth), normalized({t: math.exp(-(math.log(p) - top) ** 2 * 0.6 / 2.0) for t, p in PROBS.items()}))
    assert steps.rank_candidates(steps.temper(x, 1.0, 0.0), 3, 5).width == 5   # top-k sorts only what is asked for
    with pytest.raises(ValueError, match="masked out"):
        steps.temper(torch.full((1, 4), -math.inf), 1.0, 0.0)


def test_logit_steps_alone():
    torch.manual_seed(5)
    base = torch.randn(2, 12)
    lp = torch.log_softmax(base, -1)
    mixed, seq = steps.cfg_mix(base.clone(), torch.tensor([[1, 2], [3, 4]]), 1.5)
    assert torch.allclose(mixed, 1.5 * lp[0:1] - 0.5 * lp[1:2]) and seq.tolist() == [[1, 2]]
    x = base[:1].clone()
    steps.block_tokens(x, [2, 5, 99])
    assert [i for i in range(12) if x[0, i] == -math.inf] == [2, 5]
    x = base[:1].clone()
    steps.apply_token_bias(x, torch.arange(32, dtype=torch.float))
    assert torch.allclose(x, base[:1] + torch.arange(12))
    x = torch.zeros(1, 40)
    steps.mask_padding(x, FakeTokenizer([f"t{i}" for i in range(33)]))
    assert (x[0, :33] == 0).all() and (x[0, 33:] == -math.inf).all()


def test_penalty_and_dry_steps_alone():
    torch.manual_seed(6)
    base = (torch.randn(12) * 2).tolist()
    seq = [3, 5, 3, 7, 1, 5, 9, 3, 11, 2, 5]
    x = torch.tensor([base])
    steps.apply_repetition_penalties(x, torch.tensor([seq]), plain(token_repetition_penalty=1.2, token_repetition_range=5,
                                     token_repetition_decay=3, token_frequency_penalty=0.1, token_presence_penalty=0.3))
    assert x[0].tolist() == pytest.approx(reference_penalties(base, seq, 1.2, 5, 3, 0.1, 0.3), abs=1e-5)
    dry_seq = [4, 5, 6, 9, 4, 5, 6, 10, 4, 5, 6]
    x = torch.tensor([base])
    steps.apply_dry(x, torch.tensor([dry_seq]), plain(dry_multiplier=0.8, dry_sequence_breakers=set()), None)
    pen = reference_dry(dry_seq, 12, 0.8, 1.75, 2, set(), 20)
    assert x[0].tolist() == pytest.approx([b - q for b, q in zip(base, pen)], abs=1e-5)
    untouched = torch.tensor([base])
    steps.apply_dry(untouched, torch.tensor([dry_seq]), plain(), None)        # multiplier 0: off
    steps.apply_repetition_penalties(untouched, torch.tensor([seq]), plain())  # neutral: off
    assert untouched[0].tolist() == base


def test_mask_steps_alone():
    pieces = ["<eos>", "y", "ye", "yes", "n", "no", "s", "o", "x"]
    tok = FakeTokenizer(pieces, eos=0)
    f = ExLlamaV2SelectFilter(None, tok, ["yes", "no"])
    f.begin("")
    _, limits = steps.filter_constraints(torch.zeros(1, 9), [f], tok, False)
    assert [i for i in range(9) if limits.allowed[0, i]] == [1, 2, 3, 4, 5] and limits.only is None
    assert limits.end_tokens == {3, 5}
    f.begin("")
    f.feed(2)
    _, limits = steps.filter_constraints(torch.zeros(1, 9), [f], tok, False)
    assert limits.only == 6
    heal_tok = FakeTokenizer(["a", " th", " the", " then", " x", "the"])
    mask = steps.healing_mask(heal_tok, torch.tensor([[1], [4]]), 2, 6, torch.device("cpu"))
    assert [[i for i in range(6) if mask[r, i]] for r in range(2)] == [[1, 2, 3], [4]]
    assert steps.healing_mask(heal_tok, None, 1, 6, torch.device("cpu")) is None


def test_sample_with_state_passes_mirostat_mu_and_leaves_settings_alone():
    s = plain(mirostat=True, mirostat_tau=1.5, mirostat_eta=0.1)
    seq = torch.zeros((1, 0), dtype=torch.long)
    (tok, _, _, prob, _), mu = steps.sample_with_state(logits_of(PROBS), s, seq, 0.0, TOK, None)
    assert s.mirostat_mu is None
    assert mu == pytest.approx([3.0 + 0.1 * (1.5 + math.log2(float(prob)))], abs=1e-5)
    # the returned mu is the next call's: a lower target cuts more
    low = [2.5]
    (tok, t, p, prob, _), mu2 = steps.sample_with_state(logits_of(PROBS), s, seq, 0.9, TOK, low, return_top_tokens=V)
    assert {int(a) for a, b in zip(t[0, 0], p[0, 0]) if b > 0} == {3, 6}   # p >= 2^-2.5 = 0.177
    assert int(tok) == 6 and mu2 == pytest.approx([2.5 + 0.1 * (1.5 + math.log2(0.22 / 0.52))], abs=1e-5)
    assert low == [2.5] and s.mirostat_mu is None
    (_, _, _, _, _), same = steps.sample_with_state(logits_of(PROBS), plain(), seq, 0.5, TOK, [2.0])
    assert same == [2.0], "without mirostat the state passes through"


@pytest.fixture(scope="module")
def tiny_generators(tiny):
    from exllamav2 import ExLlamaV2, ExLlamaV2Config
    from exllamav2.tokenizer import ExLlamaV2Tokenizer

    config = ExLlamaV2Config(str(tiny[0]))
    config.max_seq_len = 512
    model = ExLlamaV2(config)
    model.load()
    return model, ExLlamaV2Tokenizer(config)


def test_generators_keep_mirostat_state_off_the_callers_settings(tiny_generators):
    from exllamav2.generator import (ExLlamaV2BaseGenerator, ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob,
                                     ExLlamaV2StreamingGenerator)
    from exllamav2 import ExLlamaV2Cache

    model, tokenizer = tiny_generators
    s = Settings(mirostat=True, mirostat_tau=2.0, mirostat_eta=0.3, top_k=0, top_p=0.0)
    ids = tokenizer.encode("The function returns")
    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=512), tokenizer, paged=False)
    job = ExLlamaV2DynamicJob(ids, max_new_tokens=3, gen_settings=s, seed=1)
    gen.enqueue(job)
    while gen.num_remaining_jobs():
        gen.iterate()
    assert s.mirostat_mu is None
    assert len(job.mirostat_mu) == 1 and job.mirostat_mu[0] != 0.0 and job.mirostat_mu[0] != 2 * 2.0

    stream = ExLlamaV2StreamingGenerator(model, ExLlamaV2Cache(model, max_seq_len=512), tokenizer)
    s.mirostat_mu = [5.0]                           # a mu the caller seeds is where the stream starts
    stream.begin_stream_ex(ids, s)
    assert stream.mirostat_mu == [5.0]
    stream.stream_ex()
    assert s.mirostat_mu == [5.0] and stream.mirostat_mu != [5.0]

    s.mirostat_mu = None
    ExLlamaV2BaseGenerator(model, ExLlamaV2Cache(model, max_seq_len=512), tokenizer).generate_simple("The", s, 3, seed=1)
    assert s.mirostat_mu is None
