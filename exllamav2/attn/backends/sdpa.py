"""PyTorch scaled_dot_product_attention, restricted to the kernels the plan allows on each device.

Below sm_80 only the mem-efficient and math kernels are allowed: SDPA's flash and cuDNN kernels
need sm_80+ and raise "FlashAttention only supports Ampere GPUs or newer" otherwise (tabbyAPI#135).
PyTorch checks the *current* CUDA device, not the tensor's, so every call also makes the tensor's
device current; on a mixed rig a tensor on a Turing card can then never pass an Ampere check.

Masks: plain `is_causal=True` is upper-left aligned, which is wrong whenever q_len != k_len (a
cache), so it is used only for q_len == k_len; uniform batches with a cache use
`causal_lower_right`; everything else (padding, ragged pages, sliding window, chunks) gets the boolean
visibility mask of `AttnMetadata`. Rows that see no key output zeros, as in matmul. A single query
position (decode) folds the query heads of each kv head into rows instead of repeating the cache.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
import torch.nn.functional as F

from .backend import (
    AttentionBackend, fold_query_groups, refuse_softcap, repeat_kv, run_decode_kernel, unfold_query_groups,
)
from ..devices import DeviceInfo
from ..installed import at_least
from .metadata import AttnMetadata

MIN_TORCH = (2, 3)  # torch.nn.attention.sdpa_kernel with a kernel list, and causal_lower_right

_KERNEL_ENUM = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}


def allowed_kernels(device: DeviceInfo) -> tuple[str, ...]:
    """SDPA kernels safe on `device`. cuDNN is left out everywhere: its masked paths have changed
    behaviour between cuDNN releases, and flash/efficient already cover sm_80+."""
    if not device.is_cuda:
        return ("flash", "math")            # the CPU's fused kernel is registered as FLASH_ATTENTION
    if device.capability >= (8, 0) and not device.rocm:
        return ("flash", "efficient", "math")
    return ("efficient", "math")


class SdpaBackend(AttentionBackend):
    name = "sdpa"
    runs_decode_kernel = True

    def __init__(self, device: torch.device | str = "cpu", kernels: tuple[str, ...] | None = None, **options) -> None:
        super().__init__(device, **options)
        from torch.nn.attention import SDPBackend

        if kernels is None:
            kernels = ("flash", "math") if self.device.type == "cpu" else ("efficient", "math")
        self.kernels = tuple(kernels)
        self._backends = [getattr(SDPBackend, _KERNEL_ENUM[k]) for k in self.kernels]

    @classmethod
    def validate(cls, device, needs, installed) -> list[str]:
        reasons = []
        if not at_least(installed.torch, MIN_TORCH):
            reasons.append(f"needs torch 2.3+ for sdpa_kernel and causal_lower_right (installed {installed.torch})")
        if needs.softcap:
            reasons.append("cannot apply attention logit softcapping")
        return reasons

    def attend(self, q, k, v, meta: AttnMetadata, *, scale, window=0, softcap=0.0, chunk=0, decode_kernel=None):
        out = run_decode_kernel(decode_kernel, q, k, v, meta, scale, window, softcap, chunk)
        if out is not None:
            return out
        if softcap:
            raise refuse_softcap("sdpa")
        groups = q.shape[2] // k.shape[2]
        fold = meta.q_len == 1 and groups > 1                       # decode: no copies of the cache
        if fold:
            qt = fold_query_groups(q, groups).transpose(1, 2)       # (B, Hkv, G, D)
            kt, vt = k.transpose(1, 2), v.transpose(1, 2)           # (B, Hkv, k, D)
        else:
            qt = q.transpose(1, 2)                                  # (B, Hq, q, D)
            kt = repeat_kv(k, groups).transpose(1, 2)               # (B, Hq, k, D)
            vt = repeat_kv(v, groups).transpose(1, 2)
        vis = None
        if meta.is_full and not window and not chunk:      # non-causal, every key (vision towers)
            causal, mask = False, None
        elif meta.is_uniform and not window and not chunk:
            causal = meta.q_len == meta.k_len and not fold
            # one query at the end of the sequence sees every key: no mask at all
            mask = None if causal or meta.q_len == 1 else _lower_right(meta.q_len, meta.k_len)
        else:
            causal = False
            vis = meta.visibility(q.device, window, chunk)          # (B, 1, q, k)
            mask = vis
        with ExitStack() as stack:
            stack.enter_context(torch.nn.attention.sdpa_kernel(self._backends))
            if q.device.type == "cuda":
                stack.enter_context(torch.cuda.device(q.device))
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=causal, scale=scale)
        if vis is not None:
            out = out.masked_fill(~vis.any(-1, keepdim=True), 0.0)  # rows that see no key
        return unfold_query_groups(out.transpose(1, 2)) if fold else out.transpose(1, 2)


def _lower_right(q_len: int, k_len: int):
    # imported on first use: torch.nn.attention.bias pulls in torch._dynamo (~1.5 s)
    from torch.nn.attention.bias import causal_lower_right

    return causal_lower_right(q_len, k_len)
