"""Fake flash_attn 2.8.3 as it behaves on a pre-Ampere GPU: imports fine, every call raises."""

import os

__version__ = "2.8.3"

if os.environ.get("FAKE_IMPORT_LOG"):
    with open(os.environ["FAKE_IMPORT_LOG"], "a") as log:
        log.write("flash_attn\n")


def _unsupported(*args, **kwargs):
    raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")


flash_attn_func = _unsupported
flash_attn_varlen_func = _unsupported
flash_attn_with_kvcache = _unsupported
