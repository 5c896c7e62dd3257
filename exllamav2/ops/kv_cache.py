"""The twins of exllamav2_ext's KV-cache conversion kernels (cuda/cache.cu), with their signatures: each
converts the tokens of one window of a (batch, max_seq_len) grid between a full-precision working tensor and
the compressed storage, contiguous or through pages. The codecs' arithmetic is in kv_quant.py."""

from __future__ import annotations

import torch

from . import kv_quant


def window_tokens(seq_len: int, *, batch: int, offset: int, width: int, seqlens: torch.Tensor | None = None,
                  block_table: torch.Tensor | None = None, page_size: int = 0, start_at_seqlen: bool = False,
                  end_at_seqlen: bool = False) -> torch.Tensor:
    """Flat indices into the (batch·seq_len) token axis of the tokens a window covers, as the kernels compute
    them: positions [offset, offset + width) of sequences 0..batch-1, shifted by each sequence's cached length
    (start_at_seqlen) or cut at it (end_at_seqlen), mapped through the block table when paged."""
    device = seqlens.device if seqlens is not None else torch.device("cpu")
    b = torch.arange(batch, device=device).view(-1, 1)
    j = torch.arange(width, device=device).view(1, -1)
    lo = torch.full_like(b, offset)
    if seqlens is not None and start_at_seqlen:
        lo = lo + seqlens.long().view(-1, 1)
    hi = lo + width
    if seqlens is not None and end_at_seqlen:
        hi = torch.minimum(hi, seqlens.long().view(-1, 1))
    pos = lo + j
    valid = (pos < hi) & (pos >= 0)
    if block_table is None:
        return (b * seq_len + pos)[valid]
    pages_per_seq = block_table.shape[1]
    page = pos // page_size
    valid &= page < pages_per_seq
    slots = torch.gather(block_table.long(), 1, page.clamp(0, pages_per_seq - 1))
    return (slots * page_size + pos % page_size)[valid]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(batch, seq, ...) -> (batch·seq, per-token elements) view."""
    return t.view(t.shape[0] * t.shape[1], -1)


def _tokens(storage: torch.Tensor, device: torch.device, window: dict) -> torch.Tensor:
    return window_tokens(storage.shape[1], **window).to(device)


def fp8_to_fp16(stored: torch.Tensor, out: torch.Tensor, **window) -> None:
    idx = _tokens(stored, out.device, window)
    _rows(out)[idx] = kv_quant.fp8_dequantize(_rows(stored)[idx], out.dtype)


def fp16_to_fp8(src: torch.Tensor, stored: torch.Tensor, **window) -> None:
    idx = _tokens(stored, src.device, window)
    _rows(stored)[idx] = kv_quant.fp8_quantize(_rows(src)[idx])


def q_to_fp16(codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, bits: int, **window) -> None:
    idx = _tokens(codes, out.device, window)
    features = _rows(out).shape[1]
    _rows(out)[idx] = kv_quant.dequantize(_rows(codes)[idx], _rows(scales)[idx], bits, features, out.dtype)


def fp16_to_q(src: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bits: int, **window) -> None:
    idx = _tokens(codes, src.device, window)
    c, s = kv_quant.quantize(_rows(src)[idx], bits)
    _rows(codes)[idx] = c
    _rows(scales)[idx] = s
