"""Token sampling: `ExLlamaV2Sampler.Settings` (every knob clients set) and a vectorised `sample`.

Order of operations for each row, as upstream:
  CFG mix -> repetition / frequency / presence penalties -> blocked tokens -> token bias -> DRY
  -> filter, token-healing and vocabulary masks -> softmax at temperature (or quadratic smoothing)
  -> top-k -> top-p -> top-a -> min-p -> tail-free -> typical -> mirostat
  -> temperature-last or dynamic temperature -> XTC -> skew -> pick.

The pick is an inverse CDF over the surviving tokens sorted by descending probability, at the
caller's uniform number `random` in [0, 1). The same logits, settings and
`random` therefore always give the same token, and `random = 0` gives the most probable one.
Everything runs in PyTorch on the logits' device; nothing loops over the vocabulary in Python.

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
from collections import deque
from copy import copy
from dataclasses import dataclass, field
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
        mirostat_mu: list[float] | None = None  # per row, set by `sample`

        token_bias: torch.Tensor | None = None  # (vocab padded to 32,), added to the logits
        cfg_scale: float | None = None

        post_sampling_hooks: list[ExLlamaV2PostSamplingHook] = field(default_factory=list)

        dry_allowed_length: int = 2
        dry_base: float = 1.75
        dry_multiplier: float = 0.0             # 0 disables DRY
        dry_sequence_breakers: set[int] | None = None  # None: tokens containing DRY_BREAKER_CHARS
        dry_range: int = 0                      # 0: the whole context
        dry_max_ngram: int = 20

        # Upstream's incremental DRY state. DRY here is recomputed from the context on every
        # step, so these only keep the attributes that clients may read or reset.
        ngram_trie: Any = None
        ngram_index: int = 0
        ngram_history: deque = field(default_factory=deque)

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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """Sample one token per row.

        logits: (bsz, 1, vocab). sequence_ids: (bsz, seq_len) context for the penalties.
        random: uniform in [0, 1); one float (further rows derive their own) or one per row.
        prefix_token: (bsz, 1) for token healing: only tokens whose text starts with this one's.
        Returns (tokens (bsz, 1), top tokens (bsz, 1, k), their probs, probs of the sampled
        tokens (bsz, 1), end_filter); the top-token outputs are meta tensors when k is 0.
        """
        filters = filters or []
        if logits.dim() != 3 or logits.shape[1] != 1:
            raise ValueError(f"logits must have shape (bsz, 1, vocab), got {tuple(logits.shape)}")
        bsz = logits.shape[0]
        if prefix_token is not None and tuple(prefix_token.shape) != (bsz, 1):
            raise ValueError(f"prefix_token must have shape ({bsz}, 1), got {tuple(prefix_token.shape)}")
        if settings.cfg_scale is not None and bsz != 2:
            raise ValueError(f"CFG needs logits for 2 rows (positive, negative prompt), got {bsz}")
        if settings.cfg_scale is None and bsz > 1 and filters:
            raise ValueError("filters work on one sequence at a time; sample batch rows separately")
        if sync and logits.is_cuda:
            torch.cuda.synchronize(logits.device)

        device = logits.device
        x = logits.to(torch.float32, copy=True).view(bsz, -1)
        vocab = x.shape[-1]
        seq = sequence_ids.to(device)
        if seq.dim() == 1:
            seq = seq.unsqueeze(0)

        if settings.cfg_scale is not None:
            lp = F.log_softmax(x, dim=-1)
            x = (settings.cfg_scale * lp[0] + (1 - settings.cfg_scale) * lp[1]).unsqueeze(0)
            seq = seq[:1]
            bsz = 1

        if (
            settings.token_repetition_penalty != 1.0
            or settings.token_frequency_penalty != 0.0
            or settings.token_presence_penalty != 0.0
        ):
            _apply_repetition_penalties(x, seq, settings)
        blocked = [t for t in blocked_tokens or () if 0 <= t < vocab]
        if blocked:
            x[:, blocked] = float("-inf")
        if settings.token_bias is not None:
            n = min(vocab, settings.token_bias.shape[-1])
            x[:, :n] += settings.token_bias[:n].to(device, torch.float32)
        if settings.dry_multiplier > 0.0:
            _apply_dry(x, seq, settings, tokenizer)

        allowed = None
        end_tokens = None
        if filters:
            if all(f.can_mask_logits() for f in filters):
                for f in filters:
                    if not f.get_next(mask=True):
                        raise RuntimeError(f"{type(f).__name__}.prepare_logit_mask() did not prepare a mask")
                    x = f.mask_logits(x.view(-1)).view(1, -1).to(torch.float32)
            else:
                pass_tokens, end_tokens = _filter_tokens(filters)
                if pass_tokens is not None:
                    if len(pass_tokens) == 1 and return_top_tokens == 0 and prefix_token is None:
                        only = next(iter(pass_tokens))
                        return (
                            torch.tensor([[only]], dtype=torch.long),
                            none_tensor,
                            none_tensor,
                            torch.ones((1, 1), dtype=torch.float),
                            only in end_tokens,
                        )
                    if filter_prefer_eos and tokenizer.eos_token_id in pass_tokens:
                        pass_tokens = {tokenizer.eos_token_id}
                    allowed = torch.zeros((1, vocab), dtype=torch.bool, device=device)
                    allowed[0, [t for t in pass_tokens if t < vocab]] = True

        if prefix_token is not None:
            heal = torch.zeros((bsz, vocab), dtype=torch.bool, device=device)
            index = piece_index(tokenizer)
            for row in range(bsz):
                start = piece_of(tokenizer, int(prefix_token[row, 0]))
                heal[row, [t for t in index.starting_with(start) if t < vocab]] = True
            allowed = heal if allowed is None else allowed & heal

        if tokenizer is not None and tokenizer.get_vocab_size() < vocab:
            x[:, tokenizer.get_vocab_size():] = float("-inf")

        xtc_keep = None
        if settings.xtc_probability > 0.0:
            xtc_keep = _xtc_removable(tokenizer, vocab, settings.xtc_ignore_tokens).to(device)

        if settings.mirostat and (settings.mirostat_mu is None or len(settings.mirostat_mu) != bsz):
            settings.mirostat_mu = [0.0] * bsz

        tokens, probs, top_tokens, top_probs, mu = _pick(
            x, allowed, settings, _row_randoms(random, bsz, device), return_top_tokens, xtc_keep
        )
        if settings.mirostat:
            settings.mirostat_mu = mu

        end_filter = end_tokens is not None and int(tokens[0, 0]) in end_tokens
        return tokens, top_tokens, top_probs, probs, end_filter


# penalties ---------------------------------------------------------------------------------


def _apply_repetition_penalties(x: torch.Tensor, seq: torch.Tensor, s: ExLlamaV2Sampler.Settings) -> None:
    """In place on x (bsz, vocab). Over the last `range` tokens (all with -1) each distinct token
    gets the multiplicative penalty once (logit / p when positive, * p otherwise) and the presence
    penalty once, at its most recent occurrence, and the frequency penalty once per occurrence.
    Over the `decay` tokens before that range, all three fade linearly towards no penalty."""
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


def _apply_dry(x: torch.Tensor, seq: torch.Tensor, s: ExLlamaV2Sampler.Settings, tokenizer: Any) -> None:
    """DRY ("don't repeat yourself"), in place on x (bsz, vocab). For every earlier position k,
    the match length is how many tokens before k equal the tokens at the end of the context,
    stopping at sequence breakers and at `dry_max_ngram`. A token that followed a match of length
    n >= `dry_allowed_length` gets `multiplier * base ** (n - allowed_length)` subtracted (the
    longest match counts). Breaker tokens are never penalised."""
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


# truncation and the pick -------------------------------------------------------------------

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


def _renorm(p: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    p = torch.where(keep, p, 0.0)
    return p / p.sum(-1, keepdim=True)


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


def _pick(
    logits: torch.Tensor,
    allowed: torch.Tensor | None,
    s: ExLlamaV2Sampler.Settings,
    randoms: torch.Tensor,
    return_top_tokens: int,
    xtc_removable: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[float] | None]:
    """Truncate and pick, working on candidates sorted by descending logit (ties by ascending id
    when the whole vocabulary is sorted; with top-k, as torch.topk orders them)."""
    bsz, vocab = logits.shape
    temperature, top_k = s.temperature, s.top_k
    if temperature < 0.01:                                      # as upstream: near zero means greedy
        temperature, top_k = 1.0, 1
    first_temp = 1.0 if s.temperature_last else temperature

    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    top = logits.max(dim=-1, keepdim=True).values
    if not torch.isfinite(top).all():
        raise ValueError("every token is masked out (bias, filters, blocked tokens); nothing to sample")
    shifted = logits - top
    if s.smoothing_factor > 0:                                  # quadratic sampling
        shifted = -(shifted * shifted) * (s.smoothing_factor / first_temp)
    else:
        shifted = shifted / first_temp
    if 0 < top_k < vocab:
        # Only the top-k candidates (and any extra top tokens asked for, at probability 0) matter
        # from here on, so skip sorting the whole vocabulary.
        width = min(vocab, max(top_k, return_top_tokens))
        if width == 1:
            order = shifted.argmax(dim=-1, keepdim=True)          # first maximum, as argmax
            shifted = shifted.gather(-1, order)
        else:
            shifted, order = torch.topk(shifted, width, dim=-1, sorted=True)
    else:
        shifted, order = torch.sort(shifted, dim=-1, descending=True, stable=True)
    p = torch.softmax(shifted, dim=-1)
    keep = p > 0
    width = p.shape[-1]
    rank = torch.arange(width, device=logits.device).expand(bsz, -1)

    if 0 < top_k < width:
        keep &= rank < top_k
        p = _renorm(p, keep)
    if 0.0 < s.top_p < 1.0:
        keep &= ~reaches(p.cumsum(-1) - p, s.top_p)
        p = _renorm(p, keep)
    if s.top_a > 0.0:
        pmax = p[:, :1]
        keep &= reaches(p, s.top_a * pmax * pmax) | _first_kept(keep)
        p = _renorm(p, keep)
    if 0.0 < s.min_p < 1.0:
        keep &= reaches(p, s.min_p * p[:, :1]) | _first_kept(keep)
        p = _renorm(p, keep)
    if 0.0 < s.tfs < 1.0 and width >= 3:
        keep = _tail_free(p, keep, s.tfs, rank)
        p = _renorm(p, keep)
    if 0.0 < s.typical < 1.0:
        keep = _typical(p, keep, s.typical)
        p = _renorm(p, keep)

    mu = None
    if s.mirostat:
        mu_t = torch.tensor(s.mirostat_mu, dtype=torch.float32, device=logits.device)
        mu_t = torch.where(mu_t == 0.0, 2.0 * s.mirostat_tau, mu_t)
        keep &= reaches(p, torch.pow(2.0, -mu_t).unsqueeze(-1)) | _first_kept(keep)
        p = _renorm(p, keep)

    dynamic = s.max_temp > s.min_temp
    if dynamic or (s.temperature_last and temperature != 1.0):
        p = _post_temperature(p, keep, temperature, s, dynamic)

    if xtc_removable is not None:
        p = _xtc(p, keep, xtc_removable[order], s.xtc_probability, s.xtc_threshold)

    r = randoms
    if s.skew != 0.0:
        r = r ** math.exp(-s.skew)
    p = torch.where(keep, p, 0.0)
    cum = p.cumsum(-1)
    idx = (cum <= r.unsqueeze(-1) * cum[:, -1:]).sum(-1, keepdim=True)
    last_kept = torch.where(keep, rank, 0).max(-1, keepdim=True).values
    idx = torch.minimum(idx, last_kept)
    total = cum[:, -1:]
    tokens = order.gather(-1, idx)
    probs = p.gather(-1, idx) / total

    if s.mirostat:
        mu = (mu_t + s.mirostat_eta * (s.mirostat_tau + torch.log2(probs.view(-1)))).tolist()

    if return_top_tokens:
        k = min(return_top_tokens, width)
        top_p, top_pos = torch.sort(p, dim=-1, descending=True, stable=True)
        top_tokens = order.gather(-1, top_pos[:, :k]).unsqueeze(1)
        top_probs = (top_p[:, :k] / total).unsqueeze(1)
    else:
        top_tokens = top_probs = none_tensor
    return tokens, probs, top_tokens, top_probs, mu


def _tail_free(p: torch.Tensor, keep: torch.Tensor, tfs: float, rank: torch.Tensor) -> torch.Tensor:
    """Keep the head of the sorted candidates up to where the normalised |second difference| of
    their probabilities first accumulates past `tfs`, plus one. Rows with fewer than three
    candidates, or a flat distribution, are left alone. Expects `keep` to be a sorted prefix."""
    n = keep.sum(-1, keepdim=True)
    d = (p[:, :-2] - 2.0 * p[:, 1:-1] + p[:, 2:]).abs()
    valid = rank[:, :-2] < n - 2
    d = torch.where(valid, d, 0.0)
    dsum = d.sum(-1, keepdim=True)
    cum = (d / dsum.clamp(min=1e-30)).cumsum(-1)
    head = (within(cum, tfs) & valid).sum(-1, keepdim=True) + 1
    limit = torch.where((n >= 3) & (dsum > 0), head, n)
    return keep & (rank < limit)


def _typical(p: torch.Tensor, keep: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling: order candidates by |-log p - entropy| and keep the smallest
    such head whose probability reaches `mass`."""
    logp = torch.where(keep, torch.log(p.clamp(min=1e-30)), 0.0)
    entropy = -(p * logp).sum(-1, keepdim=True)
    dev = torch.where(keep, (-logp - entropy).abs(), float("inf"))
    _, by_dev = torch.sort(dev, dim=-1, stable=True)
    p_dev = p.gather(-1, by_dev)
    chosen = ~reaches(p_dev.cumsum(-1) - p_dev, mass) & keep.gather(-1, by_dev)
    return torch.zeros_like(keep).scatter(-1, by_dev, chosen)


def _post_temperature(
    p: torch.Tensor, keep: torch.Tensor, temperature: float, s: ExLlamaV2Sampler.Settings, dynamic: bool
) -> torch.Tensor:
    """Temperature applied to the truncated distribution. Dynamic temperature maps the
    normalised entropy h of the candidates to min_temp + (max_temp - min_temp) * h ** exponent."""
    n = keep.sum(-1, keepdim=True)
    logp = torch.where(keep, torch.log(p.clamp(min=1e-30)), float("-inf"))
    if dynamic:
        entropy = -(torch.where(keep, p * logp, 0.0)).sum(-1, keepdim=True)
        max_entropy = torch.where(n > 1, torch.log(n.float()), 1.0)
        t = s.min_temp + (s.max_temp - s.min_temp) * (entropy / max_entropy).clamp(min=0) ** s.temp_exponent
    else:
        t = torch.full_like(n, temperature, dtype=p.dtype)
    scaled = torch.softmax(logp / t.clamp(min=1e-6), dim=-1)
    return torch.where(n > 1, scaled, p)


def _xtc(p: torch.Tensor, keep: torch.Tensor, removable: torch.Tensor, probability: float, threshold: float) -> torch.Tensor:
    """Exclude Top Choices, as its expectation: with `probability`, every removable candidate at or
    above `threshold` except the least likely of them is removed. Needs two such candidates."""
    above = keep & removable & reaches(p, threshold)
    count = above.sum(-1, keepdim=True)
    least = above & (above.long().cumsum(-1) == count)         # last in descending order
    removed = above & ~least & (count >= 2)
    mass = torch.where(removed, p, 0.0).sum(-1, keepdim=True)
    rest_scale = 1.0 + probability * mass / (1.0 - mass).clamp(min=1e-30)
    return torch.where(removed, p * (1.0 - probability), torch.where(keep, p * rest_scale, 0.0))
