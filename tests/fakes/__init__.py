"""Helpers to put one folder of fake attention packages on sys.path for a test (see README.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FAKES = Path(__file__).resolve().parent
FAKE_PACKAGES = ("flash_attn", "xformers")


def forget_fake_modules() -> None:
    """Drop any fake package a test imported, so the next test starts clean."""
    for name in [m for m in sys.modules if m.split(".")[0] in FAKE_PACKAGES]:
        del sys.modules[name]


def use_fakes(monkeypatch: pytest.MonkeyPatch, folder: str) -> Path:
    """Prepend tests/fakes/<folder> to sys.path for this test (monkeypatch undoes it)."""
    path = FAKES / folder
    forget_fake_modules()
    monkeypatch.syspath_prepend(str(path))
    return path
