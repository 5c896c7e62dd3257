"""Attention: one selector (`selector.py`) plans a backend per device; backends live one per module.

Importing this package probes nothing and imports no kernel package. Upstream's module flags
(`has_flash_attn`, `has_flash_attn_with_paged`, `has_flash_attn_with_window`,
`has_flash_attn_with_softcap`, `has_xformers`, `has_lower_right_sdpa`) are computed on first access
(see `resolve.machine_flags`), and upstream's `ExLlamaV2Attention` (the model kit's attention layer) is
loaded on first access.
"""

from __future__ import annotations

from typing import Any

from .backends.backend import AttentionBackend
from .devices import DeviceInfo
from .env import AttentionConfigError
from .installed import InstalledBackends
from .backends.metadata import AttnMetadata
from .resolve import assert_paged_attn, resolve_attention
from .selector import AttentionPlan, AttnFlags, DevicePlan, ModelNeeds, plan_attention

_FLAGS = (
    "has_flash_attn",
    "has_flash_attn_with_paged",
    "has_flash_attn_with_window",
    "has_flash_attn_with_softcap",
    "has_xformers",
    "has_lower_right_sdpa",
)


def __getattr__(name: str) -> Any:
    if name in _FLAGS:
        from .resolve import machine_flags

        return machine_flags()[name]
    if name == "ExLlamaV2Attention":
        from ..model.attention import ExLlamaV2Attention

        return ExLlamaV2Attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# the lazy names stay out of __all__ so that a star import probes nothing
__all__ = [
    "AttentionBackend",
    "AttentionConfigError",
    "AttentionPlan",
    "AttnFlags",
    "AttnMetadata",
    "DeviceInfo",
    "DevicePlan",
    "InstalledBackends",
    "ModelNeeds",
    "assert_paged_attn",
    "plan_attention",
    "resolve_attention",
]
