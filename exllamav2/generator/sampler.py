"""Token sampling: `ExLlamaV2Sampler.Settings` (every knob clients set) and `sample`, a pipeline of
small steps, one per setting, each a function of its inputs that can be tested alone.

The steps for each row, in upstream's order:
  CFG mix -> repetition / frequency / presence penalties -> blocked tokens -> token bias -> DRY
  -> filter, token-healing and vocabulary masks -> softmax at temperature (or quadratic smoothing)
  -> top-k -> top-p -> top-a -> min-p -> tail-free -> typical -> mirostat
  -> temperature-last or dynamic temperature -> XTC -> skew -> pick.

The steps before the softmax work in place on float32 logits (bsz, vocab). From the softmax on, a
`Candidates` holds each row's tokens sorted by descending probability, which of them are kept and
their probabilities renormalised over those; each truncation step takes one and returns the next,
unchanged when its setting is off.

The pick is an inverse CDF over the surviving tokens sorted by descending probability, at the
caller's uniform number `random` in [0, 1). The same logits, settings and
`random` therefore always give the same token, and `random = 0` gives the most probable one.
Everything runs in PyTorch on the logits' device; nothing loops over the vocabulary in Python.

Mirostat's running target `mu` is state, not a setting: `sample_with_state` takes it and returns the
new value without touching the settings, and the generators keep it on the job or the stream.
`ExLlamaV2Sampler.sample` keeps upstream's contract for direct callers: it starts from
`settings.mirostat_mu` and writes the new value back there.

Ties at a threshold: every cut (top-p, top-a, min-p, tail-free, typical, mirostat, XTC) compares a
float32 value computed through softmax and cumulative sums against a threshold that may be the same
number in exact arithmetic (top-a 1.0 on p = 0.3 cuts at 0.09, the probability of another token).
Which side float32 rounding lands on differs between CPUs (AVX2 vs AVX-512 reductions), so a value
within `TIE_RTOL` (relative) of its threshold counts as equal to it, and equality always means
"reaches": a probability at the threshold is kept, a mass before a token at top-p (or typical) cuts
it, and a tail-free mass at its limit is not past it.
"""

from __future__ import annotations

import math
import re
from copy import copy
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F

from ..ext import none_tensor  # upstream's meta tensor for an output that was not asked for
from .filters.base import ExLlamaV2Filter
from .filters.pieces import piece_index, piece_of
from .hooks import ExLlamaV2PostSamplingHook

if TYPE_CHECKING:
    from ..tokenizer import ExLlamaV2Tokenizer

# Characters whose tokens break DRY sequences, and those XTC never removes (upstream's defaults).
DRY_BREAKER_CHARS = ".,!?<>[](){}\n\t\""
XTC_KEEP_CHARS = "\n"

# (tokens (bsz, 1), top tokens (bsz, 1, k), their probs, probs of the sampled tokens (bsz, 1), end_filter)
SampleResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]


def _bias_length(tokenizer: Any) -> int:
    """Vocabulary size padded to a multiple of 32, the width of the model's head layer."""
    config = getattr(tokenizer, "config", None)
    vocab = config.vocab_size if config is not None else tokenizer.get_vocab_size()
    return vocab + (-vocab % 32)


class ExLlamaV2Sampler:

    @dataclass
    class Settings:
        token_repetition_penalty: float = 1.025
        token_repetition_range: int = -1        # -1: the whole context
        token_repetition_decay: int = 0         # tokens over which penalties fade out beyond the range

        token_frequency_penalty: float = 0.0
        token_presence_penalty: float = 0.0

        temperature: float = 0.8
        smoothing_factor: float = 0.0
        min_temp: float = 0
        max_temp: float = 0.0
        temp_exponent: float = 1.0
        top_k: int = 50
        top_p: float = 0.8
        top_a: float = 0.0
        min_p: float = 0
        tfs: float = 0
        typical: float = 0
        skew: float = 0

        temperature_last: bool = False

        mirostat: bool = False
        mirostat_tau: float = 1.5
        mirostat_eta: float = 0.1
        mirostat_mu: list[float] | None = None  # per row; `ExLlamaV2Sampler.sample` reads and updates it

        token_bias: torch.Tensor | None = None  # (vocab padded to 32,), added to the logits
        cfg_scale: float | None = None

        post_sampling_hooks: list[ExLlamaV2PostSamplingHook] = field(default_factory=list)

        dry_allowed_length: int = 2
        dry_base: float = 1.75
        dry_multiplier: float = 0.0             # 0 disables DRY
        dry_sequence_breakers: set[int] | None = None  # None: tokens containing DRY_BREAKER_CHARS
        dry_range: int = 0                      # 0: the whole context
        dry_max_ngram: int = 20

        xtc_probability: float = 0.0            # 0 disables XTC
        xtc_threshold: float = 0.1
        xtc_ignore_tokens: frozenset[int] | None = None  # None: tokens containing XTC_KEEP_CHARS

        @staticmethod
        def greedy(**kwargs) -> "ExLlamaV2Sampler.Settings":
            values = {"temperature": 1.0, "token_repetition_penalty": 1.0, "top_p": 0.0, "top_k": 1}
            values.update(kwargs)
            return ExLlamaV2Sampler.Settings(**values)

        def clone(self) -> "ExLlamaV2Sampler.Settings":
            c = copy(self)
            c.post_sampling_hooks = list(self.post_sampling_hooks)
            c.mirostat_mu = None if self.mirostat_mu is None else list(self.mirostat_mu)
            return c

        def greedy_clone(self) -> "ExLlamaV2Sampler.Settings":
            """Greedy settings that keep this one's penalties, DRY and XTC (used for drafting)."""
            return ExLlamaV2Sampler.Settings(
                top_k=1,
                top_p=0,
                token_repetition_penalty=self.token_repetition_penalty,
                token_repetition_range=self.token_repetition_range,
                token_repetition_decay=self.token_repetition_decay,
                token_frequency_penalty=self.token_frequency_penalty,
                token_presence_penalty=self.token_presence_penalty,
                dry_allowed_length=self.dry_allowed_length,
                dry_base=self.dry_base,
                dry_multiplier=self.dry_multiplier,
                dry_sequence_breakers=self.dry_sequence_breakers,
                dry_range=self.dry_range,
                dry_max_ngram=self.dry_max_ngram,
                xtc_probability=self.xtc_probability,
                xtc_threshold=self.xtc_threshold,
                xtc_ignore_tokens=self.xtc_ignore_tokens,
            )

        def disallow_tokens(self, tokenizer: "ExLlamaV2Tokenizer", tokens: Sequence[int]) -> None:
            """Bias the listed token ids to -inf."""
            if self.token_bias is None:
                self.token_bias = torch.zeros((_bias_length(tokenizer),), dtype=torch.float)
            self.token_bias[list(tokens)] = float("-inf")

        def allow_tokens(self, tokenizer: "ExLlamaV2Tokenizer", tokens: Sequence[int | str]) -> None:
            """Bias every token except the listed ids (or single-token strings) to -inf."""
            if self.token_bias is None:
                self.token_bias = torch.full((_bias_length(tokenizer),), float("-inf"), dtype=torch.float)
            for t in tokens:
                if isinstance(t, str):
                    t = tokenizer.single_id(t)
                elif not isinstance(t, int):
                    raise ValueError(f"allow_tokens takes token ids or strings, got {type(t).__name__}")
                self.token_bias[t] = 0.0

    @staticmethod
    def sample(
        logits: torch.Tensor,
        settings: "ExLlamaV2Sampler.Settings",
        sequence_ids: torch.Tensor,
        random: float | Sequence[float] | torch.Tensor,
        tokenizer: "ExLlamaV2Tokenizer | None",
        prefix_token: torch.Tensor | None = None,
        return_top_tokens: int = 0,
        blocked_tokens: Sequence[int] | None = None,
        filters: list[ExLlamaV2Filter] | None = None,
        filter_prefer_eos: bool = False,
        sync: bool = False,
    ) -> SampleResult:
        """Sample one token per row.

        logits: (bsz, 1, vocab). sequence_ids: (bsz, seq_len) context for the penalties.
        random: uniform in [0, 1); one float (further rows derive their own) or one per row.
        prefix_token: (bsz, 1) for token healing: only tokens whose text starts with this one's.
        Returns (tokens (bsz, 1), top tokens (bsz, 1, k), their probs, probs of the sampled
        tokens (bsz, 1), end_filter); the top-token outputs are meta tensors when k is 0.
        With mirostat, as upstream, mu comes from and goes back to `settings.mirostat_mu`.
        """
        result, mu = sample_with_state(
            logits, settings, sequence_ids, random, tokenizer, settings.mirostat_mu,
            prefix_token=prefix_token, return_top_tokens=return_top_tokens, blocked_tokens=blocked_tokens,
            filters=filters, filter_prefer_eos=filter_prefer_eos, sync=sync,
        )
        if settings.mirostat:
            settings.mirostat_mu = mu       # upstream's direct callers carry mu in their settings
        return result


def sample_with_state(
    logits: torch.Tensor,
    settings: ExLlamaV2Sampler.Settings,
    sequence_ids: torch.Tensor,
    random: float | Sequence[float] | torch.Tensor,
    tokenizer: "ExLlamaV2Tokenizer | None",
    mirostat_mu: list[float] | None,
    prefix_token: torch.Tensor | None = None,
    return_top_tokens: int = 0,
    blocked_tokens: Sequence[int] | None = None,
    filters: list[ExLlamaV2Filter] | None = None,
    filter_prefer_eos: bool = False,
    sync: bool = False,
) -> tuple[SampleResult, list[float] | None]:
    """`ExLlamaV2Sampler.sample` with mirostat's mu (one value per row after CFG) passed in and the
    new one returned, instead of kept in `settings`, which this never writes. A mu that is None or of
    the wrong length starts every row afresh (at 2 * tau). Without mirostat, mu is returned as given."""
    filters = filters or []
    _check_inputs(logits, settings, prefix_token, filters)
    if sync and logits.is_cuda:
        torch.cuda.synchronize(logits.device)
    x = logits.to(torch.float32, copy=True).view(logits.shape[0], -1)
    seq = sequence_ids.to(x.device)
    if seq.dim() == 1:
        seq = seq.unsqueeze(0)

    x, seq = cfg_mix(x, seq, settings.cfg_scale)
    apply_repetition_penalties(x, seq, settings)
    block_tokens(x, blocked_tokens)
    apply_token_bias(x, settings.token_bias)
    apply_dry(x, seq, settings, tokenizer)
    x, limits = filter_constraints(x, filters, tokenizer, filter_prefer_eos)
    if limits.only is not None and return_top_tokens == 0 and prefix_token is None:
        # one token allowed: nothing to sample
        tokens = torch.tensor([[limits.only]], dtype=torch.long)
        return (tokens, none_tensor, none_tensor, torch.ones((1, 1)), limits.only in limits.end_tokens), mirostat_mu
    bsz, vocab = x.shape
    allowed = _both(limits.allowed, healing_mask(tokenizer, prefix_token, bsz, vocab, x.device))
    if allowed is not None:
        x = x.masked_fill(~allowed, float("-inf"))
    mask_padding(x, tokenizer)

    xtc_removable = None
    if settings.xtc_probability > 0.0:
        xtc_removable = _xtc_removable(tokenizer, vocab, settings.xtc_ignore_tokens).to(x.device)
    if settings.mirostat and (mirostat_mu is None or len(mirostat_mu) != bsz):
        mirostat_mu = [0.0] * bsz
    tokens, probs, top_tokens, top_probs, mu = _truncate_and_pick(
        x, settings, _row_randoms(random, bsz, x.device), return_top_tokens, xtc_removable,
        mirostat_mu if settings.mirostat else None,
    )
    end_filter = limits.end_tokens is not None and int(tokens[0, 0]) in limits.end_tokens
    return (tokens, top_tokens, top_probs, probs, end_filter), (mu if settings.mirostat else mirostat_mu)


def _check_inputs(logits: torch.Tensor, settings: ExLlamaV2Sampler.Settings, prefix_token: torch.Tensor | None,
                  filters: list[ExLlamaV2Filter]) -> None:
    """A ValueError naming the shape or combination `sample` cannot take."""
    if logits.dim() != 3 or logits.shape[1] != 1:
        raise ValueError(f"logits must have shape (bsz, 1, vocab), got {tuple(logits.shape)}")
    bsz = logits.shape[0]
    if prefix_token is not None and tuple(prefix_token.shape) != (bsz, 1):
        raise ValueError(f"prefix_token must have shape ({bsz}, 1), got {tuple(prefix_token.shape)}")
    if settings.cfg_scale is not None and bsz != 2:
        raise ValueError(f"CFG needs logits for 2 rows (positive, negative prompt), got {bsz}")
    if settings.cfg_scale is None and bsz > 1 and filters:
        raise ValueError("filters work on one sequence at a time; sample batch rows separately")


# steps on the logits (bsz, vocab) -------------------------------------------------------------


def cfg_mix(x: torch.Tensor, seq: torch.Tensor, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free guidance: one row, scale * log p(positive) + (1 - scale) * log p(negative),
    with the positive row's context. Off (x and seq as given) when `scale` is None."""
    if scale is None:
        return x, seq
    lp = F.log_softmax(x, dim=-1)
    return (scale * lp[0] + (1 - scale) * lp[1]).unsqueeze(0), seq[:1]


def apply_repetition_penalties(x: torch.Tensor, seq: torch.Tensor, s: ExLlamaV2Sampler.Settings) -> None:
    """In place on x (bsz, vocab). Over the last `range` tokens (all with -1) each distinct token
    gets the multiplicative penalty once (logit / p when positive, * p otherwise) and the presence
    penalty once, at its most recent occurrence, and the frequency penalty once per occurrence.
    Over the `decay` tokens before that range, all three fade linearly towards no penalty.
    Off when all three penalties are neutral."""
    if s.token_repetition_penalty == 1.0 and s.token_frequency_penalty == 0.0 and s.token_presence_penalty == 0.0:
        return
    bsz, vocab = x.shape
    length = seq.shape[-1]
    if length == 0:
        return
    sustain = length if s.token_repetition_range == -1 else s.token_repetition_range
    decay = s.token_repetition_decay
    window = min(length, sustain + decay)
    if window <= 0:
        return
    recent = seq[:, length - window:].long()                               # (bsz, window), oldest first
    dist = torch.arange(window - 1, -1, -1, device=x.device)               # tokens back from the end
    if decay:
        weight = 1.0 - (dist - sustain).clamp(min=0).float() / decay        # 1 inside the range
    else:
        weight = torch.ones(window, device=x.device)
    weight = weight.expand(bsz, -1)
    valid = (recent >= 0) & (recent < vocab)
    ids = recent.clamp(0, vocab - 1)

    nearest = torch.full((bsz, vocab), window, dtype=torch.long, device=x.device)
    nearest.scatter_reduce_(1, ids, torch.where(valid, dist.expand(bsz, -1), window), "amin")
    present = nearest < window
    if decay:
        w_recent = 1.0 - (nearest - sustain).clamp(min=0).float() / decay
    else:
        w_recent = torch.ones_like(x)
    w_recent = torch.where(present, w_recent, 0.0)

    rep = 1.0 + (s.token_repetition_penalty - 1.0) * w_recent
    x.copy_(torch.where(x > 0, x / rep, x * rep))
    x -= s.token_presence_penalty * w_recent
    freq = torch.zeros_like(x)
    freq.scatter_add_(1, ids, torch.where(valid, weight, 0.0))
    x -= s.token_frequency_penalty * freq


@lru_cache(maxsize=16)
def _tokens_with_chars(tokenizer: Any, chars: str) -> frozenset[int]:
    """Ids whose text contains any of `chars`, plus every special token."""
    pattern = re.compile("[" + re.escape(chars) + "]")
    pieces = tokenizer.get_id_to_piece_list(include_special_tokens=True)
    found = {i for i, piece in enumerate(pieces) if pattern.search(piece)}
    found.update(getattr(tokenizer, "extended_id_to_piece", {}).keys())
    return frozenset(found)


def apply_dry(x: torch.Tensor, seq: torch.Tensor, s: ExLlamaV2Sampler.Settings, tokenizer: Any) -> None:
    """DRY ("don't repeat yourself"), in place on x (bsz, vocab). For every earlier position k,
    the match length is how many tokens before k equal the tokens at the end of the context,
    stopping at sequence breakers and at `dry_max_ngram`. A token that followed a match of length
    n >= `dry_allowed_length` gets `multiplier * base ** (n - allowed_length)` subtracted (the
    longest match counts). Breaker tokens are never penalised. Off when the multiplier is 0."""
    if s.dry_multiplier <= 0.0:
        return
    vocab = x.shape[-1]
    breakers = s.dry_sequence_breakers
    if breakers is None:
        if tokenizer is None:
            raise ValueError("DRY needs a tokenizer or explicit dry_sequence_breakers")
        breakers = _tokens_with_chars(tokenizer, DRY_BREAKER_CHARS)
    is_breaker = torch.zeros(vocab + 1, dtype=torch.bool, device=x.device)
    if breakers:
        is_breaker[[b for b in breakers if 0 <= b < vocab]] = True
    is_breaker[vocab] = True                                    # ids outside the vocabulary break too

    for row in range(x.shape[0]):
        ctx = seq[row].long()
        if s.dry_range > 0:
            ctx = ctx[-s.dry_range:]
        ctx = torch.where((ctx >= 0) & (ctx < vocab), ctx, vocab)
        length = ctx.shape[0]
        if length < 2:
            continue
        k = torch.arange(1, length, device=x.device)            # candidate positions; ctx[k] follows a match
        match = torch.zeros(length - 1, dtype=torch.long, device=x.device)
        alive = torch.ones(length - 1, dtype=torch.bool, device=x.device)
        for m in range(1, min(s.dry_max_ngram, length - 1) + 1):
            tail = ctx[length - m]
            if is_breaker[tail]:
                break
            back = k - m
            alive &= (back >= 0) & (ctx[back.clamp(min=0)] == tail)
            if not alive.any():
                break
            match += alive.long()
        following = ctx[1:]
        penalise = (match >= s.dry_allowed_length) & ~is_breaker[following]
        if not penalise.any():
            continue
        longest = torch.zeros(vocab + 1, dtype=torch.long, device=x.device)
        longest.scatter_reduce_(0, following[penalise], match[penalise], "amax")
        hit = longest[:vocab] > 0
        excess = (longest[:vocab] - s.dry_allowed_length).float()
        x[row] -= torch.where(hit, s.dry_multiplier * s.dry_base ** excess, 0.0)


def block_tokens(x: torch.Tensor, blocked: Sequence[int] | None) -> None:
    """In place: the blocked token ids (those inside the vocabulary) can never be picked."""
    ids = [t for t in blocked or () if 0 <= t < x.shape[-1]]
    if ids:
        x[:, ids] = float("-inf")


def apply_token_bias(x: torch.Tensor, token_bias: torch.Tensor | None) -> None:
    """In place: add the settings' token bias (padded to 32 like the head; cut to the logits' width)."""
    if token_bias is not None:
        n = min(x.shape[-1], token_bias.shape[-1])
        x[:, :n] += token_bias[:n].to(x.device, torch.float32)


@dataclass
class FilterLimits:
    """What the filters allow for the next token."""

    allowed: torch.Tensor | None = None     # (1, vocab) bool; None: no limit
    end_tokens: set[int] | None = None      # tokens that complete a filter
    only: int | None = None                 # the one token the filters allow, if just one


def filter_constraints(x: torch.Tensor, filters: list[ExLlamaV2Filter], tokenizer: Any,
                       prefer_eos: bool) -> tuple[torch.Tensor, FilterLimits]:
    """Masks step, filters: the logits masked by filters that mask logits themselves, or the tokens
    all filters allow (EOS alone when `prefer_eos` and EOS is among them) and their end tokens."""
    if not filters:
        return x, FilterLimits()
    if all(f.can_mask_logits() for f in filters):
        for f in filters:
            if not f.get_next(mask=True):
                raise RuntimeError(f"{type(f).__name__}.prepare_logit_mask() did not prepare a mask")
            x = f.mask_logits(x.view(-1)).view(1, -1).to(torch.float32)
        return x, FilterLimits()
    pass_tokens, end_tokens = _filter_tokens(filters)
    if pass_tokens is None:
        return x, FilterLimits(end_tokens=end_tokens)
    only = next(iter(pass_tokens)) if len(pass_tokens) == 1 else None
    if prefer_eos and tokenizer.eos_token_id in pass_tokens:
        pass_tokens = {tokenizer.eos_token_id}
    allowed = torch.zeros((1, x.shape[-1]), dtype=torch.bool, device=x.device)
    allowed[0, [t for t in pass_tokens if t < x.shape[-1]]] = True
    return x, FilterLimits(allowed, end_tokens, only)


def _filter_tokens(filters: list[ExLlamaV2Filter]) -> tuple[set[int] | None, set[int] | None]:
    """Intersection of the filters' allowed tokens and union of their end tokens."""
    pass_tokens: set[int] | None = None
    end_tokens: set[int] | None = None
    for f in filters:
        pt, et = f.get_next()
        if pt is None:
            continue
        pt = set(pt)
        pass_tokens = pt if pass_tokens is None else pass_tokens & pt
        end_tokens = set(et or ()) if end_tokens is None else end_tokens | set(et or ())
    if pass_tokens is not None and not pass_tokens:
        raise RuntimeError("the filters together allow no token; check that their constraints can be met")
    return pass_tokens, end_tokens


def healing_mask(tokenizer: Any, prefix_token: torch.Tensor | None, rows: int, vocab: int,
                 device: torch.device) -> torch.Tensor | None:
    """Masks step, token healing: (rows, vocab), True for the tokens whose text starts with the text
    of the row's prefix token; None without a prefix token."""
    if prefix_token is None:
        return None
    heal = torch.zeros((rows, vocab), dtype=torch.bool, device=device)
    index = piece_index(tokenizer)
    for row in range(rows):
        start = piece_of(tokenizer, int(prefix_token[row, 0]))
        heal[row, [t for t in index.starting_with(start) if t < vocab]] = True
    return heal


def _both(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a & b


def mask_padding(x: torch.Tensor, tokenizer: Any) -> None:
    """Masks step, vocabulary: in place, ids past the tokenizer's vocabulary (the head is padded to a
    multiple of 32) can never be picked."""
    if tokenizer is not None and tokenizer.get_vocab_size() < x.shape[-1]:
        x[:, tokenizer.get_vocab_size():] = float("-inf")


@lru_cache(maxsize=16)
def _xtc_removable(tokenizer: Any, vocab: int, ignore: frozenset[int] | None) -> torch.Tensor:
    """BoolTensor (vocab,): tokens XTC may remove."""
    if ignore is None:
        if tokenizer is None:
            raise ValueError("XTC needs a tokenizer or explicit xtc_ignore_tokens")
        ignore = _tokens_with_chars(tokenizer, XTC_KEEP_CHARS)
    mask = torch.ones(vocab, dtype=torch.bool)
    ids = [t for t in ignore if 0 <= t < vocab]
    if ids:
        mask[ids] = False
    return mask


# the pick's randoms and the threshold-tie rule ---------------------------------------------------

# Weyl sequence step (golden ratio) that spreads one random number over the rows of a batch.
_ROW_STEP = (math.sqrt(5.0) - 1.0) / 2.0


def _row_randoms(random: float | Sequence[float] | torch.Tensor, bsz: int, device: torch.device) -> torch.Tensor:
    if isinstance(random, (int, float)):
        values = [(float(random) + i * _ROW_STEP) % 1.0 for i in range(bsz)]
        values[0] = float(random)
    else:
        values = [float(r) for r in (random.tolist() if isinstance(random, torch.Tensor) else random)]
        if len(values) != bsz:
            raise ValueError(f"got {len(values)} random values for {bsz} rows")
    return torch.tensor(values, dtype=torch.float32, device=device)


# Relative distance within which a value counts as equal to its threshold: far above float32 rounding
# of a softmax or cumulative sum (a few 1e-7), far below any difference a user's setting expresses.
TIE_RTOL = 1e-5


def reaches(value: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """value >= threshold, where values within TIE_RTOL of the threshold count as equal to it."""
    return value >= threshold - TIE_RTOL * abs(threshold)


def within(value: torch.Tensor, limit: float) -> torch.Tensor:
    """value <= limit, where values within TIE_RTOL of the limit count as equal to it."""
    return value <= limit + TIE_RTOL * abs(limit)


def _first_kept(keep: torch.Tensor) -> torch.Tensor:
    return keep & (keep.long().cumsum(-1) == 1)


# steps on the candidates ----------------------------------------------------------------------


@dataclass(frozen=True)
class Candidates:
    """Each row's candidate tokens, sorted by descending probability (ties by ascending id when the
    whole vocabulary is sorted; with top-k, as torch.topk orders them). All (bsz, width)."""

    p: torch.Tensor         # probabilities, renormalised over the kept candidates
    keep: torch.Tensor      # bool: still in play
    order: torch.Tensor     # token ids
    rank: torch.Tensor      # 0 .. width - 1

    @property
    def width(self) -> int:
        return self.p.shape[-1]

    def cut(self, keep: torch.Tensor) -> "Candidates":
        """Only `keep` stays; probabilities renormalised over it."""
        p = torch.where(keep, self.p, 0.0)
        return replace(self, keep=keep, p=p / p.sum(-1, keepdim=True))


def temper(logits: torch.Tensor, temperature: float, smoothing_factor: float) -> torch.Tensor:
    """Temperature / smoothing step: logits less each row's maximum, divided by `temperature`, or
    with quadratic smoothing -(distance from the maximum)^2 * smoothing_factor / temperature."""
    top = logits.max(dim=-1, keepdim=True).values
    if not torch.isfinite(top).all():
        raise ValueError("every token is masked out (bias, filters, blocked tokens); nothing to sample")
    shifted = logits - top
    if smoothing_factor > 0:
        return -(shifted * shifted) * (smoothing_factor / temperature)
    return shifted / temperature


def rank_candidates(shifted: torch.Tensor, top_k: int, return_top_tokens: int) -> Candidates:
    """The softmax of tempered logits, sorted. With top-k only the top-k tokens (and any extra top
    tokens asked for, which later steps keep at probability 0) matter, so the whole vocabulary is
    not sorted then."""
    bsz, vocab = shifted.shape
    if 0 < top_k < vocab:
        width = min(vocab, max(top_k, return_top_tokens))
        if width == 1:
            order = shifted.argmax(dim=-1, keepdim=True)          # first maximum, as argmax
            shifted = shifted.gather(-1, order)
        else:
            shifted, order = torch.topk(shifted, width, dim=-1, sorted=True)
    else:
        shifted, order = torch.sort(shifted, dim=-1, descending=True, stable=True)
    p = torch.softmax(shifted, dim=-1)
    rank = torch.arange(p.shape[-1], device=p.device).expand(bsz, -1)
    return Candidates(p, p > 0, order, rank)


def top_k_step(c: Candidates, k: int) -> Candidates:
    """The k most probable candidates. Off for k <= 0 or k >= width."""
    if not 0 < k < c.width:
        return c
    return c.cut(c.keep & (c.rank < k))


def top_p_step(c: Candidates, top_p: float) -> Candidates:
    """The smallest head whose mass reaches top_p: a candidate goes once the mass before it does.
    Off outside (0, 1)."""
    if not 0.0 < top_p < 1.0:
        return c
    return c.cut(c.keep & ~reaches(c.p.cumsum(-1) - c.p, top_p))


def top_a_step(c: Candidates, top_a: float) -> Candidates:
    """Candidates with p >= top_a * pmax^2 (the most probable always stays). Off for top_a <= 0."""
    if top_a <= 0.0:
        return c
    pmax = c.p[:, :1]
    return c.cut(c.keep & (reaches(c.p, top_a * pmax * pmax) | _first_kept(c.keep)))


def min_p_step(c: Candidates, min_p: float) -> Candidates:
    """Candidates with p >= min_p * pmax (the most probable always stays). Off outside (0, 1)."""
    if not 0.0 < min_p < 1.0:
        return c
    return c.cut(c.keep & (reaches(c.p, min_p * c.p[:, :1]) | _first_kept(c.keep)))


def tail_free_step(c: Candidates, tfs: float) -> Candidates:
    """Tail-free sampling: the head up to where the normalised |second difference| of the sorted
    probabilities first accumulates past `tfs`, plus one. Rows with fewer than three candidates, or
    a flat distribution, are left alone. Off outside (0, 1). Expects `keep` to be a sorted prefix."""
    if not (0.0 < tfs < 1.0 and c.width >= 3):
        return c
    p, rank = c.p, c.rank
    n = c.keep.sum(-1, keepdim=True)
    d = (p[:, :-2] - 2.0 * p[:, 1:-1] + p[:, 2:]).abs()
    valid = rank[:, :-2] < n - 2
    d = torch.where(valid, d, 0.0)
    dsum = d.sum(-1, keepdim=True)
    cum = (d / dsum.clamp(min=1e-30)).cumsum(-1)
    head = (within(cum, tfs) & valid).sum(-1, keepdim=True) + 1
    limit = torch.where((n >= 3) & (dsum > 0), head, n)
    return c.cut(c.keep & (rank < limit))


def typical_step(c: Candidates, mass: float) -> Candidates:
    """Locally typical sampling: order candidates by |-log p - entropy| and keep the smallest such
    head whose probability reaches `mass`. Off outside (0, 1)."""
    if not 0.0 < mass < 1.0:
        return c
    logp = torch.where(c.keep, torch.log(c.p.clamp(min=1e-30)), 0.0)
    entropy = -(c.p * logp).sum(-1, keepdim=True)
    dev = torch.where(c.keep, (-logp - entropy).abs(), float("inf"))
    _, by_dev = torch.sort(dev, dim=-1, stable=True)
    p_dev = c.p.gather(-1, by_dev)
    chosen = ~reaches(p_dev.cumsum(-1) - p_dev, mass) & c.keep.gather(-1, by_dev)
    return c.cut(torch.zeros_like(c.keep).scatter(-1, by_dev, chosen))


def mirostat_target(mu: list[float], tau: float, device: torch.device) -> torch.Tensor:
    """Each row's mu as a float32 tensor (bsz,); a row at 0.0 (a fresh start) begins at 2 * tau."""
    mu_t = torch.tensor(mu, dtype=torch.float32, device=device)
    return torch.where(mu_t == 0.0, 2.0 * tau, mu_t)


def mirostat_step(c: Candidates, mu: torch.Tensor) -> Candidates:
    """Mirostat: candidates whose surprise -log2 p is at most the row's mu (bsz,), that is
    p >= 2^-mu (the most probable always stays)."""
    return c.cut(c.keep & (reaches(c.p, torch.pow(2.0, -mu).unsqueeze(-1)) | _first_kept(c.keep)))


def mirostat_update(mu: torch.Tensor, probs: torch.Tensor, tau: float, eta: float) -> list[float]:
    """The next mu per row: mu + eta * (tau - surprise of the picked token, -log2 p)."""
    return (mu + eta * (tau + torch.log2(probs.view(-1)))).tolist()


def late_temperature_step(c: Candidates, temperature: float, min_temp: float, max_temp: float,
                          exponent: float) -> Candidates:
    """Temperature on the truncated distribution: `temperature` (the setting with temperature_last,
    else 1.0), or dynamic temperature when max_temp > min_temp, which maps the normalised entropy h
    of the candidates to min_temp + (max_temp - min_temp) * h ** exponent. Rows with one candidate
    are left alone. Off at temperature 1.0 without dynamic temperature."""
    dynamic = max_temp > min_temp
    if not dynamic and temperature == 1.0:
        return c
    p, keep = c.p, c.keep
    n = keep.sum(-1, keepdim=True)
    logp = torch.where(keep, torch.log(p.clamp(min=1e-30)), float("-inf"))
    if dynamic:
        entropy = -(torch.where(keep, p * logp, 0.0)).sum(-1, keepdim=True)
        max_entropy = torch.where(n > 1, torch.log(n.float()), 1.0)
        t = min_temp + (max_temp - min_temp) * (entropy / max_entropy).clamp(min=0) ** exponent
    else:
        t = torch.full_like(n, temperature, dtype=p.dtype)
    scaled = torch.softmax(logp / t.clamp(min=1e-6), dim=-1)
    return replace(c, p=torch.where(n > 1, scaled, p))


def xtc_step(c: Candidates, removable: torch.Tensor, probability: float, threshold: float) -> Candidates:
    """Exclude Top Choices, as its expectation: with `probability`, every removable candidate
    (`removable` is bool (bsz, width), in the candidates' order) at or above `threshold` except the
    least likely of them is removed. Needs two such candidates. Off for probability <= 0."""
    if probability <= 0.0:
        return c
    p, keep = c.p, c.keep
    above = keep & removable & reaches(p, threshold)
    count = above.sum(-1, keepdim=True)
    least = above & (above.long().cumsum(-1) == count)         # last in descending order
    removed = above & ~least & (count >= 2)
    mass = torch.where(removed, p, 0.0).sum(-1, keepdim=True)
    rest_scale = 1.0 + probability * mass / (1.0 - mass).clamp(min=1e-30)
    return replace(c, p=torch.where(removed, p * (1.0 - probability), torch.where(keep, p * rest_scale, 0.0)))


def skew_randoms(randoms: torch.Tensor, skew: float) -> torch.Tensor:
    """Skew bends each row's random point to r ** exp(-skew): towards less probable candidates for
    skew > 0, towards the most probable for skew < 0. Off at 0."""
    return randoms if skew == 0.0 else randoms ** math.exp(-skew)


def _final(c: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept probabilities (others 0) and their cumulative sums."""
    p = torch.where(c.keep, c.p, 0.0)
    return p, p.cumsum(-1)


def pick(c: Candidates, randoms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse CDF: each row's token at its random point (bsz,) of the kept mass in candidate order
    (never past the last kept candidate), and its probability. Both (bsz, 1)."""
    p, cum = _final(c)
    idx = (cum <= randoms.unsqueeze(-1) * cum[:, -1:]).sum(-1, keepdim=True)
    last_kept = torch.where(c.keep, c.rank, 0).max(-1, keepdim=True).values
    idx = torch.minimum(idx, last_kept)
    return c.order.gather(-1, idx), p.gather(-1, idx) / cum[:, -1:]


def top_candidates(c: Candidates, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most probable final candidates and their probabilities, each (bsz, 1, k); meta tensors
    when k is 0."""
    if not k:
        return none_tensor, none_tensor
    p, cum = _final(c)
    k = min(k, c.width)
    top_p, top_pos = torch.sort(p, dim=-1, descending=True, stable=True)
    return c.order.gather(-1, top_pos[:, :k]).unsqueeze(1), (top_p[:, :k] / cum[:, -1:]).unsqueeze(1)


def _truncate_and_pick(
    logits: torch.Tensor,
    s: ExLlamaV2Sampler.Settings,
    randoms: torch.Tensor,
    return_top_tokens: int,
    xtc_removable: torch.Tensor | None,
    mirostat_mu: list[float] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[float] | None]:
    """The steps from the softmax to the pick, on masked logits (bsz, vocab). Returns (tokens, their
    probs, top tokens, top probs, the new mirostat mu or None without one)."""
    temperature, top_k = s.temperature, s.top_k
    if temperature < 0.01:                                      # as upstream: near zero means greedy
        temperature, top_k = 1.0, 1
    c = rank_candidates(temper(logits, 1.0 if s.temperature_last else temperature, s.smoothing_factor),
                        top_k, return_top_tokens)
    c = top_k_step(c, top_k)
    c = top_p_step(c, s.top_p)
    c = top_a_step(c, s.top_a)
    c = min_p_step(c, s.min_p)
    c = tail_free_step(c, s.tfs)
    c = typical_step(c, s.typical)
    mu = None if mirostat_mu is None else mirostat_target(mirostat_mu, s.mirostat_tau, logits.device)
    if mu is not None:
        c = mirostat_step(c, mu)
    c = late_temperature_step(c, temperature if s.temperature_last else 1.0, s.min_temp, s.max_temp, s.temp_exponent)
    if xtc_removable is not None:
        c = xtc_step(c, xtc_removable[c.order], s.xtc_probability, s.xtc_threshold)
    tokens, probs = pick(c, skew_randoms(randoms, s.skew))
    new_mu = None if mu is None else mirostat_update(mu, probs, s.mirostat_tau, s.mirostat_eta)
    return (tokens, probs, *top_candidates(c, return_top_tokens), new_mu)
