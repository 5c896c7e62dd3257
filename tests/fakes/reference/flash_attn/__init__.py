"""flash_attn 2.8.3's Python API written as plain PyTorch, from the library's documented semantics:

- q (B, Sq, Hq, D), k and v (B, Sk, Hk, D); Hq a multiple of Hk (MQA/GQA handled by the kernel).
- causal=True is aligned bottom-right: query i may attend key j only if j <= i + Sk - Sq.
- window_size=(left, right): query i attends keys in [i + Sk - Sq - left, i + Sk - Sq + right],
  -1 meaning unbounded; causal=True sets right to 0.
- softcap > 0: scores become softcap * tanh(scores / softcap) before the softmax.
- Only fp16 and bf16 inputs. Paged caches (block_table, int32) need pages of a multiple of 256
  tokens, cache_seqlens is int32, and flash_attn_with_kvcache writes k/v into the cache in place.
"""

import torch

__version__ = "2.8.3"


def _check_dtype(*tensors):
    for t in tensors:
        if t.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError("FlashAttention only support fp16 and bf16 data type")


def _one_sequence(q, k, v, scale, causal, window_size, softcap):
    """q (Sq, Hq, D), k/v (Sk, Hk, D) -> (Sq, Hq, D)."""
    sq, hq, d = q.shape
    sk, hk = k.shape[:2]
    k = k.repeat_interleave(hq // hk, dim=1).float()
    v = v.repeat_interleave(hq // hk, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(sq).view(-1, 1)
    j = torch.arange(sk).view(1, -1)
    diagonal = i + sk - sq
    left, right = window_size
    if causal:
        right = 0
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    if right >= 0:
        allowed &= j <= diagonal + right
    if left >= 0:
        allowed &= j >= diagonal - left
    scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    _check_dtype(q, k, v)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return torch.stack([_one_sequence(q[b], k[b], v[b], scale, causal, window_size, softcap) for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Sequences packed along dim 0: q (total_q, Hq, D), k/v (total_k, Hk, D); sequence i is rows
    cu_seqlens[i]:cu_seqlens[i+1] (int32), each attended on its own as in flash_attn_func."""
    _check_dtype(q, k, v)
    if cu_seqlens_q.dtype != torch.int32 or cu_seqlens_k.dtype != torch.int32:
        raise RuntimeError("cu_seqlens_q and cu_seqlens_k must have dtype int32")
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if max(b - a for a, b in zip(cq, cq[1:])) > max_seqlen_q or max(b - a for a, b in zip(ck, ck[1:])) > max_seqlen_k:
        raise RuntimeError("max_seqlen smaller than a sequence")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    parts = [
        _one_sequence(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]], scale, causal, window_size, softcap)
        for i in range(len(cq) - 1)
    ]
    return torch.cat(parts)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    _check_dtype(q, k_cache, v_cache)
    if block_table is None:
        raise NotImplementedError("the reference fake only implements the paged cache")
    if block_table.dtype != torch.int32 or cache_seqlens.dtype != torch.int32:
        raise RuntimeError("block_table and cache_seqlens must have dtype torch.int32")
    page = k_cache.shape[1]
    if page % 256:
        raise RuntimeError("Paged KV cache block size must be divisible by 256")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    outputs = []
    for b in range(q.shape[0]):
        start = int(cache_seqlens[b])
        new = 0 if k is None else k.shape[1]
        for t in range(new):
            pos = start + t
            k_cache[int(block_table[b, pos // page]), pos % page] = k[b, t]
            v_cache[int(block_table[b, pos // page]), pos % page] = v[b, t]
        length = start + new
        slots = [(int(block_table[b, p // page]), p % page) for p in range(length)]
        keys = torch.stack([k_cache[i, o] for i, o in slots])
        values = torch.stack([v_cache[i, o] for i, o in slots])
        outputs.append(_one_sequence(q[b], keys, values, scale, causal, window_size, softcap))
    return torch.stack(outputs)
