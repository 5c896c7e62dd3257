"""Which attention packages are installed, and their versions, found without importing them.

Importing flash_attn on a GPU it cannot run, or a broken build of it, is exactly what must not happen
while planning; so this module only reads package metadata and module specs.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch

_VERSION_LINE = re.compile(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", re.MULTILINE)


@dataclass(frozen=True)
class InstalledBackends:
    torch: str | None = None        # version strings; None = not installed
    flash_attn: str | None = None
    xformers: str | None = None

    def version(self, package: str) -> str | None:
        return getattr(self, package)


def version_tuple(version: str) -> tuple[int, ...]:
    """Leading numeric parts: '2.6.3.post1' -> (2, 6, 3), '2.13.0+cu128' -> (2, 13, 0)."""
    parts = []
    for piece in re.split(r"[.+]", version):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
        if match.group() != piece:
            break
    return tuple(parts)


def at_least(version: str | None, minimum: tuple[int, ...]) -> bool:
    return version is not None and version_tuple(version) >= minimum


def package_version(module: str, *dists: str) -> str | None:
    """Version of an installed top-level module, or None. Never imports it.

    Reads the distribution metadata; for a module without metadata (a source checkout on the path)
    falls back to the `__version__ = "..."` line of its __init__.py, and to "unknown".
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for dist in dists or (module,):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    if spec.origin and spec.origin.endswith(".py"):
        try:
            match = _VERSION_LINE.search(Path(spec.origin).read_text(errors="replace"))
        except OSError:
            match = None
        if match:
            return match.group(1)
    return "unknown"


def find_installed() -> InstalledBackends:
    return InstalledBackends(
        torch=torch.__version__,
        flash_attn=package_version("flash_attn", "flash_attn", "flash-attn"),
        xformers=package_version("xformers"),
    )
