"""GPTQ (4-bit) loading: tensors built by a reference packer written here from the format description
dequantize to w = (q - (z + 1)) · scale in fp16, with and without g_idx, v1 and v2 zeros (issue 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exllamav2.quant import load_quantized


class Source(dict):
    def has(self, name):
        return name in self

    def get(self, name):
        return self[name]


def pack_nibbles(values, axis):
    """values (0..15) -> int32 words holding 8 consecutive entries along `axis`, entry i in nibble i."""
    v = np.moveaxis(np.asarray(values, dtype=np.uint64), axis, 0)
    words = np.zeros((v.shape[0] // 8,) + v.shape[1:], dtype=np.uint64)
    for i in range(v.shape[0]):
        words[i // 8] |= v[i] << np.uint64(4 * (i % 8))
    return np.moveaxis(words.astype(np.uint32).view(np.int32), 0, axis).copy()


def make_gptq(k, n, groups, seed, g_idx=None, v2=False, zero_range=(0, 16)):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, size=(k, n))
    z = rng.integers(*zero_range, size=(groups, n))
    scales = rng.uniform(1e-4, 0.05, size=(groups, n)).astype(np.float16)
    stored_z = z + 1 if v2 else z                       # v2 files store z + 1
    t = {
        "qweight": torch.from_numpy(pack_nibbles(q, 0)),
        "qzeros": torch.from_numpy(pack_nibbles(stored_z, 1)),
        "scales": torch.from_numpy(scales),
    }
    if g_idx is not None:
        t["g_idx"] = torch.from_numpy(np.asarray(g_idx, dtype=np.int32))
    return t, q, z, scales


def formula(q, z, scales, rows_group):
    """w[k, n] = fp16( fp16(q - (z + 1)) * scale ), group of row k = rows_group[k]."""
    k, n = q.shape
    w = np.zeros((k, n), dtype=np.float16)
    for r in range(k):
        g = rows_group[r]
        for c in range(n):
            w[r, c] = np.float16(np.float16(q[r, c] - (z[g, c] + 1)) * scales[g, c])
    return w


def load(t, k, n, **kw):
    return load_quantized("l.mlp", Source({f"l.mlp.{a}": b for a, b in t.items()}), k, n, **kw)


def same_fp16(a, b):
    return np.array_equal(np.asarray(a, np.float16).view(np.int16), np.asarray(b, np.float16).view(np.int16))


def test_no_g_idx_uses_power_of_two_groups():
    k, n, g = 80, 24, 3                                  # K/G = 26.7 -> group size 32
    t, q, z, s = make_gptq(k, n, g, seed=0)
    w = load(t, k, n).dequantize()
    assert w.dtype == torch.float16 and w.shape == (k, n)
    assert same_fp16(w.numpy(), formula(q, z, s, [r // 32 for r in range(k)]))


def test_act_order_g_idx():
    k, n, g = 64, 16, 4
    g_idx = np.random.default_rng(1).integers(0, g, size=k)
    t, q, z, s = make_gptq(k, n, g, seed=1, g_idx=g_idx)
    assert same_fp16(load(t, k, n).dequantize().numpy(), formula(q, z, s, g_idx))


def test_sequential_g_idx_equals_no_g_idx():
    k, n, g = 64, 16, 2
    seq = [r // 32 for r in range(k)]
    t, q, z, s = make_gptq(k, n, g, seed=2, g_idx=seq)
    assert same_fp16(load(t, k, n).dequantize().numpy(), formula(q, z, s, seq))


def test_all_zero_g_idx_is_ignored_as_upstream_does():
    k, n, g = 64, 16, 2
    t, q, z, s = make_gptq(k, n, g, seed=3, g_idx=[0] * k)
    assert same_fp16(load(t, k, n).dequantize().numpy(), formula(q, z, s, [r // 32 for r in range(k)]))


def test_v2_zeros():
    k, n, g = 64, 16, 2
    t, q, z, s = make_gptq(k, n, g, seed=4, v2=True, zero_range=(0, 15))
    assert same_fp16(load(t, k, n, gptq_v2=True).dequantize().numpy(), formula(q, z, s, [r // 32 for r in range(k)]))


def test_v2_zero_nibble_borrows_like_int32_subtraction():
    """A stored v2 zero of 0 makes the word subtraction borrow from the next nibble (upstream behaviour)."""
    k, n, g = 32, 8, 1
    t, q, _, s = make_gptq(k, n, g, seed=5)
    stored = np.array([[0, 3, 0, 0, 9, 15, 1, 0]])
    t["qzeros"] = torch.from_numpy(pack_nibbles(stored, 1))
    word = int(pack_nibbles(stored, 1).view(np.uint32)[0, 0])
    v1_word = (word - 0x11111111) % 2**32
    z = np.array([[(v1_word >> (4 * i)) & 15 for i in range(8)]])
    assert not np.array_equal(z, np.maximum(stored - 1, 0))        # the borrow really happens here
    assert same_fp16(load(t, k, n, gptq_v2=True).dequantize().numpy(), formula(q, z, s, [0] * k))


def test_forward_with_bias_and_chunks():
    k, n, g = 64, 96, 2
    t, *_ = make_gptq(k, n, g, seed=6)
    t["bias"] = torch.randn(n).half()
    layer = load(t, k, n)
    assert layer.format == "gptq"
    x = torch.randn(3, k)
    expect = x @ layer.dequantize().float() + t["bias"].float()
    torch.testing.assert_close(layer.forward(x), expect, rtol=1e-5, atol=1e-5)
    layer.max_dq_elements = k * 32
    torch.testing.assert_close(layer.forward(x), expect, rtol=1e-5, atol=1e-5)


def test_forward_of_a_layer_narrower_than_one_chunk():
    k, n, g = 32, 16, 1                  # fewer output columns than the 32-column dequant chunk
    t, *_ = make_gptq(k, n, g, seed=8)
    layer = load(t, k, n)
    x = torch.randn(2, k)
    torch.testing.assert_close(layer.forward(x), x @ layer.dequantize().float(), rtol=1e-5, atol=1e-5)


def test_resident_bytes_close_to_packed_size():
    k, n, g = 512, 256, 4
    t, *_ = make_gptq(k, n, g, seed=7)
    layer = load(t, k, n)
    file_bytes = sum(v.nbytes for v in t.values())
    assert t["qweight"].nbytes <= layer.nbytes() <= 1.1 * file_bytes


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t: t.update(qweight=t["qweight"][:-1]), "only 4-bit"),
        (lambda t: t.update(qweight=t["qweight"].float()), "dtype float32"),
        (lambda t: t.update(qzeros=t["qzeros"][:, :-1]), "qzeros: shape"),
        (lambda t: t.update(scales=t["scales"].to(torch.int32)), "scales: dtype"),
        (lambda t: t.update(g_idx=torch.full((64,), 9, dtype=torch.int32)), "g_idx"),
        (lambda t: t.pop("qzeros"), "missing"),
    ],
)
def test_bad_input(change, match):
    t, *_ = make_gptq(64, 16, 2, seed=8)
    change(t)
    with pytest.raises(ValueError, match=match) as e:
        load(t, 64, 16)
    assert "l.mlp" in str(e.value)


@pytest.mark.cuda
def test_cuda_dequantize_matches_the_formula():
    k, n, g = 64, 16, 4
    g_idx = np.random.default_rng(9).integers(0, g, size=k)
    t, q, z, s = make_gptq(k, n, g, seed=9, g_idx=g_idx)
    w = load(t, k, n, device=torch.device("cuda")).dequantize()
    assert w.is_cuda and same_fp16(w.cpu().numpy(), formula(q, z, s, g_idx))
