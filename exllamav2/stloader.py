"""Safetensors reading with the checks a user needs before a long load.

Headers of every file are parsed and checked up front (readable JSON, data inside the file), so a
truncated download or a corrupt shard fails with the file's name before any weight is loaded.
Tensors are then read through `safetensors` (memory-mapped; never pickle).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorFileError(ValueError):
    """A safetensors file is missing, truncated or malformed."""


def read_header(path: str | os.PathLike) -> dict:
    """Parse and validate one file's header; returns {tensor name: {dtype, shape, data_offsets}}."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise TensorFileError(f"{path}: file is {size} bytes, too short to be safetensors; re-download it")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > size - 8:
            raise TensorFileError(
                f"{path}: header claims {hlen} bytes but the file has {size}; the file is truncated or "
                f"not safetensors; re-download it"
            )
        try:
            header = json.loads(f.read(hlen))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TensorFileError(f"{path}: unreadable safetensors header ({e}); re-download the file") from e
    header.pop("__metadata__", None)
    data_size = size - 8 - hlen
    for name, info in header.items():
        start, end = info["data_offsets"]
        if end > data_size:
            raise TensorFileError(
                f"{path}: tensor {name!r} ends at byte {end} of the data section but the file holds only "
                f"{data_size}: the file is truncated; re-download it"
            )
    return header


class SafetensorsIndex:
    """Name -> file map over a model's shards, with lazy reads."""

    def __init__(self, files: list[str]) -> None:
        self.files = sorted(files)
        self.entries: dict[str, tuple[str, dict]] = {}
        for file in self.files:
            for name, info in read_header(file).items():
                self.entries[name] = (file, info)
        self._handles: dict[str, object] = {}

    def keys(self):
        return self.entries.keys()

    def has(self, name: str) -> bool:
        return name in self.entries

    def file_of(self, name: str) -> str:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][1]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self.entries[name][1]["dtype"]]

    def nbytes(self, name: str) -> int:
        start, end = self.entries[name][1]["data_offsets"]
        return end - start

    def get(self, name: str) -> torch.Tensor:
        if name not in self.entries:
            raise KeyError(f"tensor {name!r} not found in {', '.join(self.files)}")
        file = self.entries[name][0]
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(file, framework="pt", device="cpu")
        return handle.get_tensor(name)

    def close(self) -> None:
        self._handles.clear()
