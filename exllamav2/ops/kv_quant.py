"""KV-cache quantization in PyTorch: the twin of the exllamav2_ext cache kernels (cuda/cache.cu) and the path
used without them (shared/reference/upstream-api-and-exl2-format.md §7).

FP8: the stored byte is the upper byte of the fp16 bit pattern (E5M2 by truncation, no rounding).

Q4 / Q8, per token of `feat` elements (kv_heads · head_dim), zero-padded to a multiple of 64:
- each chunk of 64 elements is rotated as two interleaved halves: the even elements 0, 2, .., 62 and the odd
  elements 1, 3, .., 63 each go through an unnormalised 32-point Walsh-Hadamard transform (Sylvester order,
  butterflies with strides 1, 2, 4, 8, 16); rotated position 2t holds even[t], 2t+1 holds odd[t];
- each 32 rotated positions share one fp16 scale absmax / 2^(b-1), and the codes are
  clamp(rint(v · 2^(b-1) / absmax) + 2^(b-1), 0, 2^b - 1);
- 4-bit codes pack two per byte (position e in the low nibble of byte e/2 when e is even, the high one when
  odd, i.e. nibble e%8 of little-endian word e/8); 8-bit codes one per byte.
Dequantization is (code - 2^(b-1)) · scale, the same butterflies, then × 1/32 (H·H = 32·I).
All arithmetic is fp32 in the kernels' order of operations, so codes and values match the kernels exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64          # elements rotated together
GROUP = 32          # elements per scale


def padded_features(feat: int) -> int:
    """Per-token element count of Q storage: `feat` rounded up to a multiple of 64."""
    return -(-feat // CHUNK) * CHUNK


def fp8_quantize(x: torch.Tensor) -> torch.Tensor:
    """uint8 tensor of x's shape: the upper byte of each fp16 value."""
    bits = x.to(torch.float16).view(torch.int16)
    return ((bits >> 8) & 0xFF).to(torch.uint8)


def fp8_dequantize(q: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The fp16 values whose upper bytes are q (lower bytes zero), converted to dtype."""
    bits = q.to(torch.int32) << 8
    bits = torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16)
    return bits.view(torch.float16).to(dtype)


def hadamard32(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised 32-point Walsh-Hadamard transform over the last dim (fp32), butterfly by butterfly as
    the kernel's warp shuffles do it: at stride m, entry i pairs with i^m; the lower keeps the sum and the
    upper gets lower - upper."""
    lead = x.shape[:-1]
    for m in (1, 2, 4, 8, 16):
        v = x.reshape(*lead, GROUP // (2 * m), 2, m)
        lo, hi = v[..., 0, :], v[..., 1, :]
        x = torch.stack((lo + hi, lo - hi), dim=-2).reshape(*lead, GROUP)
    return x


def _rotate(chunks: torch.Tensor) -> torch.Tensor:
    """[..., 64] in element order -> rotated [..., 64] in position order (2t: even half, 2t+1: odd half)."""
    lanes = chunks.reshape(*chunks.shape[:-1], GROUP, 2).transpose(-1, -2)    # [..., (even, odd), lane]
    return hadamard32(lanes).transpose(-1, -2).reshape(chunks.shape)


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., feat] -> (codes uint8 [..., padded·bits/8], scales fp16 [..., padded/32])."""
    if bits not in (4, 8):
        raise ValueError(f"KV quantization supports 4 or 8 bits, not {bits}")
    feat = x.shape[-1]
    padded = padded_features(feat)
    lead = x.shape[:-1]
    xf = F.pad(x.float(), (0, padded - feat)).reshape(*lead, padded // CHUNK, CHUNK)
    rot = _rotate(xf).reshape(*lead, padded // GROUP, GROUP)
    absmax = rot.abs().amax(dim=-1, keepdim=True)
    levels = 1 << (bits - 1)
    inv = torch.where(absmax > 0, levels / absmax, torch.zeros_like(absmax))
    codes = (torch.round(rot * inv) + levels).clamp(0, 2 * levels - 1).to(torch.uint8).reshape(*lead, padded)
    if bits == 4:
        pairs = codes.reshape(*lead, padded // 2, 2)
        codes = pairs[..., 0] | (pairs[..., 1] << 4)
    scales = (absmax / levels).to(torch.float16).reshape(*lead, padded // GROUP)
    return codes, scales


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, feat: int, dtype: torch.dtype = torch.float16
) -> torch.Tensor:
    """Inverse of `quantize`: [..., feat] in dtype."""
    if bits not in (4, 8):
        raise ValueError(f"KV quantization supports 4 or 8 bits, not {bits}")
    lead = scales.shape[:-1]
    padded = scales.shape[-1] * GROUP
    if bits == 4:
        codes = torch.stack((codes & 15, codes >> 4), dim=-1)
    levels = 1 << (bits - 1)
    v = (codes.reshape(*lead, padded // GROUP, GROUP).float() - levels) * scales.float().unsqueeze(-1)
    out = _rotate(v.reshape(*lead, padded // CHUNK, CHUNK)) * (1.0 / 32.0)
    return out.reshape(*lead, padded)[..., :feat].to(dtype)
