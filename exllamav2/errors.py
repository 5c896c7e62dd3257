"""The project's errors. Each also subclasses the builtin a caller would catch for it, so existing
`except ValueError` / `except FileNotFoundError` clauses keep working."""

from __future__ import annotations


class ExLlamaV2Error(Exception):
    """Base of every error this package raises on purpose (bad input, not a bug)."""


class ConfigError(ExLlamaV2Error, ValueError):
    """config.json is missing, malformed or describes something we cannot run."""


class ArchitectureError(ConfigError):
    """The checkpoint's architecture is not one this package knows how to run."""


class CheckpointError(ExLlamaV2Error, ValueError):
    """The checkpoint's tensors do not match the layout its config.json describes."""
