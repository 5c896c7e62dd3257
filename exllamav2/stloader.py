"""Safetensors reading with the checks a user needs before a long load.

Headers of every file are parsed and checked up front (readable JSON, known dtypes, shapes that match
their byte ranges, data inside the file, no tensor in two files, every shard a
`model.safetensors.index.json` names present), so a truncated download or a corrupt shard fails with
the file's name before any weight is loaded. Tensors are then read through `safetensors`
(memory-mapped; never pickle) and checked for non-finite values as they are read, so a corrupt
payload names its tensor instead of surfacing as NaN logits.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import KeysView
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import MissingTensorError, ModelFileNotFoundError, TensorFileError

__all__ = ["SafetensorsIndex", "TensorFileError", "read_header", "check_shard_index"]

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_FIX = "the file is corrupt or truncated; re-download (or re-convert) it"

# float dtype -> (same-width integer view, mask of the sign bit's complement, smallest non-finite magnitude):
# a value is inf/NaN exactly when its bits, sign cleared, reach the all-ones exponent. Integer ops on a
# reused chunk run ~40x faster on the CPU than torch.isfinite on fp16 (which converts every element).
_NONFINITE_BITS = {
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
    torch.float8_e4m3fn: (torch.uint8, 0x7F, 0x7F),      # no inf; NaN is S.1111.111
    torch.float8_e5m2: (torch.uint8, 0x7F, 0x7C),
}
_CHUNK = 1 << 20
_MAX_HEADER = 100_000_000        # the safetensors library refuses larger headers


def has_nonfinite(tensor: torch.Tensor) -> bool:
    """Whether a floating point tensor holds inf or NaN, in one cache-friendly pass over its bits."""
    spec = _NONFINITE_BITS.get(tensor.dtype)
    if spec is None:
        return not bool(torch.isfinite(tensor).all())
    view_dtype, mask, limit = spec
    flat = tensor.contiguous().view(view_dtype).reshape(-1)
    buf = torch.empty(min(_CHUNK, flat.numel()), dtype=view_dtype, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK]
        bits = torch.bitwise_and(chunk, mask, out=buf[: chunk.numel()])
        if int(bits.max()) >= limit:
            return True
    return False


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(path: Path, name: str, info: object, data_size: int) -> None:
    """One header entry: {dtype: known, shape: [ints >= 0], data_offsets: [start, end]} sized to match."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise TensorFileError(f"{where}: header entry is {type(info).__name__}, not an object; {_FIX}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _DTYPES:
        raise TensorFileError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(_DTYPES)}); {_FIX}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise TensorFileError(f"{where}: shape {shape!r} is not a list of non-negative integers; {_FIX}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise TensorFileError(f"{where}: data_offsets {offsets!r} is not [start, end] with 0 <= start <= end; {_FIX}")
    start, end = offsets
    if end > data_size:
        raise TensorFileError(
            f"{where} ends at byte {end} of the data section but the file holds only {data_size}: "
            f"the file is truncated; re-download it"
        )
    expected = math.prod(shape) * _DTYPES[dtype].itemsize
    if end - start != expected:
        raise TensorFileError(
            f"{where}: shape {tuple(shape)} of {dtype} needs {expected} bytes but its data_offsets "
            f"[{start}, {end}] hold {end - start}; {_FIX}"
        )


def _check_layout(path: Path, header: dict, data_size: int) -> None:
    """Tensors may not overlap: safetensors refuses such a file later with a bare error."""
    spans = sorted((info["data_offsets"][0], info["data_offsets"][1], name) for name, info in header.items())
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise TensorFileError(f"{path}: tensors {a!r} and {b!r} overlap in the data section; {_FIX}")
    used = spans[-1][1] if spans else 0
    if used != data_size or any(s[0] != e[1] for s, e in zip(spans[1:], spans)) or (spans and spans[0][0]):
        raise TensorFileError(
            f"{path}: the tensors' data_offsets do not cover the {data_size}-byte data section exactly "
            f"(gaps or trailing bytes); {_FIX}"
        )


def read_header(path: str | os.PathLike) -> dict:
    """Parse and validate one file's header; returns {tensor name: {dtype, shape, data_offsets}}."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileNotFoundError(f"{path}: safetensors file not found; re-download the model's weights")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise TensorFileError(f"{path}: file is {size} bytes, too short to be safetensors; re-download it")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > _MAX_HEADER:
            raise TensorFileError(f"{path}: header claims {hlen} bytes (safetensors allows {_MAX_HEADER}); {_FIX}")
        if hlen > size - 8:
            raise TensorFileError(
                f"{path}: header claims {hlen} bytes but the file has {size}; the file is truncated or "
                f"not safetensors; re-download it"
            )
        try:
            header = json.loads(f.read(hlen))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TensorFileError(f"{path}: unreadable safetensors header ({e}); re-download the file") from e
    if not isinstance(header, dict):
        raise TensorFileError(f"{path}: safetensors header is a JSON {type(header).__name__}, not an object; {_FIX}")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise TensorFileError(f"{path}: __metadata__ must map strings to strings; {_FIX}")
    data_size = size - 8 - hlen
    for name, info in header.items():
        _check_entry(path, name, info, data_size)
    _check_layout(path, header, data_size)
    return header


def check_shard_index(files: list[str]) -> None:
    """A `*.safetensors.index.json` next to the shards must name only shards that exist.

    A download that lost one shard otherwise loads with tensors missing, and fails (or, for optional
    tensors, silently runs without them) far from the cause."""
    for folder in sorted({Path(f).parent for f in files}):
        for index_path in sorted(folder.glob("*.safetensors.index.json")):
            try:
                data = json.loads(index_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TensorFileError(f"{index_path}: unreadable JSON ({e}); re-download it") from e
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TensorFileError(f"{index_path}: no 'weight_map' of tensor name -> shard file; re-download it")
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    names = [k for k, v in weight_map.items() if v == shard]
                    raise ModelFileNotFoundError(
                        f"{index_path} maps {len(names)} tensors (e.g. {names[0]!r}) to {shard}, which is not "
                        f"in {folder}; the download is incomplete: fetch {shard} again"
                    )


class SafetensorsIndex:
    """Name -> file map over a model's shards, with lazy reads."""

    def __init__(self, files: list[str]) -> None:
        self.files = sorted(files)
        check_shard_index(self.files)
        self.entries: dict[str, tuple[str, dict]] = {}
        for file in self.files:
            for name, info in read_header(file).items():
                if name in self.entries:
                    raise TensorFileError(
                        f"tensor {name!r} is in both {self.entries[name][0]} and {file}; one of them does "
                        f"not belong to this model: remove it"
                    )
                self.entries[name] = (file, info)
        self._handles: dict[str, object] = {}

    def keys(self) -> KeysView[str]:
        return self.entries.keys()

    def has(self, name: str) -> bool:
        return name in self.entries

    def _entry(self, name: str) -> tuple[str, dict]:
        if name not in self.entries:
            raise MissingTensorError(f"tensor {name!r} not found in {', '.join(self.files)}")
        return self.entries[name]

    def file_of(self, name: str) -> str:
        return self._entry(name)[0]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[1]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._entry(name)[1]["dtype"]]

    def nbytes(self, name: str) -> int:
        start, end = self._entry(name)[1]["data_offsets"]
        return end - start

    def get(self, name: str) -> torch.Tensor:
        file = self._entry(name)[0]
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(file, framework="pt", device="cpu")
        tensor = handle.get_tensor(name)
        # One fast pass over data that is being read anyway: inf/NaN weights mean a corrupt file, and would
        # otherwise only show as NaN logits.
        if tensor.is_floating_point() and tensor.numel() and has_nonfinite(tensor):
            bad = int((~torch.isfinite(tensor.float())).sum())      # the error path: exactness over speed
            raise TensorFileError(
                f"{file}: tensor {name!r} holds {bad} non-finite values (inf/NaN); {_FIX}"
            )
        return tensor

    def close(self) -> None:
        self._handles.clear()
