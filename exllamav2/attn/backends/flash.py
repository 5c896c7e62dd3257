"""flash-attn 2.x: `flash_attn_func` for uniform causal batches, `flash_attn_varlen_func` for padded
or ragged ones, `flash_attn_with_kvcache` with block tables for paged decode. flash_attn is
imported when a backend object is built, never at import.

flash-attn needs sm_80+ on every device it runs on (its kernels raise "FlashAttention only
supports Ampere GPUs or newer" below that), and its causal mask is bottom-right aligned (2.1+),
which is the alignment a KV cache needs. Varlen packs, per sequence, the queries that see any key
and the one run of keys they see; a mask that is not such a run (a hole in `input_mask`) goes to
the fallback backend the plan chose (SDPA, or matmul when SDPA can't serve the model). Non-causal
attention over all keys (a vision tower's block) runs flash_attn_func with causal=False; a block-diagonal mask
goes to the fallback.
"""

from __future__ import annotations

import torch

from .backend import CHUNK_REFUSAL, AttentionBackend, nvidia_gpu_reasons, refuse_chunk
from ..installed import at_least, find_installed
from .matmul import MatmulBackend
from .metadata import AttnMetadata

MIN_VERSION = (2, 2, 1)
PAGED_VERSION = (2, 5, 7)     # block_table in flash_attn_with_kvcache
WINDOW_VERSION = (2, 3)
SOFTCAP_VERSION = (2, 6)
PAGE_MULTIPLE = 256           # flash-attn's paged kernel wants pages of a multiple of 256 tokens


def load_kernels():
    """Import flash_attn's entry points. Raises whatever a broken install raises."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

    return flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache


def varlen_layout(meta: AttnMetadata) -> list[tuple[int, int, int, int]] | None:
    """(sequence, first query row that sees a key, first key, end key) for each sequence whose
    queries see anything, when every sequence's valid keys form one run that ends at its last
    query (what bottom-right varlen attention computes); None when some sequence's do not."""
    keys = torch.arange(meta.k_len)
    valid = torch.ones(meta.batch_size, meta.k_len, dtype=torch.bool)
    if meta.key_mask is not None:
        valid &= meta.key_mask.cpu().bool()
    if meta.key_lengths is not None:
        valid &= keys < meta.key_lengths.cpu().view(-1, 1)
    count = valid.sum(1)
    first = valid.int().argmax(1)
    run = (keys >= first.view(-1, 1)) & (keys < (first + count).view(-1, 1))
    past = meta.past_len.cpu().long() if isinstance(meta.past_len, torch.Tensor) else torch.full_like(count, meta.past_len)
    seen = count > 0
    if not torch.equal(run, valid) or not torch.equal((first + count)[seen], (past + meta.q_len)[seen]):
        return None
    return [
        (b, max(0, s - p), s, s + n)
        for b, (s, n, p) in enumerate(zip(first.tolist(), count.tolist(), past.tolist()))
        if n
    ]


def _options(window: int, softcap: float) -> dict:
    """Keyword arguments only when used, so versions without them still work for other models."""
    options = {}
    if window:
        options["window_size"] = (window - 1, 0)   # keys p-(window-1) .. p: p - j < window
    if softcap:
        options["softcap"] = softcap
    return options


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"

    def __init__(
        self,
        device: torch.device | str = "cuda",
        paged_native: bool | None = None,
        fallback: AttentionBackend | None = None,
        **options,
    ) -> None:
        super().__init__(device, **options)
        self._func, self._varlen, self._kvcache = load_kernels()
        if paged_native is None:
            paged_native = self.paged_mode(find_installed()) == "block_table"
        self.paged_native = paged_native
        self.fallback = fallback or MatmulBackend(self.device)

    @classmethod
    def validate(cls, device, needs, installed) -> list[str]:
        reasons = nvidia_gpu_reasons(device)
        if reasons:
            return reasons
        if device.capability < (8, 0):
            reasons.append(f"needs sm_80+, {device.label} is {device.sm}")
        version = installed.flash_attn
        if version is None:
            reasons.append("not installed")
        elif not at_least(version, MIN_VERSION):
            reasons.append(f"version {version} is older than 2.2.1")
        else:
            if needs.sliding_window and not at_least(version, WINDOW_VERSION):
                reasons.append(f"sliding window needs flash-attn 2.3+ (installed {version})")
            if needs.softcap and not at_least(version, SOFTCAP_VERSION):
                reasons.append(f"logit softcapping needs flash-attn 2.6+ (installed {version})")
        if needs.dtype not in ("float16", "bfloat16"):
            reasons.append(f"needs float16 or bfloat16, the model runs {needs.dtype}")
        if needs.attention_chunk:       # its masks are causal (+ window) runs: a chunk boundary is not one
            reasons.append(CHUNK_REFUSAL)
        if needs.head_dim > 256 or needs.head_dim % 8:
            reasons.append(f"head_dim {needs.head_dim} unsupported (needs a multiple of 8 up to 256)")
        return reasons

    @classmethod
    def paged_mode(cls, installed) -> str:
        return "block_table" if at_least(installed.flash_attn, PAGED_VERSION) else "gather"

    def attend(self, q, k, v, meta: AttnMetadata, *, scale, window=0, softcap=0.0, chunk=0, decode_kernel=None):
        if chunk:
            raise refuse_chunk("flash_attn")
        if meta.is_full and not window:                 # non-causal, every key (vision towers): flash-attn's own
            return self._func(q, k, v, softmax_scale=scale, causal=False, **_options(0, softcap))
        if not meta.causal:
            return self.fallback.attend(q, k, v, meta, scale=scale, window=window, softcap=softcap)
        options = dict(softmax_scale=scale, causal=True, **_options(window, softcap))
        if meta.is_uniform:
            # flash-attn handles GQA itself and aligns the causal mask bottom-right
            return self._func(q, k, v, **options)
        layout = meta.derived("flash_varlen_layout", lambda: varlen_layout(meta))    # one host sync per forward
        if layout is None:
            return self.fallback.attend(q, k, v, meta, scale=scale, window=window, softcap=softcap)
        out = torch.zeros_like(q)                                   # rows that see no key stay zero
        if not layout:
            return out
        q_lens = [q.shape[1] - row for _, row, _, _ in layout]
        k_lens = [end - start for _, _, start, end in layout]
        cu_q = torch.tensor([0, *q_lens], device=q.device).cumsum(0, dtype=torch.int32)
        cu_k = torch.tensor([0, *k_lens], device=q.device).cumsum(0, dtype=torch.int32)
        packed = self._varlen(
            torch.cat([q[b, row:] for b, row, _, _ in layout]),     # (sum q_lens, Hq, D)
            torch.cat([k[b, start:end] for b, _, start, end in layout]),
            torch.cat([v[b, start:end] for b, _, start, end in layout]),
            cu_q, cu_k, max(q_lens), max(k_lens), **options,
        )
        for (b, row, _, _), part in zip(layout, packed.split(q_lens)):
            out[b, row:] = part
        return out

    def attend_paged(
        self, q, k_new, v_new, k_pages, v_pages, block_table, cache_seqlens, *, scale, window=0, softcap=0.0,
        chunk=0, meta=None, kernel=None, decode_kernel=None, paged_decode_kernel=None,
    ):
        if chunk:
            raise refuse_chunk("flash_attn")
        # its block-table kernel is causal: a non-causal span (an image's tokens) gathers the pages instead
        if not self.paged_native or k_pages.shape[1] % PAGE_MULTIPLE or (meta is not None and not meta.causal):
            return super().attend_paged(
                q, k_new, v_new, k_pages, v_pages, block_table, cache_seqlens,
                scale=scale, window=window, softcap=softcap, meta=meta, kernel=kernel, decode_kernel=decode_kernel,
                paged_decode_kernel=paged_decode_kernel,
            )
        # appends k_new/v_new at cache_seqlens[b] in place, then attends over the whole sequence
        return self._kvcache(
            q,
            k_pages,
            v_pages,
            k=k_new,
            v=v_new,
            cache_seqlens=cache_seqlens.to(torch.int32),
            block_table=block_table.to(torch.int32),
            softmax_scale=scale,
            causal=True,
            **_options(window, softcap),
        )
