"""Quantized KV caches: FP8 (`ExLlamaV2Cache_8bit`) and Q4/Q6/Q8 (`ExLlamaV2Cache_Q4`, `_Q6`, `_Q8`).

Storage is compressed; attention works on full-precision working tensors (batch, max_seq_len, kv_heads,
head_dim) shared by all layers of one device. `get_kv_state` decodes into them and `store_kv_state` encodes
from them (the contract is in cache.py):
- contiguous: positions [offset, offset + width) of sequences 0..batch_size-1, both ways;
- paged (block_table and cache_seqlens given): get decodes each sequence's cached positions
  [0, cache_seqlens[b]) through its pages; store encodes [cache_seqlens[b] + offset, + width), the new tokens.
The conversions run through each device's ops table: the exllamav2_ext kernels on CUDA fp16 tensors where
the extension is loaded, their PyTorch twins (ops/kv_cache.py) otherwise; both touch exactly the same tokens.

Q storage per layer: codes uint8 (batch, max_seq_len, padded·bits/8) and scales fp16
(batch, max_seq_len, padded/32), padded = kv_heads·head_dim rounded up to a multiple of 64 (upstream's
(…, kv_heads, head_dim/wpe) layout flattened, so models whose heads are not a multiple of 64 wide work too).
Q6 is 8-bit keys with 4-bit values, as upstream. FP8 storage is uint8 with the working tensors' shape.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..ops import DeviceOps, kv_quant
from .base import ExLlamaV2CacheBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenWindow:
    """Which tokens of the (batch, max_seq_len) grid a conversion touches; mirrors TokenWindow in cuda/cache.h."""

    batch: int
    offset: int
    width: int
    seqlens: torch.Tensor | None = None        # (batch,) cached lengths; None: contiguous layout
    block_table: torch.Tensor | None = None    # (batch, pages_per_seq)
    page_size: int = 0
    start_at_seqlen: bool = False
    end_at_seqlen: bool = False

    @classmethod
    def for_call(
        cls,
        loading: bool,
        batch_size: int,
        offset: int,
        width: int,
        page_size: int,
        cache_seqlens: torch.Tensor | None,
        block_table: torch.Tensor | None,
        device: torch.device,
        grid: tuple[int, int],
    ) -> "TokenWindow":
        """The window of one get_kv_state (loading) or store_kv_state call on a (batch, max_seq_len) grid."""
        if block_table is None:
            if not (0 <= batch_size <= grid[0] and 0 <= offset and offset + width <= grid[1]):
                raise ValueError(
                    f"cache access to sequences [0, {batch_size}) x positions [{offset}, {offset + width}) is "
                    f"outside the cache's {grid[0]} x {grid[1]}; create the cache with a larger batch_size "
                    f"or max_seq_len"
                )
            return cls(batch_size, offset, width)
        if cache_seqlens is None or not page_size:
            raise ValueError("paged cache access needs block_table, cache_seqlens and page_size together")
        table = block_table.to(device, torch.int32).contiguous()
        seqlens = cache_seqlens.to(device, torch.int32).contiguous()
        if loading:   # everything cached so far; the table's capacity bounds it without a host sync
            return cls(table.shape[0], 0, table.shape[1] * page_size, seqlens, table, page_size, end_at_seqlen=True)
        return cls(table.shape[0], offset, width, seqlens, table, page_size, start_at_seqlen=True)

    def kernel_args(self) -> dict:
        return dict(
            batch=self.batch, offset=self.offset, width=self.width, seqlens=self.seqlens,
            block_table=self.block_table, page_size=self.page_size,
            start_at_seqlen=self.start_at_seqlen, end_at_seqlen=self.end_at_seqlen,
        )


class _EncodedCache(ExLlamaV2CacheBase):
    """Shared machinery: working tensors per device, windows, and the choice between kernels and twin."""

    def __init__(self, *args, **kwargs) -> None:
        self._working: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        super().__init__(*args, **kwargs)

    # subclass interface: per layer, convert the window between storage and a working tensor ------

    def _decode(self, layer_idx: int, is_value: bool, out: torch.Tensor, window: TokenWindow) -> None:
        raise NotImplementedError

    def _encode(self, layer_idx: int, is_value: bool, src: torch.Tensor, window: TokenWindow) -> None:
        raise NotImplementedError

    # shared ---------------------------------------------------------------------------------

    def working_footprint(self) -> int:
        return 2 * math.prod(self.kv_shape) * self.dtype.itemsize

    def working_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The device's full-precision key/value tensors (batch, max_seq_len, kv_heads, head_dim)."""
        device = torch.device(device)
        if device not in self._working:
            self._working[device] = (
                torch.zeros(self.kv_shape, dtype=self.dtype, device=device),
                torch.zeros(self.kv_shape, dtype=self.dtype, device=device),
            )
        return self._working[device]

    def _ops(self, device: torch.device) -> DeviceOps:
        return self.model.ops(device, self.dtype)

    def get_kv_state(self, layer_idx, batch_size, offset, width, page_size=0, cache_seqlens=None, block_table=None):
        (k, v), window = self._access(True, layer_idx, batch_size, offset, width, page_size, cache_seqlens,
                                      block_table)
        self._decode(layer_idx, False, k, window)
        self._decode(layer_idx, True, v, window)
        return k, v

    def store_kv_state(self, layer_idx, batch_size, offset, width, page_size=0, cache_seqlens=None, block_table=None):
        (k, v), window = self._access(False, layer_idx, batch_size, offset, width, page_size, cache_seqlens,
                                      block_table)
        self._encode(layer_idx, False, k, window)
        self._encode(layer_idx, True, v, window)

    def _access(self, loading: bool, layer_idx: int,
                *call_args) -> tuple[tuple[torch.Tensor, torch.Tensor], TokenWindow]:
        """The layer device's working tensors and the window one get (loading) or store call touches."""
        device = self.layer_device(layer_idx)
        window = TokenWindow.for_call(loading, *call_args, device, (self.batch_size, self.max_seq_len))
        return self.working_tensors(device), window

    def _clone_extra(self, new: "ExLlamaV2CacheBase") -> None:
        new._working = {}


class ExLlamaV2Cache_8bit(_EncodedCache):
    """FP8 cache: each value stored as the upper byte of its fp16 bit pattern."""

    def layer_storage(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"key_states": (self.kv_shape, torch.uint8), "value_states": (self.kv_shape, torch.uint8)}

    def _storage(self, layer_idx: int, is_value: bool) -> torch.Tensor:
        return (self.value_states if is_value else self.key_states)[layer_idx]

    def _decode(self, layer_idx, is_value, out, window):
        self._ops(out.device).fp8_to_fp16(self._storage(layer_idx, is_value), out, **window.kernel_args())

    def _encode(self, layer_idx, is_value, src, window):
        self._ops(src.device).fp16_to_fp8(src, self._storage(layer_idx, is_value), **window.kernel_args())


class _QCache(_EncodedCache):
    """Hadamard-rotated 4/8-bit cache with one fp16 scale per 32 elements (kv_quant.py)."""

    key_bits: int
    value_bits: int

    def __init__(self, *args, **kwargs) -> None:
        self.key_scales: list[torch.Tensor | None] = []
        self.value_scales: list[torch.Tensor | None] = []
        super().__init__(*args, **kwargs)

    @property
    def features(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def layer_storage(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        padded = kv_quant.padded_features(self.features)
        grid = (self.batch_size, self.max_seq_len)
        return {
            "key_states": ((*grid, padded * self.key_bits // 8), torch.uint8),
            "value_states": ((*grid, padded * self.value_bits // 8), torch.uint8),
            "key_scales": ((*grid, padded // kv_quant.GROUP), torch.float16),
            "value_scales": ((*grid, padded // kv_quant.GROUP), torch.float16),
        }

    def _storage(self, layer_idx: int, is_value: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
        if is_value:
            return self.value_states[layer_idx], self.value_scales[layer_idx], self.value_bits
        return self.key_states[layer_idx], self.key_scales[layer_idx], self.key_bits

    def _decode(self, layer_idx, is_value, out, window):
        codes, scales, bits = self._storage(layer_idx, is_value)
        self._ops(out.device).q_to_fp16(codes, scales, out, bits, **window.kernel_args())

    def _encode(self, layer_idx, is_value, src, window):
        codes, scales, bits = self._storage(layer_idx, is_value)
        self._ops(src.device).fp16_to_q(src, codes, scales, bits, **window.kernel_args())


class ExLlamaV2Cache_Q4(_QCache):
    key_bits = 4
    value_bits = 4


class ExLlamaV2Cache_Q6(_QCache):
    """Named for its average width: 8-bit keys, 4-bit values (upstream's layout)."""

    key_bits = 8
    value_bits = 4


class ExLlamaV2Cache_Q8(_QCache):
    key_bits = 8
    value_bits = 8
