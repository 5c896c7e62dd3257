"""KV-cache quantization (exllamav2/ops/kv_quant.py) against the format description (reference §7).

The reference here is written independently of the package: the Hadamard matrix comes from the Sylvester
recursion and is applied as a float64 matrix product, codes are computed per element, and the storage is
decoded word by word (nibble e%8 of little-endian uint32 word e/8, or byte e%4 for 8 bits).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exllamav2.ops import kv_quant as kq


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


H32 = sylvester(32)


def ref_rotate(chunks: torch.Tensor) -> torch.Tensor:
    """[..., 64] float64 -> rotated positions: 2t = (even elements · H)[t], 2t+1 = (odd elements · H)[t]."""
    out = torch.empty_like(chunks)
    out[..., 0::2] = chunks[..., 0::2] @ H32
    out[..., 1::2] = chunks[..., 1::2] @ H32
    return out


def ref_quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, F] -> (codes int64 [T, padded], scales float64 [T, padded/32], distance of each scaled value
    to the nearest rounding boundary, used to excuse ties that fp32 and float64 may round differently)."""
    t, f = x.shape
    padded = -(-f // 64) * 64
    xp = torch.zeros(t, padded, dtype=torch.float64)
    xp[:, :f] = x.double()
    rot = ref_rotate(xp.view(t, padded // 64, 64)).view(t, padded // 32, 32)
    absmax = rot.abs().amax(-1, keepdim=True)
    levels = 2 ** (bits - 1)
    scaled = torch.where(absmax > 0, rot / absmax * levels, torch.zeros_like(rot))
    codes = (torch.round(scaled) + levels).clamp(0, 2 * levels - 1).long()
    tie_distance = ((scaled - scaled.floor()) - 0.5).abs()
    return codes.view(t, padded), (absmax / levels).view(t, -1), tie_distance.view(t, padded)


def unpack(stored: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored bytes [T, padded·bits/8] -> codes [T, padded], through little-endian uint32 words."""
    words = stored.numpy().copy().view("<u4").astype(np.int64)
    per_word = 32 // bits
    e = np.arange(words.shape[1] * per_word)
    codes = (words[:, e // per_word] >> (bits * (e % per_word))) & ((1 << bits) - 1)
    return torch.from_numpy(codes)


def ref_dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, feat: int) -> torch.Tensor:
    t, padded = codes.shape
    v = (codes.double() - 2 ** (bits - 1)).view(t, -1, 32) * scales.double().unsqueeze(-1)
    return (ref_rotate(v.view(t, padded // 64, 64)) / 32).view(t, padded)[:, :feat]


# --- Q4 / Q8 ---------------------------------------------------------------------------------------


def test_hadamard_butterflies_equal_sylvester_matrix():
    x = torch.randint(-50, 50, (7, 32)).float()      # small integers: every sum is exact in fp32
    assert torch.equal(kq.hadamard32(x).double(), x.double() @ H32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("feat", [64, 256, 96, 32])
def test_codes_and_scales_follow_the_format(bits, feat):
    torch.manual_seed(feat + bits)
    x = (torch.randn(40, feat) * torch.rand(40, 1) * 4).half()
    stored, scales = kq.quantize(x, bits)
    padded = -(-feat // 64) * 64
    assert stored.dtype == torch.uint8 and stored.shape == (40, padded * bits // 8)
    assert scales.dtype == torch.float16 and scales.shape == (40, padded // 32)
    codes, ref_scales, tie = ref_quantize(x, bits)
    ours = unpack(stored, bits)
    differ = ours != codes
    # float64 and fp32 rotations agree except where a value sits on a rounding boundary
    assert bool(((ours - codes).abs() <= 1).all())
    assert bool((tie[differ] < 1e-3).all())
    assert differ.float().mean().item() < 1e-3
    torch.testing.assert_close(scales.double(), ref_scales, rtol=1e-3, atol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_follows_the_format_exactly(bits):
    """Hand-made codes and power-of-two scales: every step is exact, so the values must match bit for bit."""
    torch.manual_seed(bits)
    t, feat = 6, 128
    codes = torch.randint(0, 2**bits, (t, feat))
    scales = 2.0 ** torch.randint(-8, -2, (t, feat // 32)).double()
    per_word = 32 // bits
    words = torch.zeros(t, feat // per_word, dtype=torch.int64)
    for e in range(feat):
        words[:, e // per_word] |= codes[:, e] << (bits * (e % per_word))
    stored = torch.from_numpy(words.numpy().astype("<u4").view(np.uint8).copy())
    ours = kq.dequantize(stored, scales.half(), bits, feat, torch.float32)
    assert torch.equal(ours.double(), ref_dequantize(codes, scales, bits, feat))


@pytest.mark.parametrize("bits", [4, 8])
def test_requantizing_dequantized_values_gives_the_same_codes(bits):
    """When each group of 32 holds code 0 (|value| = the group's absmax), decoding then encoding is the identity
    (decoded in fp32: 8-bit sums need more than fp16's 11 mantissa bits)."""
    torch.manual_seed(10 + bits)
    codes = torch.randint(1, 2**bits, (5, 128))
    codes[:, ::32] = 0
    scales = (2.0 ** torch.randint(-6, -1, (5, 4))).half()
    per_word = 32 // bits
    words = torch.zeros(5, 128 // per_word, dtype=torch.int64)
    for e in range(128):
        words[:, e // per_word] |= codes[:, e] << (bits * (e % per_word))
    stored = torch.from_numpy(words.numpy().astype("<u4").view(np.uint8).copy())
    x = kq.dequantize(stored, scales, bits, 128, torch.float32)
    again, again_scales = kq.quantize(x, bits)
    assert torch.equal(again, stored)
    assert torch.equal(again_scales, scales)


@pytest.mark.parametrize("bits, bound", [(4, 0.11), (8, 0.008)])
def test_round_trip_error(bits, bound):
    # measured relative RMS error on Gaussian data: Q4 0.097, Q8 0.0060 (uniform rounding of a rotated,
    # absmax-scaled group: step/sqrt(12) with step = absmax/2^(b-1))
    torch.manual_seed(0)
    x = torch.randn(64, 3, 256).half()
    stored, scales = kq.quantize(x, bits)
    y = kq.dequantize(stored, scales, bits, 256)
    rel = ((y.float() - x.float()).pow(2).mean() / x.float().pow(2).mean()).sqrt().item()
    assert rel < bound
    assert y.shape == x.shape and y.dtype == torch.float16


def test_zero_input_gives_zero_scales_and_values():
    stored, scales = kq.quantize(torch.zeros(2, 64), 4)
    assert (scales == 0).all()
    assert (kq.dequantize(stored, scales, 4, 64) == 0).all()


def test_rejects_unsupported_widths():
    with pytest.raises(ValueError, match="4 or 8 bits"):
        kq.quantize(torch.zeros(1, 64), 6)


# --- FP8 ----------------------------------------------------------------------------------------


def test_fp8_is_the_upper_byte_of_fp16():
    torch.manual_seed(1)
    x = torch.cat([torch.randn(1000) * 100, torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0])]).half()
    q = kq.fp8_quantize(x)
    upper = (x.numpy().view(np.uint16) >> 8).astype(np.uint8)
    assert np.array_equal(q.numpy(), upper)
    back = kq.fp8_dequantize(q)
    assert np.array_equal(back.numpy().view(np.uint16), upper.astype(np.uint16) << 8)


def test_fp8_truncation_error_is_below_a_quarter():
    # E5M2 keeps 2 mantissa bits and truncates: |error| < 2^-2 |x| for normal values, and never rounds up
    x = (torch.rand(10000) * 200 + 0.01).half()
    back = kq.fp8_dequantize(kq.fp8_quantize(x)).float()
    assert ((x.float() - back) / x.float()).max().item() < 0.25
    assert (back <= x.float()).all()
