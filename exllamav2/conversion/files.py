"""Crash-safe writes for the conversion job: every file appears whole or not at all.

A conversion can be killed (SIGKILL, power loss) or run out of disk at any byte. Each file is written
under a temporary name in its own directory and renamed into place (os.replace is atomic on POSIX), so
a resumed job never reads half a checkpoint and a model directory never holds half a shard under its
final name. A full disk (or quota) becomes one ConversionError naming the file, the free space and the
fix; the temporary file is removed.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ..errors import ConversionError

TMP_SUFFIX = ".tmp"
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# safetensors reports I/O failures as SafetensorError (an Exception) with the OS message inside
_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "File too large",
               f"os error {errno.ENOSPC})", f"os error {errno.EDQUOT})")


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        return True
    return any(text in str(exc) for text in _FULL_TEXTS)


def _free_bytes(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 1024**2:.1f} MiB"
    except OSError:
        return "unknown"


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then rename tmp -> path; a full disk becomes ConversionError and leaves no tmp file."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise ConversionError(
                f"disk full while writing {path} ({_free_bytes(path.parent)} free on its file system): free "
                f"space there, then run convert.py again with the same -o to resume where it stopped"
            ) from e
        raise


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    _write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def write_text(path: Path, text: str) -> None:
    _write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def copy_file(src: Path, dst: Path) -> None:
    _write_atomically(dst, lambda tmp: shutil.copy2(src, tmp))


def remove_outputs(out_dir: Path) -> None:
    """Remove what an earlier, interrupted compile wrote into out_dir (config.json first, so the directory
    stops looking like a model at once), before it is written again."""
    for name in ("config.json", "output.safetensors"):
        (out_dir / name).unlink(missing_ok=True)
    for pattern in ("output-*-of-*.safetensors", "output-*.part", f"*{TMP_SUFFIX}"):
        for path in out_dir.glob(pattern):
            path.unlink(missing_ok=True)
