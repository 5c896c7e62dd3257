"""Backend name -> implementing class, imported only when asked for.

Importing one of these modules never imports its kernel package (flash_attn, xformers): that
happens when a backend object is constructed, so the selector can read every backend's `validate`.
"""

from __future__ import annotations

import importlib

from .backends.backend import AttentionBackend
from .env import BACKEND_NAMES, AttentionConfigError

_CLASS_PATHS = {
    "flash_attn": "exllamav2.attn.backends.flash:FlashAttnBackend",
    "xformers": "exllamav2.attn.backends.xformers:XformersBackend",
    "sdpa": "exllamav2.attn.backends.sdpa:SdpaBackend",
    "matmul": "exllamav2.attn.backends.matmul:MatmulBackend",
}
assert tuple(_CLASS_PATHS) == BACKEND_NAMES


def backend_class(name: str) -> type[AttentionBackend]:
    try:
        module, cls = _CLASS_PATHS[name].split(":")
    except KeyError:
        raise AttentionConfigError(
            f"unknown attention backend {name!r}; valid names: {', '.join(BACKEND_NAMES)}"
        ) from None
    return getattr(importlib.import_module(module), cls)
