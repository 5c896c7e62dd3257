"""Per-forward attention parameters, as upstream's ExLlamaV2Attention.Params / PagedParams.

`Params` describes a contiguous batch (one past length for all sequences, optional left padding
through `input_mask` and RoPE `position_offsets`); `PagedParams` a paged batch from the dynamic
generator (per-sequence lengths and block tables over a cache viewed as pages). Either may carry MRoPE
positions (3, B, L) for a prompt with images (Qwen2-VL); without them RoPE uses the 1-D positions, which is
what MRoPE computes for text.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..attn.backends.metadata import AttnMetadata, paged_metadata
from ..errors import InputError


def _key_mask(input_mask: torch.Tensor | None, k_len: int, q_len: int) -> torch.Tensor | None:
    """Bool (B, k_len) key mask from upstream's input_mask: bool (True = keep) or additive (0 / -inf)."""
    if input_mask is None:
        return None
    mask = input_mask if input_mask.dtype == torch.bool else input_mask > -1.0
    if mask.dim() != 2:
        raise InputError(f"input_mask must be (batch, length), got shape {tuple(input_mask.shape)}")
    width = mask.shape[1]
    if width >= k_len:
        return mask[:, :k_len]
    if width == q_len:   # mask covers only the new tokens: earlier (cached) keys are all valid
        return torch.cat((mask.new_ones(mask.shape[0], k_len - q_len), mask), dim=1)
    raise InputError(
        f"input_mask has {width} columns but attention spans {k_len} keys ({k_len - q_len} cached + "
        f"{q_len} new); pass a mask covering the whole sequence or only the new tokens"
    )


class _PositionsMixin:
    """RoPE lookups and query positions, computed once per forward for each device."""

    def positions(self) -> torch.Tensor:
        raise NotImplementedError

    mrope_positions: torch.Tensor | None = None     # (3, B, L) MRoPE positions of the new tokens, or None
    # (start, end, causal) query spans, each attended in its own backend call (image_attention.py), set by the
    # model for each forward of a model whose image tokens attend bidirectionally; None: one causal span
    image_spans: list[tuple[int, int, bool]] | None = None

    def rope(self, tables) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for this batch from one device's RopeTables (3-D MRoPE positions where given)."""
        key = id(tables)
        if key not in self._rope and self.mrope_positions is not None:
            self._rope[key] = tables.lookup_mrope(self.mrope_positions)
        elif key not in self._rope:
            self._rope[key] = self._lookup_rope(tables)
        return self._rope[key]

    def _lookup_rope(self, tables) -> tuple[torch.Tensor, torch.Tensor]:
        return tables.lookup(self.positions())

    def positions_on(self, device: torch.device) -> torch.Tensor:
        """Query positions (B, L) on `device`, clamped at 0 (left-padding offsets can go below)."""
        if device not in self._positions:
            self._positions[device] = self.positions().clamp(min=0).to(device)
        return self._positions[device]

    def query_temperature(self, device: torch.device, floor_scale: float, attn_scale: float) -> torch.Tensor:
        """Llama 4's attention temperature of each query, (B, L, 1, 1) fp32 on `device`:
        1 + attn_scale * log(1 + floor((position + 1) / floor_scale)). By the sequence's own positions, so a
        left-padded sequence is scaled as it is alone (transformers counts cache slots, the same unpadded)."""
        key = (device, floor_scale, attn_scale)
        if key not in self._positions:
            pos = self.positions_on(device).float()
            scale = torch.log1p(torch.floor((pos + 1.0) / floor_scale)) * attn_scale + 1.0
            self._positions[key] = scale[..., None, None]
        return self._positions[key]


class Params(_PositionsMixin):
    paged = False

    def __init__(
        self,
        batch_size: int,
        seq_len: int,
        past_len: int,
        input_mask: torch.Tensor | None = None,
        position_offsets: torch.Tensor | None = None,
        mrope_positions: torch.Tensor | None = None,
    ) -> None:
        self.mrope_positions = mrope_positions
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.past_len = past_len
        self.input_mask = input_mask
        self.position_offsets = position_offsets
        self._rope: dict = {}
        self._positions: dict = {}
        self._meta: dict = {}

    def _lookup_rope(self, tables) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position_offsets is None:   # one run of positions for every row: slices, no index tensors
            return tables.lookup_range(self.past_len, self.seq_len, self.batch_size)
        return tables.lookup(self.positions())

    def positions(self) -> torch.Tensor:
        pos = torch.arange(self.past_len, self.past_len + self.seq_len).unsqueeze(0).expand(self.batch_size, -1)
        if self.position_offsets is not None:
            pos = pos + self.position_offsets.view(-1, 1).cpu().long()
        return pos


    def metadata(self, device: torch.device, span: tuple[int, int, bool] | None = None) -> AttnMetadata:
        """The whole forward's metadata, or a query span's (start, end, causal): its queries over the keys up to
        the span's end."""
        start, end, causal = span or (0, self.seq_len, True)
        if (device, start, end, causal) not in self._meta:
            k_len = self.past_len + self.seq_len
            mask = _key_mask(self.input_mask, k_len, self.seq_len)
            self._meta[device, start, end, causal] = AttnMetadata(
                batch_size=self.batch_size,
                q_len=end - start,
                k_len=self.past_len + end,
                past_len=self.past_len + start,
                key_mask=None if mask is None else mask[:, : self.past_len + end].to(device),
                position_offsets=None if self.position_offsets is None else
                self.position_offsets.view(-1).long().to(device),
                causal=causal,
            )
        return self._meta[device, start, end, causal]


class PagedParams(_PositionsMixin):
    paged = True

    def __init__(
        self,
        batch_size: int,
        block_index: torch.Tensor,
        cache_seqlens: torch.Tensor,
        max_cache_seqlen: int = 0,
        page_size: int = 256,
        q_len: int = 1,
        mrope_positions: torch.Tensor | None = None,
    ) -> None:
        self.mrope_positions = mrope_positions
        self.batch_size = batch_size
        self.block_index = block_index.int()
        self.cache_seqlens = cache_seqlens.int()
        self.max_cache_seqlen = max_cache_seqlen
        self.page_size = page_size
        self.seq_len = q_len
        self._rope: dict = {}
        self._positions: dict = {}
        self._dev: dict = {}
        self._meta: dict = {}

    def positions(self) -> torch.Tensor:
        return self.cache_seqlens.cpu().long().view(-1, 1) + torch.arange(self.seq_len)


    def paged_metadata(self, device: torch.device) -> AttnMetadata:
        """The batch's metadata on `device`, built once per forward for every layer there: the longest
        sequence comes from max_cache_seqlen (the generator knows it) or one read of the lengths, not one per
        layer."""
        if device not in self._meta:
            if not self.max_cache_seqlen:
                self.max_cache_seqlen = int(self.cache_seqlens.max())
            self._meta[device] = paged_metadata(self.on(device)[1], self.seq_len, self.max_cache_seqlen + self.seq_len)
        return self._meta[device]

    def span_metadata(self, device: torch.device, span: tuple[int, int, bool]) -> tuple[torch.Tensor, AttnMetadata]:
        """(cache lengths before the span, its metadata) for the queries of a span (start, end, causal), attended
        as if the tokens before it were cached already."""
        key = (device, *span)
        if key not in self._meta:
            start, end, causal = span
            self.paged_metadata(device)         # reads max_cache_seqlen where the caller left it out
            seqlens = self.on(device)[1] + start
            meta = paged_metadata(seqlens, end - start, self.max_cache_seqlen + end)
            self._meta[key] = seqlens, replace(meta, causal=causal)
        return self._meta[key]

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """block table and cache lengths on a device, moved once."""
        if device not in self._dev:
            self._dev[device] = (self.block_index.to(device), self.cache_seqlens.to(device))
        return self._dev[device]
