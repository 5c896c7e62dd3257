"""ExLlamaV2BaseGenerator: prompt in, completion out, on a contiguous cache (batched by left padding)."""

from __future__ import annotations

import random
import threading
from typing import TYPE_CHECKING

import torch

from ..errors import GenerationArgumentError
from ..inputs import check_sampler_settings
from .dynamic_embeddings import check_aliases_present, remap_embeddings
from ..vlm.mrope import MRopeLayout, mrope_layout
from ..vlm.mrope import forward_args as mrope_args
from .filters.base import ExLlamaV2Filter  # re-exported: filter libraries import it from here
from .filters.base import as_filters, feed_filters
from .sampler import ExLlamaV2Sampler, sample_with_state
from .stop import decode_ids

if TYPE_CHECKING:
    from ..cache.base import ExLlamaV2CacheBase
    from ..model.lora import ExLlamaV2Lora
    from ..model.model import ExLlamaV2
    from ..tokenizer import ExLlamaV2Tokenizer

__all__ = ["ExLlamaV2BaseGenerator", "ExLlamaV2Filter"]


def check_room(cache: "ExLlamaV2CacheBase", prompt_len: int, new_tokens: int) -> None:
    """A clear error before any work when a generation cannot fit the cache."""
    if prompt_len + new_tokens > cache.max_seq_len:
        raise GenerationArgumentError(
            f"prompt of {prompt_len} tokens plus {new_tokens} new tokens exceeds the cache's max_seq_len "
            f"of {cache.max_seq_len}; shorten the prompt, ask for fewer tokens or create the cache with a "
            f"larger max_seq_len"
        )


def _check_simple_args(gen_settings: object, batched: bool, filters: list | None) -> list[ExLlamaV2Filter]:
    """generate_simple's filters as ExLlamaV2Filters, or an error naming an argument it cannot take."""
    if not isinstance(gen_settings, ExLlamaV2Sampler.Settings):
        raise GenerationArgumentError(f"gen_settings must be an ExLlamaV2Sampler.Settings, got "
                                      f"{type(gen_settings).__name__}; e.g. ExLlamaV2Sampler.Settings()")
    check_sampler_settings(gen_settings)
    filters = as_filters(filters)
    if batched and filters:
        raise GenerationArgumentError("filters constrain one sequence; generate batched prompts without filters")
    return filters


def _mark_stops(stopped_at: list, token: torch.Tensor, end_filter: bool, stop_token: int | None, position: int) -> bool:
    """Record where each row stopped (a stop token is left out of the text, a filter's end token kept);
    True when every row has."""
    for row, t in enumerate(token[:, 0].tolist()):
        if stopped_at[row] is None and (t == stop_token or end_filter):
            stopped_at[row] = position + (0 if t == stop_token else 1)
    return None not in stopped_at


class ExLlamaV2BaseGenerator:
    def __init__(self, model: "ExLlamaV2", cache: "ExLlamaV2CacheBase", tokenizer: "ExLlamaV2Tokenizer") -> None:
        self.model = model
        self.cache = cache
        self.tokenizer = tokenizer
        self.sequence_ids: torch.Tensor | None = None
        self.abort_event: threading.Event | None = None

    def warmup(self) -> None:
        """One short forward pass, so kernels are loaded before the first real request."""
        self.cache.current_seq_len = 0
        self.model.forward(torch.tensor([[self.tokenizer.bos_token_id or 0] * 2]), self.cache, preprocess_only=True)
        self.cache.current_seq_len = 0

    def full(self) -> bool:
        return self.sequence_ids is not None and self.sequence_ids.shape[-1] >= self.cache.max_seq_len

    def generate_simple(
        self,
        prompt: str | list[str],
        gen_settings: ExLlamaV2Sampler.Settings,
        num_tokens: int,
        seed: int | None = None,
        token_healing: bool = False,
        encode_special_tokens: bool = False,
        decode_special_tokens: bool = False,
        loras: "ExLlamaV2Lora | list | None" = None,
        stop_token: int | None = -1,
        add_bos: bool = False,
        abort_event: threading.Event | None = None,
        input_embeddings: list | None = None,
        completion_only: bool = False,
        filters: list[ExLlamaV2Filter] | None = None,
        filter_prefer_eos: bool = False,
    ) -> str | list[str] | None:
        """Generate up to `num_tokens` tokens after `prompt` (a list makes a left-padded batch).
        Stops a row at `stop_token` (-1: the tokenizer's EOS; None: never). Returns the decoded
        prompt plus completion (or the completion alone), or None if `abort_event` was set."""
        batched = isinstance(prompt, list)
        filters = _check_simple_args(gen_settings, batched, filters)
        if stop_token == -1:
            stop_token = self.tokenizer.eos_token_id
        rng = random.Random(seed)
        self.abort_event = abort_event

        ids, offsets, heal, embeds, mrope = self._encode_prompt(prompt, num_tokens, token_healing,
                                                                encode_special_tokens, add_bos, input_embeddings)
        bsz = ids.shape[0]
        mask = self.tokenizer.padding_mask(ids) if bsz > 1 else None
        positions = offsets if bsz > 1 else None
        if not self._prefill(ids, mask, positions, embeds, loras, abort_event, filters, mrope):
            return None

        prompt_len = ids.shape[-1]
        stopped_at = [None] * bsz
        self.sequence_ids = ids
        mirostat_mu = gen_settings.mirostat_mu          # this call's, never written into gen_settings
        for step in range(num_tokens):
            if abort_event is not None and abort_event.is_set():
                return None
            logits = self.model.forward(self.sequence_ids[:, -1:], self.cache, input_mask=mask, loras=loras,
                                        position_offsets=positions, indexed_embeddings=embeds,
                                        **mrope_args(mrope, self.sequence_ids.shape[-1] - 1, 1))
            (token, _, _, _, end_filter), mirostat_mu = sample_with_state(
                logits[:, -1:].float().cpu(), gen_settings, self.sequence_ids, [rng.random() for _ in range(bsz)],
                self.tokenizer, mirostat_mu, prefix_token=heal if step == 0 else None, filters=filters,
                filter_prefer_eos=filter_prefer_eos,
            )
            feed_filters(filters, int(token[0, 0]))
            self.sequence_ids = torch.cat((self.sequence_ids, token), dim=1)
            if mask is not None:
                mask = torch.cat((mask, mask.new_zeros(bsz, 1)), dim=1)
            if _mark_stops(stopped_at, token, end_filter, stop_token, prompt_len + step):
                break

        texts = self._texts(stopped_at, prompt_len if completion_only else None, offsets, decode_special_tokens)
        return texts if batched else texts[0]

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None,
                 embeds: torch.Tensor | None, loras: object, abort_event: threading.Event | None,
                 filters: list[ExLlamaV2Filter], mrope: MRopeLayout | None = None) -> bool:
        """Write all prompt tokens but the last to the cache and start the filters; False if aborted."""
        self.cache.current_seq_len = 0
        if ids.shape[-1] > 1:
            self.model.forward(ids[:, :-1], self.cache, input_mask=mask, preprocess_only=True, loras=loras,
                               position_offsets=positions, abort_event=abort_event, indexed_embeddings=embeds,
                               **mrope_args(mrope, 0, ids.shape[-1] - 1))
            if abort_event is not None and abort_event.is_set():
                return False
        for f in filters:
            f.background_drop()
            f.begin("")
        return True

    def _encode_prompt(self, prompt: str | list[str], num_tokens: int, token_healing: bool,
                       encode_special_tokens: bool, add_bos: bool, input_embeddings: list | None) -> tuple:
        """(ids less a healed token, left-padding offsets, healed token or None, embedding table, MRoPE layout or
        None), or a ValueError before any work when the prompts do not fit the cache."""
        ids, offsets = self.tokenizer.encode(
            prompt, encode_special_tokens=encode_special_tokens, return_offsets=True, add_bos=add_bos,
            embeddings=input_embeddings,
        )
        bsz = ids.shape[0]
        if bsz > self.cache.batch_size:
            raise GenerationArgumentError(f"{bsz} prompts but the cache holds {self.cache.batch_size} sequences; "
                             f"create the cache with batch_size={bsz}")
        heal = None
        if token_healing and ids.shape[-1] > 1:
            heal, ids = ids[:, -1:], ids[:, :-1]
        check_room(self.cache, ids.shape[-1], num_tokens)
        check_aliases_present([ids if heal is None else torch.cat((ids, heal), dim=1)], input_embeddings)
        layouts = [mrope_layout(row.tolist(), input_embeddings) for row in ids]
        if bsz > 1 and any(layouts):
            raise GenerationArgumentError("a batch of prompts with images on an MRoPE model (Qwen2-VL) is not "
                                          "supported by the base generator; use the dynamic generator")
        ids, embeds = remap_embeddings(ids, input_embeddings)
        return ids, offsets, heal, embeds, layouts[0]

    def _texts(self, stopped_at: list, completion_start: int | None, offsets: torch.Tensor,
               decode_special_tokens: bool) -> list[str]:
        """Each row's text up to its stop: from `completion_start`, or from its first (unpadded) token."""
        bsz = self.sequence_ids.shape[0]
        texts = []
        for row in range(bsz):
            end = stopped_at[row] if stopped_at[row] is not None else self.sequence_ids.shape[-1]
            start = completion_start if completion_start is not None else int(-offsets[row]) if bsz > 1 else 0
            texts.append(decode_ids(self.tokenizer, self.sequence_ids[row, start:end].tolist(), decode_special_tokens))
        return texts
