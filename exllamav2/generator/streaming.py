"""ExLlamaV2StreamingGenerator: one sequence (two with CFG), streamed a chunk at a time.

Invariant between calls: the cache holds keys/values for every token of `sequence_ids` but the
last, which the next `stream_ex` feeds. A new `begin_stream_ex` keeps the cached prefix it shares
with the previous sequence. Speculative decoding (a draft model, or n-grams of the context) feeds
several tokens per step and keeps those the model itself would have sampled.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
from typing import TYPE_CHECKING, Any

import torch

from ..model.embedding import EMBEDDING_INDEX
from ..errors import GenerationArgumentError
from ..inputs import check_sampler_settings
from ..model.lora import as_lora_list
from .base import ExLlamaV2BaseGenerator, check_room
from .drafting import NgramCache, check_draft_vocab, check_ngram_settings
from .dynamic_embeddings import remap_embeddings
from ..vlm.mrope import MRopeLayout, mrope_layout
from ..vlm.mrope import forward_args as mrope_args
from .filters.base import ExLlamaV2Filter, as_filters, feed_filters
from .hooks import ExLlamaV2PostSamplingResult, run_post_sampling_hooks
from .sampler import ExLlamaV2Sampler, sample_with_state
from .stop import TextStream, TokenExtras, join_extras, split_stop_conditions

if TYPE_CHECKING:
    from ..cache.base import ExLlamaV2CacheBase
    from ..model.model import ExLlamaV2
    from ..tokenizer import ExLlamaV2Tokenizer

log = logging.getLogger(__name__)

def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Leading columns equal in every row of two (bsz, n) tensors."""
    n = min(a.shape[-1], b.shape[-1])
    if a.shape[0] != b.shape[0] or n == 0:
        return 0
    diff = (a[:, :n] != b[:, :n]).any(0).nonzero()
    return int(diff[0]) if diff.numel() else n


class ExLlamaV2StreamingGenerator(ExLlamaV2BaseGenerator):
    def __init__(
        self,
        model: "ExLlamaV2",
        cache: "ExLlamaV2CacheBase",
        tokenizer: "ExLlamaV2Tokenizer",
        draft_model: "ExLlamaV2 | None" = None,
        draft_cache: "ExLlamaV2CacheBase | None" = None,
        num_speculative_tokens: int = 5,
    ) -> None:
        super().__init__(model, cache, tokenizer)
        if (draft_model is None) != (draft_cache is None):
            raise GenerationArgumentError("speculative decoding needs both draft_model and draft_cache")
        if draft_model is not None:
            check_draft_vocab(draft_model, model, tokenizer)
        self.draft_model = draft_model
        self.draft_cache = draft_cache
        self.num_speculative_tokens = num_speculative_tokens
        # n-gram speculation (no draft model): drafts follow n-grams of the context and of preloaded text
        self.speculative_ngram = False
        self.speculative_ngram_min = 1          # shortest n-gram counted
        self.speculative_ngram_max = 5          # longest n-gram counted
        self.speculative_ngram_max_inf = 3      # longest context suffix looked up when drafting
        self.speculative_ngram_threshold = 1    # times a continuation must have been seen to be drafted
        self.ngram: NgramCache | None = None
        self.ngram_preloaded: NgramCache | None = None
        self._ngram_seen = 0
        self.stop_tokens: set[int] = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.stop_strings: list[str] = []
        self.reset_sd_stats()
        self.settings: ExLlamaV2Sampler.Settings | None = None
        self.mirostat_mu: list[float] | None = None     # the stream's, never written into self.settings
        self.text: TextStream | None = None
        self.input_mask: torch.Tensor | None = None
        self.position_offsets: torch.Tensor | None = None
        self.indexed_embeddings: torch.Tensor | None = None
        self.mrope: MRopeLayout | None = None     # the stream's MRoPE positions (a Qwen2-VL prompt with images)
        self.loras: list | None = None

    # configuration -------------------------------------------------------------------------

    def set_stop_conditions(self, stop_conditions: list[int | str]) -> None:
        """Replace the stop tokens (ids) and stop strings; strings may span several tokens."""
        self.stop_tokens, self.stop_strings = split_stop_conditions(stop_conditions)

    def reset_sd_stats(self) -> None:
        self.total_tokens = 0
        self.total_draft_tokens = 0
        self.accepted_draft_tokens = 0

    def get_sd_stats(self) -> tuple[float, float, int, int, int]:
        """(efficiency, accuracy, total tokens, drafted tokens, accepted drafted tokens)."""
        efficiency = self.accepted_draft_tokens / self.total_tokens if self.total_tokens else 0.0
        accuracy = self.accepted_draft_tokens / self.total_draft_tokens if self.total_draft_tokens else 0.0
        return efficiency, accuracy, self.total_tokens, self.total_draft_tokens, self.accepted_draft_tokens

    def ngram_preload(self, input_ids: torch.Tensor | list[int]) -> None:
        """Count the n-grams of some example text (token ids) for n-gram speculation; call it before
        begin_stream. Repeated calls add to what was preloaded."""
        ids = input_ids.reshape(-1).tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
        check_ngram_settings(self.speculative_ngram_min, self.speculative_ngram_max,
                             self.speculative_ngram_max_inf, self.speculative_ngram_threshold)
        if self.ngram_preloaded is None:
            self.ngram_preloaded = NgramCache(self.speculative_ngram_min, self.speculative_ngram_max)
        self.ngram_preloaded.update(ids)

    # starting a stream ---------------------------------------------------------------------

    def begin_stream(
        self,
        input_ids: torch.Tensor,
        gen_settings: ExLlamaV2Sampler.Settings,
        token_healing: bool = False,
        loras: list | None = None,
        input_mask: torch.Tensor | None = None,
        position_offsets: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        self.begin_stream_ex(input_ids, gen_settings, token_healing, loras, input_mask, position_offsets, **kwargs)

    def begin_stream_ex(
        self,
        input_ids: torch.Tensor,
        gen_settings: ExLlamaV2Sampler.Settings,
        token_healing: bool = False,
        loras: list | None = None,
        input_mask: torch.Tensor | None = None,
        position_offsets: torch.Tensor | None = None,
        return_probabilities: bool = False,
        return_top_tokens: int = 0,
        return_logits: bool = False,
        abort_event: threading.Event | None = None,
        input_embeddings: list | None = None,
        decode_special_tokens: bool = False,
        banned_strings: list[str] | None = None,
        filters: list[ExLlamaV2Filter] | None = None,
        filter_prefer_eos: bool = False,
    ) -> None:
        ids, heal, filters = self._check_stream_input(input_ids, gen_settings, token_healing, banned_strings, filters)
        self.mrope = _mrope_layout(ids, input_embeddings)
        ids, embeddings = remap_embeddings(ids, input_embeddings)
        loras = as_lora_list(loras, self.model)
        reuse = self._reusable_prefix(ids, loras, input_mask, position_offsets, embeddings)
        self.indexed_embeddings = embeddings

        self._use_settings(gen_settings)
        self.loras = loras
        self.input_mask = input_mask
        self.position_offsets = position_offsets
        self.abort_event = abort_event
        self.return_probabilities = return_probabilities
        self.return_top_tokens = return_top_tokens
        self.return_logits = return_logits
        self.decode_special_tokens = decode_special_tokens
        self.filters = filters
        self.filter_prefer_eos = filter_prefer_eos
        self.heal = heal
        self.bans: dict[int, set[int]] = {}
        self.held_extras: list[TokenExtras] = []
        self.text = TextStream(self.tokenizer, self.stop_strings, banned_strings or (), decode_special_tokens,
                               context=ids[0, -8:].tolist(), healed_token=None if heal is None else int(heal[0, 0]))

        self.sequence_ids = None                      # until the cache is consistent again
        self.cache.current_seq_len = reuse
        log.debug("stream of %d tokens: %d reused from the cache", ids.shape[-1], reuse)
        if ids.shape[-1] - 1 > reuse and not self._prefill(ids, reuse):
            return
        if self.draft_cache is not None:
            self.draft_cache.current_seq_len = min(self.draft_cache.current_seq_len, reuse)
        self.sequence_ids = ids
        self.ngram = None
        if self.speculative_ngram and self.draft_model is None:
            self._new_ngram_cache()
        for f in self.filters:
            f.background_drop()
            f.begin("")

    def _prefill(self, ids: torch.Tensor, reuse: int) -> bool:
        """Write the prompt's tokens after the `reuse` cached ones, all but the last; False if aborted."""
        self.model.forward(ids[:, reuse:-1], self.cache, input_mask=self._mask(ids.shape[-1] - 1),
                           preprocess_only=True, loras=self.loras, position_offsets=self.position_offsets,
                           abort_event=self.abort_event, indexed_embeddings=self.indexed_embeddings,
                           **mrope_args(self.mrope, reuse, ids.shape[-1] - 1 - reuse))
        if self.abort_event is not None and self.abort_event.is_set():
            self.cache.current_seq_len = 0
            return False
        return True

    def _use_settings(self, gen_settings: ExLlamaV2Sampler.Settings) -> None:
        """The stream's sampler settings, and mirostat's running target: it starts from a mu the caller
        put in the settings, as upstream, and then lives here, so the caller's settings are never written."""
        self.settings = gen_settings
        self.mirostat_mu = None if gen_settings.mirostat_mu is None else list(gen_settings.mirostat_mu)

    def _check_stream_input(self, input_ids: torch.Tensor, gen_settings: ExLlamaV2Sampler.Settings,
                            token_healing: bool, banned_strings: list[str] | None,
                            filters: list | None) -> tuple[torch.Tensor, torch.Tensor | None, list[ExLlamaV2Filter]]:
        """(ids (bsz, n) on the CPU less a healed token, the healed token or None, the filters), or a
        ValueError naming what cannot be streamed, before any work."""
        ids = input_ids.cpu().long()
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        bsz = ids.shape[0]
        if bsz != (2 if gen_settings.cfg_scale is not None else 1):
            raise GenerationArgumentError(f"the streaming generator takes one sequence (two with cfg_scale set), got {bsz}")
        if bsz > self.cache.batch_size:
            raise GenerationArgumentError(f"{bsz} sequences but the cache holds {self.cache.batch_size}; create it with batch_size={bsz}")
        check_sampler_settings(gen_settings)
        filters = as_filters(filters)
        if banned_strings and filters:
            raise GenerationArgumentError("banned strings rewind the sequence, which filters cannot follow; use one or the other")
        if self.speculative_ngram:
            check_ngram_settings(self.speculative_ngram_min, self.speculative_ngram_max,
                                 self.speculative_ngram_max_inf, self.speculative_ngram_threshold)
        heal = None
        if token_healing and ids.shape[-1] > 1:
            heal, ids = ids[:, -1:], ids[:, :-1]
        if ids.shape[-1] == 0:
            raise GenerationArgumentError("input_ids is empty; give at least one token (e.g. BOS)")
        check_room(self.cache, ids.shape[-1], 1)
        return ids, heal, filters

    def _reusable_prefix(self, ids: torch.Tensor, loras: list | None, input_mask: torch.Tensor | None,
                         position_offsets: torch.Tensor | None, embeddings: torch.Tensor | None) -> int:
        """Cached tokens of the previous stream this one can keep: its shared prefix, when neither stream
        masks or shifts positions and both use the same adapters (keys/values depend on all of these)."""
        plain = (input_mask, position_offsets, embeddings, self.input_mask, self.position_offsets, self.indexed_embeddings)
        same_loras = [id(x) for x in loras or []] == [id(x) for x in self.loras or []]
        if self.sequence_ids is None or not same_loras or any(x is not None for x in plain):
            return 0
        return min(_common_prefix(self.sequence_ids, ids), self.cache.current_seq_len, ids.shape[-1] - 1)

    def _new_ngram_cache(self) -> None:
        """Start counting this stream's n-grams on top of the preloaded ones."""
        self.ngram = NgramCache(self.speculative_ngram_min, self.speculative_ngram_max, self.ngram_preloaded)
        self._ngram_seen = 0

    def _mask(self, length: int) -> torch.Tensor | None:
        """The caller's input mask over the first `length` tokens, padded with 'attend' columns."""
        mask = self.input_mask
        if mask is None or mask.shape[-1] >= length:
            return None if mask is None else mask[:, :length]
        keep = True if mask.dtype == torch.bool else 0
        pad = torch.full((mask.shape[0], length - mask.shape[-1]), keep, dtype=mask.dtype, device=mask.device)
        return torch.cat((mask, pad), dim=1)

    # streaming -----------------------------------------------------------------------------

    def stream(self) -> tuple:
        """Legacy form of `stream_ex`: (chunk, eos, token ids[, probs][, top tokens, top probs][, logits])."""
        r = self.stream_ex()
        out: tuple = (r["chunk"], r["eos"], r["chunk_token_ids"])
        if self.return_probabilities:
            out += (r["probs"],)
        if self.return_top_tokens:
            out += (r["top_tokens"], r["top_probs"])
        if self.return_logits:
            out += (r["logits"],)
        return out

    def stream_ex(self, ban_tokens: list[int] | None = None) -> dict:
        """Generate until some text (or the end) is ready. Returns {chunk, eos, chunk_token_ids (1, n),
        [probs], [top_tokens, top_probs], [logits]}; `eos_reason` and the stop string or token
        are added when the stream ends."""
        if self.sequence_ids is None or self.text is None:
            raise RuntimeError("call begin_stream_ex() before stream_ex()")
        if self.sequence_ids.shape[-1] >= self.cache.max_seq_len:
            raise GenerationArgumentError(
                f"the sequence has reached the cache's max_seq_len of {self.cache.max_seq_len} tokens; start a "
                f"new stream with a shorter context or create the cache with a larger max_seq_len"
            )
        speculative = (
            (self.draft_model is not None or self.speculative_ngram)
            and self.sequence_ids.shape[0] == 1
            and self.heal is None
            and not self.filters
        )
        drafts = self._draft() if speculative else []
        feed = torch.cat((self.sequence_ids[:, -1:], torch.tensor([drafts], dtype=torch.long)), dim=1) if drafts \
            else self.sequence_ids[:, -1:]
        logits = self.model.forward(feed, self.cache, input_mask=self._mask(self.sequence_ids.shape[-1]),
                                    loras=self.loras, position_offsets=self.position_offsets,
                                    indexed_embeddings=self.indexed_embeddings,
                                    **mrope_args(self.mrope, self.sequence_ids.shape[-1] - 1, feed.shape[-1])).float().cpu()

        out = {"chunk": "", "eos": False, "ids": []}
        for i in range(feed.shape[-1]):
            sampled, end_filter = self._sample(logits[:, i : i + 1], ban_tokens)
            rewound = self._accept(sampled, end_filter, logits[:1, i : i + 1], out)
            self.total_tokens += 1
            if out["eos"] or rewound or i == len(drafts) or int(sampled.sampled_token[0, 0]) != drafts[i]:
                break
            self.accepted_draft_tokens += 1
        self.total_draft_tokens += len(drafts)
        self.cache.current_seq_len = self.sequence_ids.shape[-1] - 1
        if self.draft_cache is not None:
            self.draft_cache.current_seq_len = min(self.draft_cache.current_seq_len, self.sequence_ids.shape[-1] - 1)
        return self._result(out)

    def _sample(self, logits: torch.Tensor, ban_tokens: list[int] | None) -> tuple[ExLlamaV2PostSamplingResult, bool]:
        position = self.sequence_ids.shape[-1]
        blocked = set(ban_tokens or ()) | self.bans.get(position, set())
        healing = self.heal is not None
        (token, k_tokens, k_probs, prob, end_filter), self.mirostat_mu = sample_with_state(
            logits, self.settings, self.sequence_ids, random.random(), self.tokenizer, self.mirostat_mu,
            prefix_token=self.heal[:1] if healing else None, return_top_tokens=self.return_top_tokens,
            blocked_tokens=sorted(blocked), filters=None if healing else self.filters,
            filter_prefer_eos=self.filter_prefer_eos,
        )
        self.heal = None
        result = run_post_sampling_hooks(self.settings.post_sampling_hooks, token, prob, k_tokens, k_probs, logits[:1])
        if result.feed_filters and not healing:
            feed_filters(self.filters, int(result.sampled_token[0, 0]))
        return result, end_filter

    def _accept(self, r: ExLlamaV2PostSamplingResult, end_filter: bool, logits: torch.Tensor, out: dict) -> bool:
        """Append the sampled token and stream its text into `out`. True if a banned string
        rewound the sequence instead."""
        t = int(r.sampled_token[0, 0])
        bsz = self.sequence_ids.shape[0]
        if t in self.stop_tokens:
            step = self.text.flush()
            self._take(step, out)
            out.update(eos=True, eos_reason="stop_token", eos_triggering_token_id=t)
            return False
        self.sequence_ids = torch.cat((self.sequence_ids, torch.full((bsz, 1), t, dtype=torch.long)), dim=1)
        self.held_extras.append(TokenExtras(r.sampled_prob, r.candidate_tokens, r.candidate_probs, logits))
        step = self.text.push(t)
        if step.rewind:
            keep = self.sequence_ids.shape[-1] - step.rewind
            self.sequence_ids = self.sequence_ids[:, :keep]
            del self.held_extras[len(self.held_extras) - step.rewind:]
            self.bans = {p: b for p, b in self.bans.items() if p <= keep}
            self.bans.setdefault(keep, set()).add(step.ban_token)
            out["suppressed_text"] = out.get("suppressed_text", "") + step.suppressed_text
            return True
        self._take(step, out)
        if step.stop_string is not None:
            out.update(eos=True, eos_reason="stop_string", eos_triggering_string=step.stop_string)
        elif end_filter:
            self._take(self.text.flush(), out)
            out.update(eos=True, eos_reason="end_filter")
        return False

    def _take(self, step, out: dict) -> None:
        out["chunk"] += step.text
        out["ids"] += step.released
        out.setdefault("extras", []).extend(self.held_extras[: len(step.released)])
        del self.held_extras[: len(step.released)]

    def _result(self, out: dict) -> dict:
        ids = out.pop("ids")
        extras = out.pop("extras", [])
        r = {"chunk": out.pop("chunk"), "eos": out.pop("eos"),
             "chunk_token_ids": torch.tensor([ids], dtype=torch.long).view(1, -1)}
        r.update(join_extras(extras, probs=self.return_probabilities, top_k=self.return_top_tokens,
                             logits=self.return_logits))
        r.update(out)
        return r

    # speculative decoding ------------------------------------------------------------------

    def _draft(self) -> list[int]:
        room = self.cache.max_seq_len - self.sequence_ids.shape[-1] - 1
        k = min(self.num_speculative_tokens, room)
        if k <= 0:
            return []
        if self.draft_model is not None:
            return self._draft_model_tokens(k)
        return self._draft_ngram(k)

    def _draft_ngram(self, k: int) -> list[int]:
        """Count the n-grams ending at tokens new since the last draft (the whole prompt at first), then
        draft from them. Ids of embeddings are context, never tokens to feed, so a draft stops there."""
        if self.ngram is None:      # speculative_ngram was switched on after begin_stream
            self._new_ngram_cache()
        context = self.sequence_ids[0].tolist()
        self.ngram.update(context, start=min(self._ngram_seen, len(context)))
        self._ngram_seen = len(context)
        drafted = self.ngram.draft(context, k, self.speculative_ngram_max_inf, self.speculative_ngram_threshold)
        return list(itertools.takewhile(lambda t: t < EMBEDDING_INDEX, drafted))

    def _draft_model_tokens(self, k: int) -> list[int]:
        seq = self.sequence_ids
        cache = self.draft_cache
        cache.current_seq_len = min(cache.current_seq_len, seq.shape[-1] - 1)
        greedy = self.settings.greedy_clone()
        feed = seq[:, cache.current_seq_len :]
        drafted: list[int] = []
        for _ in range(k):
            logits = self.draft_model.forward(feed, cache, last_id_only=True).float().cpu()   # adapters are the main model's
            context = torch.cat((seq, torch.tensor([drafted], dtype=torch.long)), dim=1) if drafted else seq
            token = ExLlamaV2Sampler.sample(logits[:, -1:], greedy, context, 0.0, self.tokenizer)[0]
            drafted.append(int(token[0, 0]))
            feed = token
        return drafted


def _mrope_layout(ids: torch.Tensor, input_embeddings: list | None) -> MRopeLayout | None:
    """The MRoPE layout of a one-row prompt with images (Qwen2-VL), None without; a batch with images is refused."""
    layouts = [mrope_layout(row.tolist(), input_embeddings) for row in ids]
    if len(layouts) > 1 and any(layouts):
        raise GenerationArgumentError("a batch of prompts with images on an MRoPE model (Qwen2-VL) is not supported "
                                      "by the streaming generator; use the dynamic generator")
    return layouts[0]
