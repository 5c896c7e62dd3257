"""ExLlamaV2DynamicGenerator: many jobs batched over one cache, with prefix reuse between jobs.

The cache (batch size 1) is a pool of pages. Each `iterate()` admits queued jobs that fit, spends
up to `max_chunk_size` tokens on prompt prefill, then runs one decode step for every job that is
ready: one forward pass over all their sequences, each with its own block table and length. The
model's attention backend does the paged attention (flash-attn's block-table kernel, or gathering
pages for every other backend), so batching works wherever the model runs. With `paged=False`
the whole cache is one page and one job runs at a time with plain contiguous attention.

Speculative decoding (a draft model with its own cache over the same pages, or n-grams of each
job's context) proposes `num_draft_tokens` tokens per job before the decode step, which then feeds
each sequence's last token and its job's proposals in one pass. Every fed position is sampled in
turn with the job's settings, and proposals are kept only while they equal what was sampled, so the
output is token for token what plain decoding gives (with the same seed).

The job and the generator use only each other's public methods:
- the generator calls the job's `prepare_for_queue` (at enqueue), `pages_needed` (admission),
  `activate`, `is_prefill_done`, `prefill_chunk`, `verify` (one decode step's logits) and
  `deallocate_pages` (end or cancel);
- the job calls the generator's `caches`, `write_prompt_tokens` (prefill) and `record_written`
  (decoded tokens), and reads its settings (`tokenizer`, `page_size`, `table`, `cache`, `max_seq_len`,
  `max_batch_size`, `num_draft_tokens`, `draft_model`).
Mirostat's running target is job state (`job.mirostat_mu`), never written into the caller's settings.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from ..model.attn_params import PagedParams
from ..cache.base import PAGE_SIZE
from ..model.embedding import EMBEDDING_INDEX
from ..model.image_attention import attention_spans, chunk_end
from ..errors import GenerationArgumentError
from ..inputs import check_sampler_settings
from ..model.lora import as_lora_list
from .drafting import check_draft_vocab, ngram_draft
from .dynamic_embeddings import ExLlamaV2MMEmbedding, check_aliases_present, remap_embeddings
from ..vlm.mrope import MRopeLayout, batch_positions, mrope_layout
from .filters.base import ExLlamaV2Filter, as_filters, feed_filters
from .hooks import run_post_sampling_hooks
from .pages import Page, PageTable, chain_hash, common_prefix
from .sampler import ExLlamaV2Sampler, sample_with_state
from .stop import StreamStep, TextStream, TokenExtras, join_extras, split_stop_conditions

if TYPE_CHECKING:
    from ..cache.base import ExLlamaV2CacheBase
    from ..model.model import ExLlamaV2
    from ..tokenizer import ExLlamaV2Tokenizer

log = logging.getLogger(__name__)

# join_extras' names -> the keys of upstream's dynamic-generator result dicts
_RESULT_KEYS = {"probs": "token_probs", "top_tokens": "top_k_tokens", "top_probs": "top_k_probs", "logits": "logits"}

PAGED_PAGE_SIZE = PAGE_SIZE


class _Sequence:
    """One token sequence of a job (a CFG job has two) and the cache pages it holds."""

    def __init__(self, ids: list[int], mrope: MRopeLayout | None = None) -> None:
        # prompt (less a healed token) + generated tokens; an embedding's rows as its own ids (unique to its
        # content), so page hashes tell two images apart
        self.ids = ids
        self.mrope = mrope                  # the prompt's MRoPE positions (a Qwen2-VL prompt with images), or None
        self.prompt_len = len(ids)
        self.kv_position = 0                # tokens whose keys/values are in the cache
        self.draft_kv = 0                   # the same for the draft cache, if any (never above kv_position)
        self.draft_pending: list[int] = []  # tokens written to the draft cache after those, not yet verified
        self.pages: list[Page] = []
        self.total_pages = 0                # pages reserved for prompt + max_new_tokens
        self.hashes: list[bytes] = []       # chain hashes of the full pages written so far
        self.prompt_hashes: list[bytes] = []  # chain hashes of the prompt's full pages (reuse candidates)

    def block_table(self) -> list[int]:
        return [p.index for p in self.pages]

    def confirm_draft(self) -> None:
        """Keep the draft cache's pending keys/values as far as their tokens became the sequence's."""
        kept = common_prefix(self.ids[self.draft_kv :], self.draft_pending)
        self.draft_kv = min(self.draft_kv + kept, self.kv_position)
        self.draft_pending = []


def _check_job_args(rows: list[torch.Tensor], settings: ExLlamaV2Sampler.Settings, max_new_tokens: int,
                    banned_strings: list[str] | None, filters: list[ExLlamaV2Filter]) -> None:
    """A ValueError naming the problem for a job that cannot run, before it is queued."""
    for ids in rows:
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise GenerationArgumentError(f"input_ids must be (1, n) tensors, got shape {tuple(ids.shape)}")
        if ids.shape[-1] == 0:
            raise GenerationArgumentError("input_ids is empty; give at least one token (e.g. BOS)")
    if len(rows) != (2 if settings.cfg_scale is not None else 1):
        raise GenerationArgumentError("give one input_ids tensor, or a list of two with gen_settings.cfg_scale set for CFG")
    if banned_strings and filters:
        raise GenerationArgumentError("banned strings rewind the sequence, which filters cannot follow; use one or the other")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise GenerationArgumentError(f"max_new_tokens must be an integer of at least 1, got {max_new_tokens!r}")


class ExLlamaV2DynamicJob:
    def __init__(
        self,
        input_ids: torch.Tensor | list[torch.Tensor],
        max_new_tokens: int,
        min_new_tokens: int = 0,
        max_skips: int | None = 4,
        gen_settings: ExLlamaV2Sampler.Settings | None = None,
        seed: int | None = None,
        stop_conditions: list[int | str] | tuple | set | None = None,
        decode_special_tokens: bool = False,
        return_top_tokens: int = 0,
        return_logits: bool = False,
        return_probs: bool = False,
        filters: list[ExLlamaV2Filter] | None = None,
        filter_prefer_eos: bool = False,
        token_healing: bool = False,
        identifier: Any = None,
        banned_strings: list[str] | None = None,
        embeddings: list[ExLlamaV2MMEmbedding] | None = None,
    ) -> None:
        """input_ids: (1, n) on the CPU, or a list of two for CFG (sampled together with the
        settings' cfg_scale). Stop conditions are token ids or strings; like upstream, EOS only
        stops a job when it is listed. Until `min_new_tokens` are out, stop tokens are blocked."""
        rows = input_ids if isinstance(input_ids, list) else [input_ids]
        self.settings = (gen_settings or ExLlamaV2Sampler.Settings()).clone()
        check_sampler_settings(self.settings)     # a negative temperature etc. would sample garbage
        filters = as_filters(filters)
        _check_job_args(rows, self.settings, max_new_tokens, banned_strings, filters)
        self.input_ids = [ids.cpu().long() for ids in rows]
        self.embeddings = list(embeddings or [])
        self._make_sequences(token_healing)

        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.max_skips = max_skips
        self.rng = random.Random(seed)
        self.stop_tokens, self.stop_strings = split_stop_conditions(stop_conditions)
        self.banned_strings = list(banned_strings or [])
        self.decode_special_tokens = decode_special_tokens
        self.return_top_tokens = return_top_tokens
        self.return_logits = return_logits
        self.return_probs = return_probs
        self.filters = filters
        self.filter_prefer_eos = filter_prefer_eos
        self.identifier = identifier
        self._init_progress()

    def _init_progress(self) -> None:
        """State that the generator fills in while the job is queued and runs."""
        self.generator: ExLlamaV2DynamicGenerator | None = None
        self.serial_number: int | None = None
        self.skips = 0
        self.new_tokens = -1 if self.heal is not None else 0
        self.full_completion = ""
        self.text: TextStream | None = None
        self.held: list[TokenExtras] = []
        self.bans: dict[int, set[int]] = {}
        self.cached_pages = 0
        self.cached_tokens = 0
        self.accepted_draft_tokens = 0
        self.rejected_draft_tokens = 0
        # mirostat's running target, per row: job state, so the caller's settings are never written
        # (a mu the caller put in the settings is where it starts)
        self.mirostat_mu: list[float] | None = self.settings.mirostat_mu
        self.time_enqueue: float | None = None
        self.time_first_prefill: float | None = None
        self.time_first_token: float | None = None
        self.time_last_token: float | None = None
        self.finished = False

    def _make_sequences(self, token_healing: bool) -> None:
        """The job's sequences from its prompts: less the healed last token, embeddings remapped to ids."""
        self.heal = None
        rows = self.input_ids
        if token_healing and all(ids.shape[-1] > 1 for ids in rows):
            self.heal = torch.cat([ids[:, -1:] for ids in rows], dim=0)
            rows = [ids[:, :-1] for ids in rows]
        self.embedding_table = None
        for ids in rows:            # checks that every embedding id in the prompt is one of the job's
            _, table = remap_embeddings(ids, self.embeddings)
            self.embedding_table = table if table is not None else self.embedding_table
        check_aliases_present(rows, self.embeddings)
        self.sequences = [_Sequence(ids[0].tolist(), mrope_layout(ids[0].tolist(), self.embeddings)) for ids in rows]

    def __repr__(self) -> str:
        return f"ExLlamaV2DynamicJob #{self.serial_number}" if self.serial_number is not None else "ExLlamaV2DynamicJob (new)"

    def cancel(self) -> None:
        if self.generator is not None:
            self.generator.cancel(self)

    # the generator's side of the interface (see the module docstring) --------------------------

    def prepare_for_queue(self, generator: "ExLlamaV2DynamicGenerator", serial_number: int) -> None:
        """At enqueue: check that the job can ever fit this generator (an error naming the limit
        otherwise), plan its pages and take its serial number."""
        ps = generator.page_size
        extra = 1 if self.heal is not None else 0
        room = generator.num_draft_tokens       # a verification pass writes this far past the last token
        if self.embedding_table is not None and generator.draft_model is not None:
            raise GenerationArgumentError("a job with embeddings cannot run with a draft model (it cannot take them); use a "
                             "generator without draft_model, or use_ngram_draft")
        for seq in self.sequences:
            total = seq.prompt_len + self.max_new_tokens + extra
            if total > generator.max_seq_len:
                raise GenerationArgumentError(
                    f"job needs {total} tokens (prompt {seq.prompt_len + extra} + max_new_tokens "
                    f"{self.max_new_tokens}) but the generator's max_seq_len is {generator.max_seq_len}; "
                    f"shorten the prompt or lower max_new_tokens"
                )
            if seq.prompt_len and seq.ids[-1] >= EMBEDDING_INDEX:
                raise GenerationArgumentError("the prompt ends inside an embedding; put at least one text token after it")
            generator.check_prompt_images(seq)
            seq.total_pages = -(-(total + room) // ps)
            seq.prompt_hashes = []
            h = None
            for i in range((seq.prompt_len - 1) // ps):
                h = chain_hash(h, seq.ids[i * ps : (i + 1) * ps])
                seq.prompt_hashes.append(h)
        pages = sum(s.total_pages for s in self.sequences)
        if pages > generator.table.num_pages:
            drafts = f" (with room for {room} draft tokens)" if room else ""
            raise GenerationArgumentError(
                f"job needs {pages} cache pages of {ps} tokens{drafts} but the cache has "
                f"{generator.table.num_pages} ({generator.cache.max_seq_len} tokens); create the cache with a "
                f"larger max_seq_len or lower max_new_tokens"
            )
        if len(self.sequences) > generator.max_batch_size:
            raise GenerationArgumentError(f"a CFG job needs batch size 2 but the generator's max_batch_size is {generator.max_batch_size}")
        self.generator = generator
        self.serial_number = serial_number
        self.time_enqueue = time.time()

    def pages_needed(self, table: PageTable) -> int:
        """Free pages this job would take now (cached prefix pages others hold cost nothing)."""
        needed = 0
        for seq in self.sequences:
            shared = 0
            for h in seq.prompt_hashes:
                page = table.lookup(h)
                if page is None:
                    break
                shared += page.ref_count > 0
            needed += seq.total_pages - shared
        return needed

    def activate(self, results: list[dict]) -> None:
        """Start running: take the cached prefix pages it can reuse and allocate the rest, start the
        text stream and the filters, and append the 'started' result."""
        gen = self.generator
        table, ps = gen.table, gen.page_size
        self.time_first_prefill = time.time()
        for seq in self.sequences:
            for h in seq.prompt_hashes:
                page = table.lookup(h)
                if page is None:
                    break
                seq.pages.append(table.acquire(page))
                seq.hashes.append(h)
            kv = len(seq.pages) * ps
            self.cached_pages += len(seq.pages)
            prev = seq.hashes[-1] if seq.hashes else None
            src, n = table.best_partial(prev, seq.ids[kv : seq.prompt_len - 1])
            if src is not None and src.ref_count == 0:
                table.acquire(src)                       # nobody holds it: continue in place
                table.unregister(src)
                src.tokens = src.tokens[:n]
                seq.pages.append(src)
            elif src is not None:
                dst = table.allocate()
                for cache in gen.caches():
                    cache.copy_states(cache, src.index * ps, n, dst.index * ps, n, 0, 1, 0, 1)
                dst.tokens = src.tokens[:n]
                dst.prev_hash = src.prev_hash
                seq.pages.append(dst)
            while len(seq.pages) < seq.total_pages:
                seq.pages.append(table.allocate())
            seq.kv_position = seq.draft_kv = kv + n   # a page's recorded tokens are in both caches
            self.cached_tokens += kv + n

        context = self.sequences[0].ids[: self.sequences[0].prompt_len]
        healed = None if self.heal is None else int(self.heal[0, 0])
        self.text = TextStream(gen.tokenizer, self.stop_strings, self.banned_strings, self.decode_special_tokens,
                               context=context[-8:], healed_token=healed)
        for f in self.filters:
            f.background_drop()
            f.begin("")
        results.append(self._result("started"))

    def is_prefill_done(self) -> bool:
        """True once every prompt token but the last is in the cache (the last is fed by decode)."""
        return all(seq.kv_position >= len(seq.ids) - 1 for seq in self.sequences)

    def prefill_chunk(self, budget: int, results: list[dict]) -> int:
        """Write up to `budget` more prompt tokens to the cache; returns how many were written."""
        gen = self.generator
        used = 0
        for seq in self.sequences:
            target = len(seq.ids) - 1
            while seq.kv_position < target and used < budget:
                n = gen.prefill_end(seq, seq.kv_position + min(target - seq.kv_position, budget - used)) - seq.kv_position
                gen.write_prompt_tokens(seq, seq.ids[seq.kv_position : seq.kv_position + n], self.embeddings)
                used += n
        if used:
            results.append(self._result(
                "prefill",
                curr_progress=sum(s.kv_position for s in self.sequences),
                max_progress=sum(len(s.ids) - 1 for s in self.sequences),
            ))
        return used

    # sampling --------------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor) -> tuple[int, dict, bool]:
        """Sample the next token from this job's rows of logits (n, 1, vocab)."""
        if self.time_first_token is None:
            self.time_first_token = time.time()
        healing = self.new_tokens == -1
        seq = self.sequences[0]
        blocked = set(self.bans.get(len(seq.ids), ()))
        if 0 <= self.new_tokens < self.min_new_tokens:
            blocked |= self.stop_tokens
        (token, k_tokens, k_probs, prob, end_filter), self.mirostat_mu = sample_with_state(
            logits, self.settings, torch.tensor([seq.ids], dtype=torch.long), self.rng.random(),
            self.generator.tokenizer, self.mirostat_mu, prefix_token=self.heal if healing else None,
            return_top_tokens=self.return_top_tokens, blocked_tokens=sorted(blocked),
            filters=None if healing else self.filters, filter_prefer_eos=self.filter_prefer_eos,
        )
        r = run_post_sampling_hooks(self.settings.post_sampling_hooks, token, prob, k_tokens, k_probs, logits[:1])
        t = int(r.sampled_token[0, 0])
        if r.feed_filters and not healing:
            feed_filters(self.filters, t)
        return t, TokenExtras(r.sampled_prob, r.candidate_tokens, r.candidate_probs, logits[:1]), end_filter

    def _receive(self, logits: torch.Tensor, results: list[dict]) -> bool:
        """Take this decode step's logits; True when the job has ended."""
        t, extras, end_filter = self._sample(logits)
        self.new_tokens += 1

        if t in self.stop_tokens:
            return self._end(results, self.text.flush(), "stop_token",
                             eos_triggering_token_id=t,
                             eos_triggering_token_str=self.generator.tokenizer.get_id_to_piece_list(True)[t])
        for seq in self.sequences:
            seq.ids.append(t)
        self.held.append(extras)
        step = self.text.push(t)
        if step.rewind:
            self._rewind(step)
            results.append(self._result("streaming", suppressed_text=step.suppressed_text))
            return False
        if step.stop_string is not None:
            return self._end(results, step, "stop_string", eos_triggering_string=step.stop_string)
        if self.new_tokens >= self.max_new_tokens:
            return self._end(results, self._merge(step, self.text.flush()), "max_new_tokens")
        if end_filter:
            return self._end(results, self._merge(step, self.text.flush()), "end_filter")
        results.append(self._result("streaming", step))
        return False

    def verify(self, drafts: list[int], fed: list[list[int]], logits: torch.Tensor, results: list[dict]) -> bool:
        """Sample the fed positions in turn from logits (n, q, vocab): the last token's, then one more
        per draft token while the drafts equal what was sampled. True when the job has ended."""
        gen = self.generator
        first = self.sequences[0]
        for i in range(len(drafts) + 1):
            for seq, row in zip(self.sequences, fed):
                gen.record_written(seq, [row[i]], final=False)
            length = len(first.ids)
            if self._receive(logits[:, i : i + 1], results):
                return True
            if i == len(drafts):
                break
            if len(first.ids) != length + 1 or first.ids[-1] != drafts[i]:   # rejected, or rewound
                self.rejected_draft_tokens += len(drafts) - i
                break
            self.accepted_draft_tokens += 1
        return False

    def _rewind(self, step: StreamStep) -> None:
        """Drop the newest tokens that formed a banned string and ban the first at its position."""
        ps = self.generator.page_size
        self.new_tokens -= step.rewind
        del self.held[len(self.held) - step.rewind:]
        for seq in self.sequences:
            del seq.ids[len(seq.ids) - step.rewind:]
            seq.kv_position = len(seq.ids) - 1
            for i in range(seq.kv_position // ps, len(seq.pages)):
                page = seq.pages[i]
                del page.tokens[max(0, seq.kv_position - i * ps):]
            del seq.hashes[seq.kv_position // ps:]
        position = len(self.sequences[0].ids)
        self.bans = {p: b for p, b in self.bans.items() if p <= position}
        self.bans.setdefault(position, set()).add(step.ban_token)

    @staticmethod
    def _merge(a: StreamStep, b: StreamStep) -> StreamStep:
        return StreamStep(text=a.text + b.text, released=a.released + b.released)

    # results ---------------------------------------------------------------------------------

    def _result(self, stage: str, step: StreamStep | None = None, **extra: Any) -> dict:
        r: dict[str, Any] = {"job": self, "stage": stage, "eos": False, "serial": self.serial_number}
        if self.identifier is not None:
            r["identifier"] = self.identifier
        if stage == "streaming":
            step = step or StreamStep()
            count = len(step.released)
            held, self.held = self.held[:count], self.held[count:]
            self.full_completion += step.text
            r["text"] = step.text
            r["token_ids"] = torch.tensor([step.released], dtype=torch.long).view(1, -1)
            joined = join_extras(held, probs=self.return_probs, top_k=self.return_top_tokens, logits=self.return_logits)
            r.update((_RESULT_KEYS[name], value) for name, value in joined.items())
        r.update(extra)
        return r

    def _end(self, results: list[dict], step: StreamStep, reason: str, **extra: Any) -> bool:
        self.finished = True
        self.time_last_token = time.time()
        r = self._result("streaming", step, eos_reason=reason, **extra)
        r["eos"] = True
        n = len(self.sequences)
        r.update(
            full_completion=self.full_completion,
            new_tokens=self.new_tokens,
            prompt_tokens=self.input_ids[0].shape[-1],
            cached_pages=self.cached_pages // n,
            cached_tokens=self.cached_tokens // n,
            time_enqueued=self.time_first_prefill - self.time_enqueue,
            time_prefill=self.time_first_token - self.time_first_prefill,
            time_generate=self.time_last_token - self.time_first_token,
        )
        if self.generator.num_draft_tokens:
            r.update(accepted_draft_tokens=self.accepted_draft_tokens, rejected_draft_tokens=self.rejected_draft_tokens)
        results.append(r)
        return True

    def deallocate_pages(self) -> None:
        """Give the job's pages back (ended or cancelled); full ones stay registered for reuse."""
        gen = self.generator
        table, ps = gen.table, gen.page_size
        for seq in self.sequences:
            # pages keep only tokens whose keys/values every cache holds, so a reuser needs no check
            valid = seq.kv_position if gen.draft_model is None else seq.draft_kv
            for i, page in enumerate(seq.pages):
                if page.ref_count == 1:
                    del page.tokens[max(0, valid - i * ps):]
                    table.register(page)        # final now; later prompts may reuse it
                table.release(page)
            seq.pages = []
        for f in self.filters:
            f.background_drop()


class ExLlamaV2DynamicGenerator:
    def __init__(
        self,
        model: "ExLlamaV2",
        cache: "ExLlamaV2CacheBase",
        tokenizer: "ExLlamaV2Tokenizer",
        max_batch_size: int | None = None,
        max_seq_len: int | None = None,
        max_chunk_size: int | None = None,
        max_q_size: int = 8,
        draft_model: "ExLlamaV2 | None" = None,
        draft_cache: "ExLlamaV2CacheBase | None" = None,
        num_draft_tokens: int = 4,
        use_ngram_draft: bool = False,
        max_ngram: int = 4,
        max_sampling_threads: int = 16,
        min_sampling_threads: int = 3,
        paged: bool = True,
        filter_background_eval: bool = True,
    ) -> None:
        cfg = model.config
        self.model = model
        self.cache = cache
        self.tokenizer = tokenizer
        if cache.batch_size != 1:
            raise GenerationArgumentError(f"the dynamic generator needs a cache with batch_size=1 (it pages it), got {cache.batch_size}")
        self.paged = paged
        if paged:
            if cache.max_seq_len % PAGE_SIZE:
                raise GenerationArgumentError(f"paged generation needs cache.max_seq_len to be a multiple of {PAGE_SIZE}, "
                                 f"got {cache.max_seq_len}; round it up or use paged=False")
            self.page_size = PAGE_SIZE
        else:
            self.page_size = cache.max_seq_len
        self.max_seq_len = max_seq_len if max_seq_len is not None else cfg.max_seq_len
        if self.max_seq_len > cfg.max_seq_len:
            raise GenerationArgumentError(f"max_seq_len {self.max_seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
        self.max_chunk_size = max_chunk_size if max_chunk_size is not None else cfg.max_input_len
        if self.max_chunk_size > cfg.max_input_len:
            raise GenerationArgumentError(f"max_chunk_size {self.max_chunk_size} exceeds the model's max_input_len {cfg.max_input_len}")
        self.max_batch_size = self._batch_size(max_batch_size, max_q_size)
        self.draft_model = draft_model
        self.draft_cache = draft_cache
        self.use_ngram_draft = use_ngram_draft
        self.max_ngram = max_ngram
        speculative = draft_model is not None or use_ngram_draft
        self.num_draft_tokens = num_draft_tokens if speculative else 0
        if speculative:
            self._check_speculative(max_q_size)

        self.table = PageTable(max(cache.max_seq_len // self.page_size, 1), self.page_size)
        self.current_loras: list | None = None
        self.job_serial = 0
        self.pending_jobs: list[ExLlamaV2DynamicJob] = []
        self.active_jobs: list[ExLlamaV2DynamicJob] = []
        self.filter_pool = ThreadPoolExecutor(max_workers=4) if filter_background_eval else None
        log.info("dynamic generator: %s", self._describe_path())

    def _batch_size(self, max_batch_size: int | None, max_q_size: int) -> int:
        """Sequences decoded together: 1 unpaged; else as asked, within the model's input budget."""
        cfg = self.model.config
        if not self.paged:
            return 1
        if not max_batch_size:
            return max(1, cfg.max_input_len // max_q_size)
        if max_batch_size * max_q_size > cfg.max_batch_size * cfg.max_input_len:
            raise GenerationArgumentError(
                f"max_batch_size * max_q_size = {max_batch_size} * {max_q_size} exceeds the model's "
                f"max_batch_size * max_input_len = {cfg.max_batch_size} * {cfg.max_input_len}"
            )
        return max_batch_size

    def _check_speculative(self, max_q_size: int) -> None:
        """Refuse draft settings that cannot work, naming the fix."""
        if self.draft_model is not None and self.use_ngram_draft:
            raise GenerationArgumentError("give either a draft model or use_ngram_draft=True, not both")
        if (self.draft_model is None) != (self.draft_cache is None):
            raise GenerationArgumentError("speculative decoding with a draft model needs both draft_model and draft_cache")
        if not 1 <= self.num_draft_tokens <= max_q_size:
            raise GenerationArgumentError(f"num_draft_tokens must be between 1 and max_q_size ({max_q_size}), "
                             f"got {self.num_draft_tokens}")
        if self.use_ngram_draft and self.max_ngram < 1:
            raise GenerationArgumentError(f"max_ngram must be at least 1, got {self.max_ngram}")
        if self.draft_model is None:
            return
        dc = self.draft_cache
        if dc.batch_size != 1 or dc.max_seq_len != self.cache.max_seq_len:
            raise GenerationArgumentError(
                f"the draft cache shares the main cache's pages, so it needs batch_size=1 and max_seq_len="
                f"{self.cache.max_seq_len}; got batch_size={dc.batch_size}, max_seq_len={dc.max_seq_len}"
            )
        check_draft_vocab(self.draft_model, self.model, self.tokenizer)

    def caches(self) -> list["ExLlamaV2CacheBase"]:
        """The caches that share the page table: the model's, and the draft model's if there is one."""
        return [self.cache] if self.draft_cache is None else [self.cache, self.draft_cache]

    def _describe_path(self) -> str:
        where = self._attention_path(self.model)
        if self.draft_model is not None:
            where += f"; draft model via {self._attention_path(self.draft_model)}"
        if self.num_draft_tokens:
            source = "a draft model" if self.draft_model is not None else f"n-grams of up to {self.max_ngram} tokens"
            where += f"; speculative decoding of {self.num_draft_tokens} tokens from {source}"
        if not self.paged:
            return f"unpaged, one job at a time, contiguous attention via {where}"
        return (f"paged batching via {where}, {self.table.num_pages} pages of {self.page_size} tokens, "
                f"up to {self.max_batch_size} sequences")

    def _attention_path(self, model: "ExLlamaV2") -> str:
        plans = [model.attn_plan.device_plan(d) for d in model.get_cache_devices()]
        missing = [p.device.label for p in plans if not p.paged]
        if self.paged and missing:
            raise GenerationArgumentError(f"paged attention is not available on {', '.join(missing)}; create the generator "
                             f"with paged=False")
        return ", ".join(f"{p.device.label} {p.backend}" + (f" ({p.paged_impl})" if self.paged else "") for p in plans)

    # queue -------------------------------------------------------------------------------------

    def num_remaining_jobs(self) -> int:
        return len(self.pending_jobs) + len(self.active_jobs)

    def enqueue(self, job: ExLlamaV2DynamicJob | list[ExLlamaV2DynamicJob]) -> int | list[int]:
        if isinstance(job, list):
            return [self.enqueue(j) for j in job]
        job.prepare_for_queue(self, self.job_serial)
        self.job_serial += 1
        self.pending_jobs.append(job)
        return job.serial_number

    def cancel(self, job: ExLlamaV2DynamicJob) -> None:
        if job in self.pending_jobs:
            self.pending_jobs.remove(job)
        elif job in self.active_jobs:
            job.deallocate_pages()
            self.active_jobs.remove(job)

    def clear_queue(self) -> None:
        for job in list(self.active_jobs):
            job.deallocate_pages()
        self.active_jobs.clear()
        self.pending_jobs.clear()

    def reset_page_table(self) -> None:
        if self.active_jobs:
            raise RuntimeError("cannot reset the page table while jobs are running; cancel them or clear_queue() first")
        self.table.reset()

    def set_loras(self, loras: list | Any | None) -> None:
        """Use these adapters (one ExLlamaV2Lora, a list, or None) for every job from now on."""
        if self.num_remaining_jobs():
            raise RuntimeError("LoRAs cannot change while jobs are queued or running")
        new = as_lora_list(loras, self.model) or []
        if [id(x) for x in new] != [id(x) for x in self.current_loras or []]:
            # cached prefix pages hold keys/values computed with the old adapters; reusing them
            # would mix adapters within one sequence
            self.table.reset()
        self.current_loras = new

    def warmup(self) -> None:
        ids = torch.tensor([[self.tokenizer.bos_token_id or 0] * 2], dtype=torch.long)
        self.enqueue(ExLlamaV2DynamicJob(ids, max_new_tokens=4, gen_settings=ExLlamaV2Sampler.Settings.greedy()))
        while self.num_remaining_jobs():
            self.iterate()
        self.reset_page_table()

    # iteration ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def iterate(self) -> list[dict]:
        """Advance every job by one step. Returns the result dicts of this step (stages
        'started', 'prefill' and 'streaming'; the last result of a job has eos=True)."""
        results: list[dict] = []
        self._admit(results)
        budget = self.max_chunk_size
        for job in self.active_jobs:
            if budget <= 0:
                break
            if not job.is_prefill_done():
                budget -= job.prefill_chunk(budget, results)
        ready = [j for j in self.active_jobs if j.is_prefill_done()]
        if ready:
            self._decode(ready, results)
        return results

    def _admit(self, results: list[dict]) -> None:
        """Start queued jobs in order while they fit. A job that does not fit may be overtaken by
        later ones, but only `max_skips` times; after that the queue waits for it."""
        rows = sum(len(j.sequences) for j in self.active_jobs)
        waiting: list[ExLlamaV2DynamicJob] = []
        for job in list(self.pending_jobs):
            fits = rows + len(job.sequences) <= self.max_batch_size and job.pages_needed(self.table) <= self.table.free_count()
            if not fits:
                waiting.append(job)
                continue
            if any(w.max_skips is not None and w.skips >= w.max_skips for w in waiting):
                return
            for w in waiting:
                w.skips += 1
            self.pending_jobs.remove(job)
            self.active_jobs.append(job)
            job.activate(results)
            rows += len(job.sequences)

    def _decode(self, ready: list[ExLlamaV2DynamicJob], results: list[dict]) -> None:
        """One step for every job past prefill: one forward pass over each sequence's last token and
        its job's draft tokens, then sampling each job's positions in turn."""
        drafts = self._propose(ready)
        width = 1 + max(len(d) for d in drafts)
        seqs, fed = [], []
        for job, d in zip(ready, drafts):
            for s in job.sequences:
                row = [s.ids[s.kv_position]] + d
                fed.append(row + row[-1:] * (width - len(row)))   # padding to one width is never sampled
                seqs.append(s)
        if self.filter_pool is not None:
            for job in ready:
                self._schedule_filters(job)
        ids = torch.tensor(fed, dtype=torch.long)                 # (sequences, 1 + most drafts of a job)
        logits = self._forward(seqs, ids, [s.kv_position for s in seqs]).float().cpu()
        ended, row = [], 0
        for job, d in zip(ready, drafts):
            n = len(job.sequences)
            if job.verify(d, fed[row : row + n], logits[row : row + n], results):
                ended.append(job)
            row += n
        if self.draft_model is not None:
            self._settle_draft(ready, ended)
        for job in ended:
            job.deallocate_pages()
            self.active_jobs.remove(job)

    # speculative decoding ----------------------------------------------------------------------

    def _propose(self, ready: list[ExLlamaV2DynamicJob]) -> list[list[int]]:
        """Draft tokens per job ([] each without speculative decoding)."""
        if self.draft_model is not None:
            return self._draft_with_model(ready)
        if self.use_ngram_draft:
            drafts = [ngram_draft(j.sequences[0].ids, self.num_draft_tokens, self.max_ngram) for j in ready]
            # an embedding's ids in the context are no tokens the model can be fed
            return [list(itertools.takewhile(lambda t: t < EMBEDDING_INDEX, d)) for d in drafts]
        return [[] for _ in ready]

    def _draft_with_model(self, ready: list[ExLlamaV2DynamicJob]) -> list[list[int]]:
        """The draft model's greedy continuation of every sequence, one batched pass per token; a job
        takes its first sequence's. The draft cache is left holding the last token and all draft
        tokens but the final one, pending until the main model has judged them."""
        seqs = [s for j in ready for s in j.sequences]
        vocab = self.tokenizer.get_vocab_size()       # propose only tokens the sampler can pick
        tokens = torch.tensor([[s.ids[s.kv_position]] for s in seqs], dtype=torch.long)
        drafted: list[list[int]] = [[] for _ in seqs]
        for j in range(self.num_draft_tokens):
            for s, t in zip(seqs, tokens[:, 0].tolist()):
                s.draft_pending.append(t)
            logits = self._forward(seqs, tokens, [s.draft_kv + j for s in seqs], draft=True)
            tokens = logits[:, -1:, :vocab].argmax(-1).cpu()
            for d, t in zip(drafted, tokens[:, 0].tolist()):
                d.append(t)
        firsts = itertools.accumulate((len(j.sequences) for j in ready[:-1]), initial=0)   # row of each job
        return [drafted[i] for i in firsts]

    def _settle_draft(self, ready: list[ExLlamaV2DynamicJob], ended: list[ExLlamaV2DynamicJob]) -> None:
        """Keep the draft cache's keys/values of accepted draft tokens, then write those of the
        tokens the draft cache still lacks (the last draft token, when all were accepted) for every
        running sequence, so both caches again hold the same tokens."""
        lagging: dict[int, list[_Sequence]] = {}
        for job in ready:
            for s in job.sequences:
                s.confirm_draft()
                if job not in ended and s.draft_kv < s.kv_position:
                    lagging.setdefault(s.kv_position - s.draft_kv, []).append(s)
        for group in lagging.values():          # one pass per number of missing tokens
            ids = torch.tensor([s.ids[s.draft_kv : s.kv_position] for s in group], dtype=torch.long)
            self._forward(group, ids, [s.draft_kv for s in group], draft=True, preprocess_only=True)
            for s in group:
                s.draft_kv = s.kv_position

    def _schedule_filters(self, job: ExLlamaV2DynamicJob) -> None:
        """Let CPU-heavy filters compute their next step while the model runs."""
        if job.new_tokens < 0 or not job.filters:
            return
        masking = all(f.can_mask_logits() for f in job.filters)
        for f in job.filters:
            if f.use_background_worker() and f.background_result is None:
                if masking:
                    f.background_prepare_logit_mask(self.filter_pool)
                else:
                    f.background_next(self.filter_pool)

    def _prompt_image_mask(self, seq: _Sequence) -> list[bool] | None:
        """Which prompt tokens written by prefill (all but the last) are an image's, where the model's image tokens
        attend bidirectionally (image_attention.py); None for any other model."""
        if self.model.archparams.image_attention != "bidirectional":
            return None
        return [t >= EMBEDDING_INDEX for t in seq.ids[: seq.prompt_len - 1]]

    def check_prompt_images(self, seq: _Sequence) -> None:
        """At enqueue: each image of the prompt, with the token after it, fits one prefill chunk (it is never
        split where its tokens attend bidirectionally)."""
        for start, end, causal in attention_spans(self._prompt_image_mask(seq)) or ():
            if not causal and end - start + 1 > self.max_chunk_size:
                raise GenerationArgumentError(f"an image of {end - start} tokens does not fit the generator's "
                                              f"max_chunk_size {self.max_chunk_size} with the token after it; raise "
                                              f"max_chunk_size (and the model's max_input_len)")

    def prefill_end(self, seq: _Sequence, end: int) -> int:
        """Where the prefill chunk of `seq` from its kv_position may end, at most `end` unless that cuts an image
        whose tokens attend bidirectionally (then before it, or just past it)."""
        return chunk_end(self._prompt_image_mask(seq), seq.kv_position, end, self.max_chunk_size)

    def write_prompt_tokens(self, seq: _Sequence, tokens: list[int], embeddings: list[ExLlamaV2MMEmbedding]) -> None:
        """Prefill `tokens` after the sequence's cached tokens, in the draft cache too."""
        ids, table = remap_embeddings(torch.tensor([tokens], dtype=torch.long), embeddings)
        self._forward([seq], ids, [seq.kv_position], preprocess_only=True, indexed_embeddings=table)
        if self.draft_model is not None:
            self._forward([seq], ids, [seq.draft_kv], draft=True, preprocess_only=True)
            seq.draft_kv += len(tokens)
        self.record_written(seq, tokens, final=True)

    def _forward(self, seqs: list[_Sequence], ids: torch.Tensor, past: list[int], *, draft: bool = False,
                 preprocess_only: bool = False, indexed_embeddings: torch.Tensor | None = None) -> torch.Tensor | None:
        """One forward pass of `ids` (len(seqs), q) written after the first past[i] tokens of each
        sequence, through the model and its cache or the draft model and the draft cache."""
        if draft:
            model, cache, loras = self.draft_model, self.draft_cache, None
        else:
            model, cache, loras = self.model, self.cache, self.current_loras
        mrope = None if draft else batch_positions([s.mrope for s in seqs], past, ids.shape[-1])
        if not self.paged:
            cache.current_seq_len = past[0]
            extra = {} if mrope is None else {"mrope_positions": mrope}
            return model.forward(ids, cache, preprocess_only=preprocess_only, loras=loras,
                                 indexed_embeddings=indexed_embeddings, **extra)
        width = max(len(s.pages) for s in seqs)
        block_table = torch.tensor([s.block_table() + [0] * (width - len(s.pages)) for s in seqs], dtype=torch.int32)
        seqlens = torch.tensor(past, dtype=torch.int32)
        params = PagedParams(len(seqs), block_table, seqlens, max_cache_seqlen=int(seqlens.max()),
                             page_size=self.page_size, q_len=ids.shape[-1], mrope_positions=mrope)
        return model.forward(ids, cache, preprocess_only=preprocess_only, loras=loras, attn_params=params,
                             indexed_embeddings=indexed_embeddings)

    def record_written(self, seq: _Sequence, tokens: list[int], final: bool) -> None:
        """Record that the keys/values of `tokens` now sit after the sequence's cached tokens.
        Pages filled with final (prompt) tokens are offered for reuse at once."""
        ps = self.page_size
        for t in tokens:
            i, offset = divmod(seq.kv_position, ps)
            page = seq.pages[i]
            if offset == 0:
                page.prev_hash = seq.hashes[i - 1] if i else None
            page.tokens.append(t)
            seq.kv_position += 1
            if len(page.tokens) == ps:
                seq.hashes.append(chain_hash(page.prev_hash, page.tokens))
                if final:
                    self.table.register(page)

    # one-call generation -----------------------------------------------------------------------

    def generate(
        self,
        prompt: str | tuple | list,
        max_new_tokens: int,
        min_new_tokens: int = 0,
        seed: int | None = None,
        gen_settings: ExLlamaV2Sampler.Settings | list[ExLlamaV2Sampler.Settings] | None = None,
        token_healing: bool = False,
        encode_special_tokens: bool = False,
        decode_special_tokens: bool = False,
        stop_conditions: list[int | str] | None = None,
        add_bos: bool = False,
        abort_event: threading.Event | None = None,
        completion_only: bool = False,
        filters: list | None = None,
        filter_prefer_eos: bool = False,
        return_last_results: bool = False,
        embeddings: list | None = None,
        banned_strings: list[str] | None = None,
    ) -> Any:
        """Generate completions for a prompt (str, or a (positive, negative) tuple for CFG) or a
        list of them, run as concurrent jobs. Returns str or list[str] (with the prompt unless
        `completion_only`), plus the last result dict(s) with `return_last_results`."""
        batched = isinstance(prompt, list)
        prompts = prompt if batched else [prompt]
        filters = filters if batched else [filters]
        embeddings = embeddings if batched else [embeddings]
        filters = filters or [None] * len(prompts)
        embeddings = embeddings or [None] * len(prompts)
        if len(filters) != len(prompts) or len(embeddings) != len(prompts):
            raise GenerationArgumentError("with a list of prompts, give one filter list and one embedding list (or None) per prompt")
        if isinstance(gen_settings, list) and len(gen_settings) != len(prompts):
            raise GenerationArgumentError(f"{len(gen_settings)} gen_settings for {len(prompts)} prompts")

        order: dict[int, int] = {}
        for idx, p in enumerate(prompts):
            texts = list(p) if isinstance(p, tuple) else [p]
            if not all(isinstance(t, str) for t in texts):
                raise GenerationArgumentError(f"a prompt is a string or a tuple of two strings (CFG), got {type(p).__name__}")
            ids = [self.tokenizer.encode(t, encode_special_tokens=encode_special_tokens, add_bos=add_bos,
                                         embeddings=embeddings[idx]) for t in texts]
            settings = gen_settings[idx] if isinstance(gen_settings, list) else gen_settings
            job = ExLlamaV2DynamicJob(
                ids if isinstance(p, tuple) else ids[0], max_new_tokens, min_new_tokens, seed=seed,
                gen_settings=settings, stop_conditions=stop_conditions, decode_special_tokens=decode_special_tokens,
                filters=filters[idx], filter_prefer_eos=filter_prefer_eos, token_healing=token_healing,
                banned_strings=banned_strings, embeddings=embeddings[idx],
            )
            if seed is not None:
                seed += 1
            order[self.enqueue(job)] = idx

        if (done := self._run_to_end(order, len(prompts), abort_event)) is None:
            return None
        completions, last = done
        if not completion_only:
            completions = [(p[0] if isinstance(p, tuple) else p) + c for p, c in zip(prompts, completions)]
        if not batched:
            completions, last = completions[0], last[0]
        return (completions, last) if return_last_results else completions

    def _run_to_end(self, order: dict[int, int], count: int,
                    abort_event: threading.Event | None) -> tuple[list[str], list[dict | None]] | None:
        """Iterate until every queued job ends: each prompt's completion text and last result, by the
        prompt index `order` maps job serials to; None (queue cleared) if `abort_event` is set."""
        completions = [""] * count
        last: list[dict | None] = [None] * count
        while self.num_remaining_jobs():
            for r in self.iterate():
                idx = order[r["serial"]]
                if r["stage"] == "streaming":
                    completions[idx] += r.get("text", "")
                if r["eos"]:
                    last[idx] = r
            if abort_event is not None and abort_event.is_set():
                self.clear_queue()
                return None
        return completions, last
