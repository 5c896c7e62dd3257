"""xformers memory_efficient_attention: the fused path below sm_80 (its cutlass kernels run from sm_60).

Uniform causal batches use `LowerTriangularFromBottomRightMask` (bottom-right aligned, so a cache
is handled without materialising a mask). Padding, ragged paged batches and sliding windows use an
additive bias tensor built from `AttnMetadata.visibility`, whose rows xformers wants 16-byte
aligned: it is cut from a wider buffer and broadcast over heads with stride 0. Rows that see no
key output zeros, as in matmul. Logit softcapping is not supported, so the plan rejects xformers
for softcapped models. xformers is imported when a backend object is built, never at import.
"""

from __future__ import annotations

import torch

from .backend import (CHUNK_REFUSAL, AttentionBackend, fold_query_groups, nvidia_gpu_reasons, refuse_chunk,
                      refuse_softcap, repeat_kv, unfold_query_groups)
from ..installed import at_least
from .metadata import AttnMetadata

MIN_VERSION = (0, 0, 24)   # LowerTriangularFromBottomRightMask and a custom `scale`
MIN_CAPABILITY = (6, 0)
_ALIGN = 16                # elements; covers 16-byte alignment for fp16 and fp32 biases


def load_kernels():
    """Import xformers' entry points. Raises whatever a broken install raises."""
    from xformers.ops import memory_efficient_attention
    from xformers.ops.fmha.attn_bias import LowerTriangularFromBottomRightMask

    return memory_efficient_attention, LowerTriangularFromBottomRightMask()


def additive_bias(vis: torch.Tensor, dtype: torch.dtype, heads: int) -> torch.Tensor:
    """(B, 1, q, k) visibility -> (B, heads, q, k) bias of 0 / -inf with aligned row strides."""
    bsz, _, q_len, k_len = vis.shape
    width = -(-k_len // _ALIGN) * _ALIGN
    bias = torch.full((bsz, 1, q_len, width), float("-inf"), dtype=dtype, device=vis.device)[..., :k_len]
    bias.masked_fill_(vis, 0.0)
    return bias.expand(bsz, heads, q_len, k_len)


class XformersBackend(AttentionBackend):
    name = "xformers"

    def __init__(self, device: torch.device | str = "cuda", **options) -> None:
        super().__init__(device, **options)
        self._attention, self._causal = load_kernels()

    @classmethod
    def validate(cls, device, needs, installed) -> list[str]:
        reasons = nvidia_gpu_reasons(device)
        if reasons:
            return reasons
        if device.capability < MIN_CAPABILITY:
            reasons.append(f"needs sm_60+, {device.label} is {device.sm}")
        version = installed.xformers
        if version is None:
            reasons.append("not installed")
        elif not at_least(version, MIN_VERSION):
            reasons.append(f"version {version} is older than 0.0.24 (no bottom-right causal mask)")
        if needs.softcap:
            reasons.append("cannot apply attention logit softcapping")
        if needs.attention_chunk:       # its fast paths are causal masks; chunks are untested through its bias
            reasons.append(CHUNK_REFUSAL)
        return reasons

    def attend(self, q, k, v, meta: AttnMetadata, *, scale, window=0, softcap=0.0, chunk=0, decode_kernel=None):
        if softcap:
            raise refuse_softcap("xformers")
        if chunk:
            raise refuse_chunk("xformers")
        groups = q.shape[2] // k.shape[2]
        if meta.is_uniform and not window and meta.q_len == 1 and groups > 1:
            # decode: the query sees every key, so no bias; query heads folded instead of the cache repeated
            return unfold_query_groups(self._attention(fold_query_groups(q, groups), k, v, scale=scale))
        k = repeat_kv(k, groups)                                    # (B, k, Hq, D)
        v = repeat_kv(v, groups)
        if meta.is_full and not window:                             # non-causal, every key (vision towers)
            return self._attention(q, k, v, scale=scale)
        if meta.is_uniform and not window:
            return self._attention(q, k, v, attn_bias=self._causal, scale=scale)
        vis = meta.visibility(q.device, window)                     # (B, 1, q, k)
        out = self._attention(q, k, v, attn_bias=additive_bias(vis, q.dtype, q.shape[2]), scale=scale)
        seen = vis.any(-1).transpose(1, 2).unsqueeze(-1)            # (B, q, 1, 1)
        return out.masked_fill(~seen, 0.0)
