"""The GPTQ weight format (4-bit), as upstream loads it (shared/reference/upstream-api-and-exl2-format.md §3.10).

qweight [K/8, N] int32: row k is nibble k%8 of word row k/8. qzeros [G, N/8] int32: column n is nibble
n%8. scales [G, N]. Row k belongs to group g_idx[k], or k // group_size without a g_idx, where
group_size is the smallest power of two >= K/G. w = fp16( fp16(q - (z + 1)) * scale ).
checkpoint_format "gptq_v2" stores z + 1: upstream subtracts 0x11111111 from each qzeros word (a plain
int32 subtraction, borrows included) and then uses the v1 formula.
"""

from __future__ import annotations

import torch

_NIBBLE_SHIFTS = torch.arange(0, 32, 4)


def unpack_rows(qweight: torch.Tensor) -> torch.Tensor:
    """[K/8, C] int32 -> [K, C] int32 codes (0..15)."""
    kw, c = qweight.shape
    codes = (qweight.unsqueeze(1) >> _NIBBLE_SHIFTS.to(qweight.device).view(1, 8, 1)) & 0xF
    return codes.reshape(kw * 8, c)


def unpack_columns(qzeros: torch.Tensor) -> torch.Tensor:
    """[G, C/8] int32 -> [G, C] int32 (0..15)."""
    g, cw = qzeros.shape
    codes = (qzeros.unsqueeze(-1) >> _NIBBLE_SHIFTS.to(qzeros.device)) & 0xF
    return codes.reshape(g, cw * 8)


def offset_qzeros_v2(qzeros: torch.Tensor) -> torch.Tensor:
    """gptq_v2 -> v1 zeros: each int32 word minus 0x11111111, wrapping as int32 arithmetic does."""
    u = (qzeros.to(torch.int64) - 0x11111111) & 0xFFFFFFFF
    return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32)


def default_group_size(in_features: int, num_groups: int) -> int:
    """Smallest power of two >= K/G, as upstream infers it."""
    size = 1
    while size * num_groups < in_features:
        size *= 2
    return size


def row_groups(in_features: int, num_groups: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    """Each row's group index (int64 [K]). An all-zero g_idx counts as absent, as upstream treats it."""
    if g_idx is None or not bool(g_idx.any()):
        return torch.arange(in_features) // default_group_size(in_features, num_groups)
    return g_idx.to(torch.int64).cpu()


def dequantize_into(
    out: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    groups: torch.Tensor,
    col_start: int = 0,
) -> None:
    """Write W[:, col_start : col_start + out.shape[1]] into `out` [K, c] (c, col_start multiples of 8).
    `qzeros` are v1 zeros; `groups` is row_groups(...) on out's device."""
    c = out.shape[1]
    q = unpack_rows(qweight[:, col_start : col_start + c])
    z1 = unpack_columns(qzeros[:, col_start // 8 : (col_start + c) // 8]) + 1
    s = scales[:, col_start : col_start + c]
    # q - (z+1) is in -16..14 and the fp32 product with an fp16 scale is exact: one rounding to fp16.
    w = (q - z1[groups]).to(torch.float32) * s[groups].to(torch.float32)
    out.copy_(w.to(torch.float16))
