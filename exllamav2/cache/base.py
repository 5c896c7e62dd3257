"""KV caches. Layout per layer: keys and values (batch, max_seq_len, kv_heads, head_dim).

`get_kv_state` hands attention full-precision tensors holding positions [offset, offset+width);
attention writes its new keys/values into them, then `store_kv_state` commits positions
[offset, offset+width) back to storage. The FP16 cache stores in those tensors directly, so both
are no-ops there; quantized caches dequantize into and quantize out of shared temporaries.
Paged use (the dynamic generator) views a batch-1 cache as pages of `PAGE_SIZE` tokens.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch

from ..tensor_p import tensor_parallel_missing
from ..errors import InputError

if TYPE_CHECKING:
    from ..model.model import ExLlamaV2

log = logging.getLogger(__name__)

PAGE_SIZE = 256


class ExLlamaV2CacheBase:
    """Shared bookkeeping: sizes, devices, current length. Subclasses own the storage."""

    def __init__(
        self,
        model: "ExLlamaV2",
        batch_size: int = 1,
        max_seq_len: int = -1,
        copy_from: "ExLlamaV2CacheBase | None" = None,
        lazy: bool = False,
        num_key_value_heads: int | None = None,
        fixed_device: torch.device | str | None = None,
    ) -> None:
        cfg = model.config
        self.model = model
        self.batch_size = batch_size
        self.max_seq_len = cfg.max_seq_len if max_seq_len == -1 else max_seq_len
        self.num_key_value_heads = num_key_value_heads or cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.num_hidden_layers = cfg.num_hidden_layers
        self.dtype = model.dtype
        self.fixed_device = torch.device(fixed_device) if fixed_device is not None else None
        self.current_seq_len = 0
        self.key_states: list[torch.Tensor | None] = [None] * self.num_hidden_layers
        self.value_states: list[torch.Tensor | None] = [None] * self.num_hidden_layers
        self.lazy = lazy
        if not lazy:
            self.create_state_tensors(copy_from)

    # storage -------------------------------------------------------------------------------

    def layer_device(self, layer_idx: int) -> torch.device:
        if self.fixed_device is not None:
            return self.fixed_device
        return self.model.layer_device(layer_idx)

    @property
    def kv_shape(self) -> tuple[int, int, int, int]:
        """One layer's keys (or values) at full precision: (batch, max_seq_len, kv_heads, head_dim)."""
        return (self.batch_size, self.max_seq_len, self.num_key_value_heads, self.head_dim)

    def layer_storage(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per layer: the name of each storage list (key_states, ...) and its tensor's shape and dtype."""
        raise NotImplementedError

    def create_state_tensors(self, copy_from: "ExLlamaV2CacheBase | None" = None) -> None:
        """Allocate every layer's storage on its layer's device (zeros, or a copy of `copy_from`'s)."""
        storage = self.layer_storage()
        lists: dict[str, list] = {name: [None] * self.num_hidden_layers for name in storage}
        for i in range(self.num_hidden_layers):
            dev = self.layer_device(i)
            for name, (shape, dtype) in storage.items():
                if copy_from is not None:
                    lists[name][i] = getattr(copy_from, name)[i].clone().to(dev)
                else:
                    lists[name][i] = torch.zeros(shape, dtype=dtype, device=dev)
        for name, tensors in lists.items():
            setattr(self, name, tensors)
        if copy_from is not None:
            self.current_seq_len = copy_from.current_seq_len
        self.lazy = False

    def get_kv_state(
        self,
        layer_idx: int,
        batch_size: int,
        offset: int,
        width: int,
        page_size: int = 0,
        cache_seqlens: torch.Tensor | None = None,
        block_table: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def store_kv_state(
        self,
        layer_idx: int,
        batch_size: int,
        offset: int,
        width: int,
        page_size: int = 0,
        cache_seqlens: torch.Tensor | None = None,
        block_table: torch.Tensor | None = None,
    ) -> None:
        raise NotImplementedError

    def all_tensors(self) -> list[torch.Tensor]:
        return [t for name in self.layer_storage() for t in getattr(self, name) if t is not None]

    def footprint(self) -> int:
        """Bytes held by the cache's storage."""
        return sum(t.numel() * t.element_size() for t in self.all_tensors())

    def footprint_per_layer(self) -> int:
        """Bytes one layer's storage will take, known before allocation (for placing a lazy cache)."""
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.layer_storage().values())

    def working_footprint(self) -> int:
        """Bytes of full-precision working tensors each device holding layers needs besides the storage."""
        return 0

    # bookkeeping ---------------------------------------------------------------------------

    def reset(self) -> None:
        self.current_seq_len = 0

    def roll_left(self) -> None:
        """Drop the oldest position of every sequence: positions shift down by one and
        current_seq_len shrinks by one (a sliding context without re-encoding the prompt)."""
        if self.current_seq_len < 1:
            raise ValueError("roll_left on an empty cache: there is no position to drop")
        n = self.current_seq_len
        for t in self.all_tensors():    # every storage tensor is (batch, max_seq_len, ...)
            t[:, : n - 1] = t[:, 1:n].clone()
        self.current_seq_len = n - 1

    def check_room(self, new_tokens: int) -> None:
        if self.current_seq_len + new_tokens > self.max_seq_len:
            raise InputError(
                f"cache overflow: {self.current_seq_len} tokens held + {new_tokens} new > "
                f"max_seq_len {self.max_seq_len}; create the cache with a larger max_seq_len "
                f"or drop old context"
            )

    def clone(self) -> "ExLlamaV2CacheBase":
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        for name in self.layer_storage():
            setattr(new, name, [None if t is None else t.clone() for t in getattr(self, name)])
        self._clone_extra(new)
        return new

    def _clone_extra(self, new: "ExLlamaV2CacheBase") -> None:
        """Subclasses with more storage copy it here."""

    def copy_states(
        self,
        target: "ExLlamaV2CacheBase",
        from_column: int,
        from_columns: int,
        to_column: int,
        to_columns: int,
        from_row: int,
        from_rows: int,
        to_row: int,
        to_rows: int,
    ) -> None:
        if from_columns != to_columns or from_rows != to_rows:
            raise ValueError("copy_states: source and target regions must have the same size")
        for src, dst in zip(self.all_tensors(), target.all_tensors()):
            dst[to_row : to_row + to_rows, to_column : to_column + to_columns].copy_(
                src[from_row : from_row + from_rows, from_column : from_column + from_columns]
            )


class ExLlamaV2Cache(ExLlamaV2CacheBase):
    """FP16 (the model's dtype) cache."""

    def layer_storage(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"key_states": (self.kv_shape, self.dtype), "value_states": (self.kv_shape, self.dtype)}

    def get_kv_state(self, layer_idx, batch_size, offset, width, page_size=0, cache_seqlens=None, block_table=None):
        return self.key_states[layer_idx], self.value_states[layer_idx]

    def store_kv_state(self, layer_idx, batch_size, offset, width, page_size=0, cache_seqlens=None, block_table=None):
        pass


class ExLlamaV2Cache_TP(ExLlamaV2CacheBase):
    """Upstream's tensor-parallel cache. Tensor parallelism is not implemented here (see tensor_p.py)."""

    def __init__(self, model: "ExLlamaV2", base: type | None = None, batch_size: int = 1, max_seq_len: int = -1) -> None:
        raise tensor_parallel_missing("ExLlamaV2Cache_TP")
