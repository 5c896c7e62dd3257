"""What every attention backend is told about one forward pass: which keys each query may see.

Built once per forward by the model and shared by all layers. Backends never look at the cache
object or the config; they get tensors plus this description.

Visibility rule (the contract every backend implements, `matmul.py` is its reference):
query i of sequence b sits at absolute position ``p = past_len[b] + i`` and may see key j iff
    j <= p                                   (causal, aligned bottom-right when q_len < k_len)
    and j < key_lengths[b]                   (ragged / paged batches)
    and key_mask[b, j]                       (left padding from ``input_mask``)
    and p - j < window                       (sliding window, when the layer has one)
    and (p + o) // chunk == (j + o) // chunk (chunked local attention, when the layer has it; o is
                                              position_offsets[b], so that chunks start at each sequence's
                                              own position 0 whatever its left padding)
A query row that sees no key at all (a pad position) outputs zeros. A non-causal description (`causal=False`,
vision towers) drops the first rule; `segments` (block-diagonal attention: one segment per image or window)
adds ``segments[b, p] == segments[b, j]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass(frozen=True)     # derived values are kept, so the description must not change
class AttnMetadata:
    batch_size: int
    q_len: int
    k_len: int                                  # keys handed to the backend (dim 1 of k and v)
    past_len: int | torch.Tensor = 0            # int (same for all) or LongTensor (B,)
    key_lengths: torch.Tensor | None = None     # LongTensor (B,) valid keys per sequence; None: all k_len
    key_mask: torch.Tensor | None = None        # BoolTensor (B, k_len), True = may attend
    # LongTensor (B,): the (RoPE) position of key 0 of each sequence; None: 0 for all. Left padding gives negative
    # offsets (a sequence starts at position 0 after its pads)
    position_offsets: torch.Tensor | None = None
    causal: bool = True                         # False: every query may see keys after it (vision towers)
    segments: torch.Tensor | None = None        # LongTensor (B, k_len): block-diagonal, queries see their segment
    # what backends derive from this description; every layer of the forward would otherwise derive it again
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def derived(self, key: Any, compute: Callable[[], Any]) -> Any:
        """`compute()` the first time `key` is asked for, the same object afterwards."""
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]

    @property
    def is_uniform(self) -> bool:
        """Plain causal attention: one past length, all keys valid, keys end where queries end."""
        return (
            self.causal
            and self.segments is None
            and isinstance(self.past_len, int)
            and self.key_lengths is None
            and self.key_mask is None
            and self.past_len + self.q_len == self.k_len
        )

    @property
    def is_full(self) -> bool:
        """Non-causal attention of every query to every key (a vision tower's block): no mask at all."""
        return not self.causal and self.segments is None and self.key_lengths is None and self.key_mask is None

    def positions(self, device: torch.device) -> torch.Tensor:
        """Absolute query positions, LongTensor (B, q_len)."""
        base = torch.arange(self.q_len, device=device).unsqueeze(0)
        past = self.past_len
        if isinstance(past, torch.Tensor):
            return base + past.to(device).long().view(-1, 1)
        return (base + past).expand(self.batch_size, -1)

    def visibility(self, device: torch.device, window: int = 0, chunk: int = 0) -> torch.Tensor:
        """BoolTensor (B, 1, q_len, k_len): True where query may attend to key (built once per device, window
        and chunk)."""
        return self.derived(("visibility", torch.device(device), window, chunk),
                            lambda: self._visibility(device, window, chunk))

    def _visibility(self, device: torch.device, window: int, chunk: int = 0) -> torch.Tensor:
        qpos = self.positions(device).unsqueeze(-1)                   # (B, q, 1)
        kpos = torch.arange(self.k_len, device=device).view(1, 1, -1)  # (1, 1, k)
        vis = kpos <= qpos if self.causal else torch.ones_like(kpos <= qpos)
        if self.segments is not None:
            seg = self.segments.to(device)
            q_seg = torch.gather(seg, 1, self.positions(device).clamp(max=self.k_len - 1))
            vis = vis & (q_seg.unsqueeze(-1) == seg.unsqueeze(1))
        if window:
            vis = vis & (qpos - kpos < window)
        if chunk:
            vis = vis & self._same_chunk(qpos, kpos, chunk)
        if self.key_lengths is not None:
            vis = vis & (kpos < self.key_lengths.to(device).view(-1, 1, 1))
        if self.key_mask is not None:
            vis = vis & self.key_mask.to(device).bool().unsqueeze(1)
        return vis.unsqueeze(1)

    def _same_chunk(self, qpos: torch.Tensor, kpos: torch.Tensor, chunk: int) -> torch.Tensor:
        """(B, q, k): whether query and key fall in the same chunk of `chunk` positions of their sequence."""
        offset = 0 if self.position_offsets is None else self.position_offsets.to(qpos.device).long().view(-1, 1, 1)
        return (qpos + offset).div(chunk, rounding_mode="floor") == (kpos + offset).div(chunk, rounding_mode="floor")


def paged_metadata(cache_seqlens: torch.Tensor, q_len: int, max_key_len: int | None = None) -> AttnMetadata:
    """The metadata of a paged batch: q_len new tokens after cache_seqlens[b] cached ones per sequence; keys
    gathered up to the longest sequence (`max_key_len` when the caller knows it, else read from the tensor)."""
    seqlens = cache_seqlens.long() + q_len
    k_len = max_key_len if max_key_len is not None else int(seqlens.max())
    return AttnMetadata(batch_size=cache_seqlens.shape[0], q_len=q_len, k_len=k_len,
                        past_len=cache_seqlens.long(), key_lengths=seqlens)


def block_diagonal_metadata(lengths: list[int]) -> AttnMetadata:
    """Non-causal attention of one packed sequence of blocks (`lengths` tokens each): every token sees exactly
    the tokens of its own block (the images, or the windows, of a vision tower's packed input)."""
    total = sum(lengths)
    segments = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
    return AttnMetadata(batch_size=1, q_len=total, k_len=total, causal=False,
                        segments=None if len(lengths) == 1 else segments.view(1, -1))
