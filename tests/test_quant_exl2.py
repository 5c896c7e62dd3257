"""EXL2 format: packing, bit-exact dequantization and loading (issue 4).

The reference packer/unpacker below is written from the format description (one Python integer
bitstream per group and column, numpy float16 arithmetic) and shares no code with exllamav2.quant.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exllamav2.quant import group_layout, load_quantized, pack_exl2, quantize_rtn
from exllamav2.quant import qlinear


class Source(dict):
    def has(self, name):
        return name in self

    def get(self, name):
        return self[name]


# reference implementation, straight from the spec -------------------------------------------------


def ref_pack(codes, layout, scale_codes, q_scale_max, perm, n_pad):
    """codes [K, N] (stored order) -> dict of tensors, one Python int bitstream per group and column."""
    k, n = codes.shape
    word_rows, q_groups = [], []
    row = 0
    for bits, rows in layout:
        nwords = -(-rows * bits // 32)
        q_groups += [bits, len(word_rows)]
        block = np.zeros((nwords, n_pad), dtype=np.uint64)
        for col in range(n_pad):
            stream = 0
            for i in range(rows):
                code = int(codes[row + i, col]) if col < n else 1 << (bits - 1)
                stream |= code << (i * bits)
            for j in range(nwords):
                block[j, col] = (stream >> (32 * j)) & 0xFFFFFFFF
        word_rows += list(block)
        row += rows
    q_weight = np.array(word_rows, dtype=np.uint64).astype(np.uint32).view(np.int32)
    g = len(layout)
    q_scale = np.zeros((g, n_pad // 8), dtype=np.uint64)
    for gi in range(g):
        for col in range(n):
            q_scale[gi, col // 8] |= int(scale_codes[gi, col]) << (4 * (col % 8))
    return {
        "q_weight": torch.from_numpy(q_weight.copy()),
        "q_scale": torch.from_numpy(q_scale.astype(np.uint32).view(np.int32).copy()),
        "q_scale_max": torch.tensor(q_scale_max, dtype=torch.float16),
        "q_groups": torch.tensor(q_groups, dtype=torch.int16),
        "q_invperm": torch.from_numpy(np.argsort(perm).astype(np.int32)),
    }


def ref_dequant(t, k, n, prescale=1.0):
    """The recipe: W [K, N] float16 in original row order, from a tensor dict."""
    qw = t["q_weight"].numpy().view(np.uint32)
    qs = t["q_scale"].numpy().view(np.uint32)
    qsm = t["q_scale_max"].numpy().astype(np.float16)
    grp = t["q_groups"].numpy().astype(np.int64)
    perm = np.argsort(t["q_invperm"].numpy().astype(np.int64))
    g_count = len(grp) // 2
    stored = np.zeros((k, n), dtype=np.float16)
    row = 0
    for g in range(g_count):
        bits, s0 = int(grp[2 * g]), int(grp[2 * g + 1])
        s1 = int(grp[2 * g + 3]) if g < g_count - 1 else qw.shape[0]
        rows = (s1 - s0) * 32 // bits if g < g_count - 1 else k - row
        # m = fp16(q_scale_max * prescale / 256), the multiply done in fp32 as the tensor op does
        m = np.float16(np.float32(qsm[g]) * np.float32(prescale / 256))
        for col in range(n):
            s = (int(qs[g, col // 8]) >> (4 * (col % 8))) & 15
            sc = np.float16(np.float16((s + 1) ** 2) * m)
            stream = 0
            for j in range(s1 - s0):
                stream |= int(qw[s0 + j, col]) << (32 * j)
            for i in range(rows):
                code = (stream >> (i * bits)) & ((1 << bits) - 1)
                stored[row + i, col] = np.float16(np.float16(code - (1 << (bits - 1))) * sc)
        row += rows
    w = np.zeros_like(stored)
    w[perm] = stored
    return w


def ref_codes(t, k, n):
    """Unpacked codes [K, N] in stored order."""
    qw = t["q_weight"].numpy().view(np.uint32)
    grp = t["q_groups"].numpy().astype(np.int64)
    out = np.zeros((k, n), dtype=np.int64)
    row = 0
    for g in range(len(grp) // 2):
        bits, s0 = int(grp[2 * g]), int(grp[2 * g + 1])
        last = g == len(grp) // 2 - 1
        s1 = qw.shape[0] if last else int(grp[2 * g + 3])
        rows = k - row if last else (s1 - s0) * 32 // bits
        for col in range(n):
            stream = sum(int(qw[s0 + j, col]) << (32 * j) for j in range(s1 - s0))
            for i in range(rows):
                out[row + i, col] = (stream >> (i * bits)) & ((1 << bits) - 1)
        row += rows
    return out


# fixtures -----------------------------------------------------------------------------------------


def random_layer(layout, n, seed, scale_max_range=(1e-3, 0.5)):
    """Random codes, scale codes, q_scale_max (some giving fp16-subnormal m) and permutation."""
    rng = np.random.default_rng(seed)
    k = sum(r for _, r in layout)
    codes = np.concatenate([rng.integers(0, 1 << b, size=(r, n)) for b, r in layout])
    scale_codes = rng.integers(0, 16, size=(len(layout), n))
    lo, hi = np.log(scale_max_range[0]), np.log(scale_max_range[1])
    q_scale_max = np.exp(rng.uniform(lo, hi, size=len(layout))).astype(np.float16)
    perm = rng.permutation(k)
    return codes, scale_codes, q_scale_max, perm


def pack(layout, n, seed, **kw):
    codes, sc, qsm, perm = random_layer(layout, n, seed, **kw)
    t = pack_exl2(torch.from_numpy(codes), layout, torch.from_numpy(sc), torch.from_numpy(qsm),
                  torch.from_numpy(perm))
    return t, (codes, sc, qsm, perm)


def load(t, k, n, key="m.proj", **kw):
    return load_quantized(key, Source({f"{key}.{name}": v for name, v in t.items()}), k, n, **kw)


def same_fp16(a, b):
    """Bitwise equality of fp16 arrays (so -0.0 vs 0.0 or subnormal flushes would show)."""
    a = np.asarray(a, dtype=np.float16).view(np.int16)
    b = np.asarray(b, dtype=np.float16).view(np.int16)
    return np.array_equal(a, b)


LAYOUTS = {
    "bits8": [(8, 32), (8, 32), (8, 32)],
    "bits6": [(6, 32), (6, 64)],
    "bits5": [(5, 32), (5, 32), (5, 32)],
    "bits4": [(4, 64), (4, 32)],
    "bits3": [(3, 32), (3, 64)],
    "bits2": [(2, 16), (2, 32), (2, 48)],
    "mixed_desc": [(8, 32), (6, 32), (5, 32), (4, 64), (3, 32), (2, 32)],
    "short_last_3": [(4, 32), (3, 32), (3, 20)],
    "short_last_5": [(6, 32), (5, 7)],
    "short_last_8": [(8, 32), (8, 5)],
    "short_last_2": [(2, 16), (2, 9)],
}


# tests --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("n", [40, 64])
def test_pack_matches_reference_packer_and_round_trips(name, n):
    layout = LAYOUTS[name]
    t, (codes, sc, qsm, perm) = pack(layout, n, seed=list(LAYOUTS).index(name) * 100 + n)
    n_pad = -(-n // 32) * 32
    ref = ref_pack(codes, layout, sc, qsm, perm, n_pad)
    for key in ("q_weight", "q_groups", "q_invperm"):
        assert torch.equal(t[key], ref[key]), key
    assert t["q_weight"].dtype == torch.int32 and t["q_scale"].dtype == torch.int32
    assert t["q_scale_max"].dtype == torch.float16 and t["q_groups"].dtype == torch.int16
    # scale words of real columns match (padded columns' scale codes are unspecified)
    got_sc = ref_codes_scale(t["q_scale"], n)
    assert np.array_equal(got_sc, sc)
    assert np.array_equal(ref_codes(t, len(perm), n), codes)


def ref_codes_scale(q_scale, n):
    qs = q_scale.numpy().view(np.uint32)
    return np.array([[(int(qs[g, c // 8]) >> (4 * (c % 8))) & 15 for c in range(n)] for g in range(qs.shape[0])])


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("prescale", [1.0, 0.37])
def test_dequantize_is_bit_exact(name, prescale):
    layout = LAYOUTS[name]
    k, n = sum(r for _, r in layout), 40
    t, _ = pack(layout, n, seed=7, scale_max_range=(1e-4, 2.0))
    q = load(t, k, n, prescale=prescale)
    w = q.dequantize()
    assert w.dtype == torch.float16 and w.shape == (k, n)
    assert same_fp16(w.numpy(), ref_dequant(t, k, n, prescale))


def test_subnormal_scales_are_kept():
    layout = [(4, 32), (4, 32)]
    t, _ = pack(layout, 32, seed=3, scale_max_range=(1e-4, 2e-3))   # m = q_scale_max/256 is subnormal
    w = load(t, 64, 32).dequantize()
    ref = ref_dequant(t, 64, 32)
    assert same_fp16(w.numpy(), ref)
    assert (np.abs(ref[ref != 0]) < 6.1e-5).any()                  # the test does cover subnormals


def test_any_group_order_dequantizes():
    """Files need descending bits for the CUDA kernels; the generic dequantizer must not care."""
    layout = [(2, 16), (4, 32), (8, 32), (3, 32)]
    codes, sc, qsm, perm = random_layer(layout, 40, seed=11)
    t = ref_pack(codes, layout, sc, qsm, perm, 64)
    assert same_fp16(load(t, 112, 40).dequantize().numpy(), ref_dequant(t, 112, 40))


def test_permutation_beyond_int16():
    """K > 32767 would break a signed int16 permutation; int64 indices must handle it."""
    k, n = 32768 + 64, 32
    layout = [(8, 128)] * (k // 128) + [(8, 64)]
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, size=(k, n))
    perm = rng.permutation(k)
    t = pack_exl2(torch.from_numpy(codes), layout, torch.full((len(layout), n), 15), torch.ones(len(layout)),
                  torch.from_numpy(perm))
    w = load(t, k, n).dequantize()
    expect = torch.from_numpy(codes - 128).half()                     # scale = 16² · fp16(1/256) = 1
    assert torch.equal(w[torch.from_numpy(perm)], expect)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_matches_matmul_with_bias(dtype):
    layout = LAYOUTS["mixed_desc"]
    k, n = 224, 72
    t, _ = pack(layout, n, seed=5)
    t["bias"] = torch.randn(n).half()
    q = load(t, k, n)
    x = torch.randn(2, 3, k).to(dtype)
    y = q.forward(x)
    assert y.shape == (2, 3, n) and y.dtype == dtype
    # against float64: the CPU kernel sums in another order than a BLAS matmul; in float32 both are within fp32
    # rounding, in 16 bits within the output dtype's (bf16 rows go through the kernel in float32, then round)
    expect = x.double() @ q.dequantize().double() + t["bias"].double()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), expect, rtol=tol, atol=tol * expect.abs().max().item())


def test_forward_in_column_chunks_matches_one_pass():
    layout = [(4, 64), (3, 32)]
    k, n = 96, 200
    t, _ = pack(layout, n, seed=9)
    q = load(t, k, n)
    x = torch.randn(5, k)
    whole = q.forward(x)
    q.max_dq_elements = k * 64                                       # 64 columns per chunk
    torch.testing.assert_close(q.forward(x), whole, rtol=1e-6, atol=1e-6)


def test_scratch_is_shared_and_no_weight_copy_is_kept(monkeypatch):
    monkeypatch.setattr(qlinear.QuantWeight, "use_cpu_kernels", False)   # the twin's scratch (CPU kernels use none)
    qlinear.release_scratch()
    a = load(pack([(4, 64)], 64, seed=1)[0], 64, 64, key="a")
    b = load(pack([(4, 128)], 96, seed=2)[0], 128, 96, key="b")
    x = torch.randn(1, 64)
    a.forward(x)
    b.forward(torch.randn(1, 128))
    assert len(qlinear._scratch) == 1
    for q in (a, b):
        floats = sum(t.numel() for t in q.tensors() if t.is_floating_point())
        assert floats < q.in_features * q.out_features // 8


def test_resident_bytes_close_to_packed_size():
    k, n = 512, 512
    w = torch.randn(k, n) * 0.02
    t = quantize_rtn(w, group_layout(k, [4], 128), torch.randperm(k))
    file_bytes = sum(v.numel() * v.element_size() for v in t.values())
    q = load(t, k, n)
    assert t["q_weight"].nbytes <= q.nbytes() <= 1.05 * file_bytes
    assert q.format == "exl2"
    assert 4.0 < q.bits_per_weight() < 4.5


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_rtn_quantizer_error_shrinks_with_bits(bits):
    torch.manual_seed(0)
    k, n = 128, 48
    w = torch.randn(k, n) * 0.05
    t = quantize_rtn(w, group_layout(k, [bits], 32), torch.randperm(k))
    err = (load(t, k, n).dequantize().float() - w).abs()
    # uniform rounding error ≈ step/4 on average with step ≈ 2·max|w|/(2^b - 1)
    step = 2 * w.abs().max() / (2**bits - 1)
    assert err.mean() < 0.5 * step
    assert same_fp16(load(t, k, n).dequantize().numpy(), ref_dequant(t, k, n))


def test_missing_layer_returns_none():
    assert load_quantized("x", Source({"x.weight": torch.zeros(2, 2)}), 2, 2) is None


# bad input ----------------------------------------------------------------------------------------


@pytest.fixture
def good():
    t, _ = pack([(4, 64), (3, 32)], 40, seed=4)
    return t


def bad(t, match, k=96, n=40):
    with pytest.raises(ValueError, match=match) as e:
        load(t, k, n)
    assert "m.proj" in str(e.value)


def test_truncated_q_weight(good):
    good["q_weight"] = good["q_weight"][:-1]
    bad(good, "truncated")


def test_q_groups_odd_length(good):
    good["q_groups"] = good["q_groups"][:-1]
    bad(good, "q_groups")


def test_q_groups_starts_not_increasing(good):
    g = good["q_groups"].clone()
    g[3] = 0
    good["q_groups"] = g
    bad(good, "increase")


def test_q_groups_rows_do_not_sum_to_k(good):
    short = dict(good, q_invperm=torch.arange(80, dtype=torch.int32))
    bad(short, "sum to in_features", k=80)      # 64 + 32 rows stored, layer claims 80
    extra = dict(good)
    extra["q_weight"] = torch.cat([good["q_weight"], good["q_weight"][:3]])
    bad(extra, "sum to in_features")


def test_unsupported_bit_width(good):
    g = good["q_groups"].clone()
    g[0] = 7
    good["q_groups"] = g
    bad(good, "unsupported bit width 7")


def test_k_over_65535():
    t = {
        "q_weight": torch.zeros((8192, 32), dtype=torch.int32),
        "q_scale": torch.zeros((1, 4), dtype=torch.int32),
        "q_scale_max": torch.ones(1, dtype=torch.float16),
        "q_groups": torch.tensor([4, 0], dtype=torch.int16),
        "q_invperm": torch.arange(65536, dtype=torch.int32),
    }
    bad(t, "65535", k=65536, n=32)


@pytest.mark.parametrize(
    "name, value, match",
    [
        ("q_weight", lambda t: t.float(), "dtype float32"),
        ("q_scale", lambda t: t[:, :-1], "shape"),
        ("q_scale_max", lambda t: t.to(torch.int32), "dtype"),
        ("q_invperm", lambda t: torch.zeros_like(t), "permutation"),
        ("q_weight", lambda t: t[:, :32], "padded"),
    ],
)
def test_wrong_dtypes_and_shapes(good, name, value, match):
    good[name] = value(good[name])
    bad(good, match)


def test_missing_tensor(good):
    del good["q_scale"]
    bad(good, "missing")


def test_packer_rejects_ascending_bits():
    codes, sc, qsm, perm = random_layer([(2, 32), (4, 32)], 32, seed=0)
    with pytest.raises(ValueError, match="descending"):
        pack_exl2(torch.from_numpy(codes), [(2, 32), (4, 32)], torch.from_numpy(sc), torch.from_numpy(qsm),
                  torch.from_numpy(perm))


@pytest.mark.parametrize(
    "k, bits, sizes, props",
    [(64, [8, 6], 32, [0.1, 0.9]), (200, [6, 5], 128, [0.1, 0.9]), (256, [8, 4, 3], [32, 128, 128], [0.05, 0.1, 0.85]),
     (96, [4], 64, None), (48, [3, 2], 64, [0.05, 0.95])],
)
def test_group_layout_covers_k_with_only_the_last_group_short(k, bits, sizes, props):
    layout = group_layout(k, bits, sizes, props)
    assert sum(r for _, r in layout) == k
    assert [b for b, _ in layout] == sorted((b for b, _ in layout), reverse=True)
    assert all(r * b % 32 == 0 for b, r in layout[:-1])


@pytest.mark.cuda
def test_cuda_dequantize_and_forward_match_the_reference():
    layout = LAYOUTS["mixed_desc"]
    k, n = 224, 40
    t, _ = pack(layout, n, seed=12, scale_max_range=(1e-4, 2.0))
    q = load(t, k, n, device=torch.device("cuda"), prescale=0.37)
    assert same_fp16(q.dequantize().cpu().numpy(), ref_dequant(t, k, n, 0.37))
    x = torch.randn(3, k, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(q.forward(x), x @ q.dequantize(), rtol=2e-2, atol=2e-2)
