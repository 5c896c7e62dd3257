"""The CPU fp16-weight kernel against plain fp32 matmul (both instruction-set paths, 1 and 2 threads), the
kernel lookup, and the model with and without it."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess

import pytest
import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Config, ExLlamaV2Cache, ext
from exllamav2.errors import ConfigError

kernels = ext.cpu_kernels()
_attn_decode = kernels and kernels.attn_decode
_attn_decode_paged = kernels and kernels.attn_decode_paged
needs_kernels = pytest.mark.skipif(kernels is None, reason="CPU kernels unavailable (no AVX2/F16C or no compiler)")




@needs_kernels
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("n, k", [(1, 1), (5, 15), (32, 16), (33, 100), (7, 47), (256, 768), (1030, 72)])
@pytest.mark.parametrize("kernel, dtype", [("linear_f16w", torch.float16), ("linear_bf16w", torch.bfloat16)])
def test_16_bit_weight_kernels_match_fp64_matmul(m, n, k, kernel, dtype, isa, threads):
    """Four output rows at a time plus a tail (n % 4), K tails of 1..31, rows split over threads (n = 1030); fp16
    and bf16 weights (the bf16 mode's) through the same kernel body."""
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen).to(dtype)
    expect = x.double() @ w.double().T                  # 16-bit weights are exact in fp64
    got = getattr(kernels, kernel)(x, w).double()
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5 * k**0.5)


@needs_kernels
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("n, k", [(1, 1), (5, 15), (7, 47), (33, 100), (256, 768), (1030, 72)])
@pytest.mark.parametrize("kernel, dtype", [("linear_f16w", torch.float16), ("linear_bf16w", torch.bfloat16)])
def test_16_bit_weight_kernels_take_and_return_bf16(m, n, k, kernel, dtype, isa, threads):
    """bf16 activations (the bf16 mode's) in and out, summed in float32: the fp64 product rounded once to bf16, to
    within one bf16 ulp (a float32 sum near a rounding tie may round the other way). On AVX512-BF16 bf16 weights go
    through vdpbf16ps (K tails by masked loads: 1, 15, 47, 100 and 72 here)."""
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=gen).bfloat16()
    w = torch.randn(n, k, generator=gen).to(dtype)
    expect = x.double() @ w.double().T
    got = getattr(kernels, kernel)(x, w)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), expect, rtol=2**-7, atol=1e-5 * k**0.5)


def _attention_reference(q, k, v, scale, bf16_probabilities=False):
    """float32 attention with the kv heads repeated for their query heads (repeat_kv's order); with
    bf16_probabilities the softmax rounded to bf16 before p @ v, as transformers' bf16 eager attention does and the
    AVX512-BF16 kernel's dot products (dots_avx512bf16.cpp) take them."""
    groups = q.shape[2] // k.shape[2]
    kr, vr = (t.float().repeat_interleave(groups, 2).transpose(1, 2) for t in (k, v))
    p = torch.softmax(q.float().transpose(1, 2) @ kr.transpose(-1, -2) * scale, dim=-1)
    if bf16_probabilities:
        p = p.bfloat16().float()
    return (p @ vr).transpose(1, 2)


def _rounds_probabilities(dtype, isa) -> bool:
    return dtype == torch.bfloat16 and isa == "avx512bf16"


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, s, hq, hkv, d", [(1, 576, 12, 4, 64), (2, 37, 8, 8, 128), (1, 5, 6, 2, 80),
                                              (3, 1, 4, 1, 16), (1, 100, 32, 4, 32),
                                              (3, 45, 4, 2, 32)])
def test_attn_decode_matches_sdpa(dtype, b, s, hq, hkv, d, isa, threads):
    """One query position over a cache view (positions past S in the buffer ignored): GQA ratios 1-8, more than
    4 query heads per kv head, head dims not a multiple of 64, one key, batches; float32 to fp32 rounding,
    bfloat16 to the output's rounding."""
    gen = torch.Generator().manual_seed(b * 1000 + s + d)
    cache_k, cache_v = (torch.randn(b, s + 9, hkv, d, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(b, 1, hq, d, generator=gen).to(dtype)
    k, v = cache_k[:, :s], cache_v[:, :s]
    out = kernels.attn_decode(q, k, v, d**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1 / 128, atol=1e-3)
    expect = _attention_reference(q, k, v, d**-0.5, _rounds_probabilities(dtype, isa))
    torch.testing.assert_close(out.float(), expect, **tol)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attn_decode_per_row_lengths(dtype, isa, threads):
    """Row b sees its first lengths[b] keys (a ragged batch's decode step); a row seeing none outputs zeros."""
    gen = torch.Generator().manual_seed(5)
    b, s, hq, hkv, d = 4, 40, 8, 2, 64
    k, v = (torch.randn(b, s, hkv, d, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(b, 1, hq, d, generator=gen).to(dtype)
    lengths = torch.tensor([40, 1, 0, 23])
    out = kernels.attn_decode(q, k, v, 0.125, lengths).float()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1 / 128, atol=1e-3)
    for row, n in enumerate(lengths.tolist()):
        expect = (torch.zeros(1, 1, hq, d) if n == 0 else
                  _attention_reference(q[row : row + 1], k[row : row + 1, :n], v[row : row + 1, :n], 0.125,
                                       _rounds_probabilities(dtype, isa)))
        torch.testing.assert_close(out[row : row + 1], expect, **tol)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, length, s, hq, hkv, d, lengths", [(2, 7, 7, 6, 2, 64, None), (1, 40, 45, 4, 4, 32, None),
                                                               (3, 5, 9, 8, 2, 80, [9, 3, 5]), (1, 64, 64, 12, 4, 64, None)])
def test_attn_decode_takes_a_causal_prefill(dtype, b, length, s, hq, hkv, d, lengths, isa, threads):
    """Several queries per row, the last `length` positions of the keys each row sees: query i over the first
    lengths[b] - (length - 1 - i) keys (a prefill, after cached keys or not; a query seeing none outputs zeros), each
    against the reference over its own prefix; odd lengths (the kernel's query order pairs short and long)."""
    gen = torch.Generator().manual_seed(b * 100 + length + s)
    q = torch.randn(b, length, hq, d, generator=gen).to(dtype)
    k, v = (torch.randn(b, s, hkv, d, generator=gen).to(dtype) for _ in range(2))
    seen = torch.tensor(lengths) if lengths else None
    out = kernels.attn_decode(q, k, v, d**-0.5, seen)
    assert out.dtype == dtype and out.shape == q.shape
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1 / 128, atol=1e-3)
    for row in range(b):
        for i in range(length):
            n = (lengths[row] if lengths else s) - (length - 1 - i)
            expect = (torch.zeros(1, 1, hq, d) if n <= 0 else
                      _attention_reference(q[row : row + 1, i : i + 1], k[row : row + 1, :n], v[row : row + 1, :n],
                                           d**-0.5, _rounds_probabilities(dtype, isa)))
            torch.testing.assert_close(out[row : row + 1, i : i + 1].float(), expect, **tol)


@needs_kernels
def test_attn_decode_refuses_wrong_input():
    q, k = torch.randn(1, 1, 4, 64), torch.randn(1, 9, 2, 64)
    with pytest.raises(RuntimeError, match="all be float32 or all bfloat16"):
        kernels.attn_decode(q, k.bfloat16(), k.bfloat16(), 0.125)
    with pytest.raises(RuntimeError, match="not a multiple of kv heads"):
        kernels.attn_decode(torch.randn(1, 1, 5, 64), k, k, 0.125)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernels.attn_decode(torch.randn(1, 1, 4, 24), torch.randn(1, 9, 2, 24), torch.randn(1, 9, 2, 24), 0.125)
    with pytest.raises(RuntimeError, match="contiguous heads"):
        kernels.attn_decode(q, k.transpose(1, 2).contiguous().transpose(1, 2), k, 0.125)
    with pytest.raises(RuntimeError, match="outside 0..9"):
        kernels.attn_decode(q, k, k, 0.125, torch.tensor([10]))
    with pytest.raises(RuntimeError, match="int64"):
        kernels.attn_decode(q, k, k, 0.125, torch.tensor([3], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="one query per row"):
        kernels.attn_decode_paged(torch.randn(1, 2, 4, 64), k[:, :1], k[:, :1], torch.randn(2, 32, 2, 64),
                                  torch.randn(2, 32, 2, 64), torch.zeros(1, 1, dtype=torch.int32),
                                  torch.zeros(1, dtype=torch.int32), 0.125)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths, page, hq, hkv, d", [([0, 31, 32, 100], 32, 8, 2, 64), ([300], 256, 12, 4, 64),
                                                       ([5, 70], 64, 4, 4, 128), ([63, 1], 32, 6, 1, 16)])
def test_attn_decode_paged_matches_writing_and_gathering(dtype, lengths, page, hq, hkv, d, isa, threads):
    """Rows holding different numbers of tokens (none, a page exactly, several pages) in pages scattered over the
    pool: the new keys and values land where the backends' write_pages puts them, and each row's output equals
    the decode kernel's over the gathered keys (same kernel, same keys, same order: bit for bit)."""
    from exllamav2.attn.backends.backend import gather_pages, write_pages

    gen = torch.Generator().manual_seed(sum(lengths) + page + d)
    per_row = max(n // page + 1 for n in lengths)
    pool = len(lengths) * per_row + 3
    table = torch.randperm(pool, generator=gen)[: len(lengths) * per_row].view(len(lengths), per_row).int()
    k_pages, v_pages = (torch.randn(pool, page, hkv, d, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(len(lengths), 1, hq, d, generator=gen).to(dtype)
    k_new, v_new = (torch.randn(len(lengths), 1, hkv, d, generator=gen).to(dtype) for _ in range(2))
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    want_k, want_v = k_pages.clone(), v_pages.clone()
    write_pages(want_k, want_v, k_new, v_new, table, seqlens)
    k, v = gather_pages(want_k, want_v, table, max(lengths) + 1)
    want = kernels.attn_decode(q, k, v, d**-0.5, seqlens.long() + 1)
    got = kernels.attn_decode_paged(q, k_new, v_new, k_pages, v_pages, table, seqlens, d**-0.5)
    assert torch.equal(k_pages, want_k) and torch.equal(v_pages, want_v)
    assert got.dtype == dtype and torch.equal(got, want)


@needs_kernels
def test_attn_decode_paged_refuses_wrong_input():
    q, new, pages = torch.randn(1, 1, 4, 64), torch.randn(1, 1, 2, 64), torch.randn(3, 32, 2, 64)
    table, seqlens = torch.tensor([[2, 0]], dtype=torch.int32), torch.tensor([40], dtype=torch.int32)
    kernels.attn_decode_paged(q, new, new, pages, pages.clone(), table, seqlens, 0.125)
    with pytest.raises(RuntimeError, match=r"seqlens\[0\] = 64 outside 0..63"):
        kernels.attn_decode_paged(q, new, new, pages, pages, table, torch.tensor([64], dtype=torch.int32), 0.125)
    with pytest.raises(RuntimeError, match=r"block_table\[0, 1\] = 3 outside 0..2"):
        kernels.attn_decode_paged(q, new, new, pages, pages, torch.tensor([[2, 3]], dtype=torch.int32), seqlens, 0.125)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kernels.attn_decode_paged(q, new, new, pages[:, :16], pages[:, :16], table, seqlens, 0.125)
    with pytest.raises(RuntimeError, match="int32"):
        kernels.attn_decode_paged(q, new, new, pages, pages, table.long(), seqlens, 0.125)
    with pytest.raises(RuntimeError, match=r"k_new and v_new must be \[B, 1, Hkv, D\]"):
        kernels.attn_decode_paged(q, new.bfloat16(), new, pages, pages, table, seqlens, 0.125)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, d", [(1, 768), (3, 16), (5, 100), (40, 64)])
def test_rms_norm_matches_the_twin(dtype, rows, d, isa, threads):
    """Rows of 16-wide vectors and a scalar tail (d = 100), many rows split over threads; float32 to float32
    rounding of a different summation order, bf16 to one bf16 ulp."""
    from exllamav2.ops import norm

    gen = torch.Generator().manual_seed(rows * 100 + d)
    x = (torch.randn(rows, 2, d, generator=gen) * 3).to(dtype)
    w = torch.rand(d, generator=gen) + 0.5
    got = kernels.rms_norm(x, w, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=0)
    torch.testing.assert_close(got.float(), norm.rms_norm(x, w, 1e-5).float(), **tol)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, n, h, d, r", [(1, 1, 12, 64, 64), (2, 5, 4, 16, 16), (1, 3, 2, 96, 64), (2, 2, 3, 64, 40)])
def test_rope_neox_matches_the_twin(dtype, b, n, h, d, r, isa, threads):
    """Full and partial rotary dims (the rest copied), halves of 8 and 20 (a scalar tail), non-contiguous q."""
    from exllamav2.architecture import RopeStyle
    from exllamav2.ops.rope import apply_rope

    gen = torch.Generator().manual_seed(b * n * h + d + r)
    x = torch.randn(b, n, h * 2, d, generator=gen).to(dtype)[:, :, ::2]
    angles = torch.rand(b, n, 1, r // 2, generator=gen) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    got = kernels.rope_neox(x, cos, sin)
    assert got.dtype == dtype and got.shape == x.shape
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(got.float(), apply_rope(x, cos, sin, RopeStyle.NEOX).float(), **tol)


@needs_kernels
def test_norm_and_rope_refuse_wrong_input():
    with pytest.raises(RuntimeError, match="w must be float32"):
        kernels.rms_norm(torch.randn(2, 8), torch.randn(8).bfloat16(), 1e-5)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.rms_norm(torch.randn(2, 8).half(), torch.randn(8), 1e-5)
    with pytest.raises(RuntimeError, match="R even and at most D"):
        kernels.rope_neox(torch.randn(1, 1, 2, 8), torch.randn(1, 1, 1, 10), torch.randn(1, 1, 1, 10))


@needs_kernels
def test_isa_is_chosen_from_the_cpu():
    assert kernels.isa() in ("avx2", "avx512", "avx512bf16")
    if kernels.isa() == "avx2":
        with pytest.raises(RuntimeError, match="lacks AVX-512F"):
            kernels.set_isa("avx512")


@needs_kernels
def test_hot_path_lookup_is_lock_free(monkeypatch):
    """Once decided, cpu_kernels() returns without taking the module lock (it runs on every decode step)."""

    class Refuse:
        def __enter__(self):
            raise AssertionError("cpu_kernels() took the lock after resolution")

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(ext, "_lock", Refuse())
    assert ext.cpu_kernels() is kernels


def test_isa_variable_is_read_by_value():
    from exllamav2.environment import build_settings

    assert ext._cpu_isa(build_settings({"EXLLAMA_CPU_ISA": "AVX2 "})) == "avx2"
    assert ext._cpu_isa(build_settings({"EXLLAMA_CPU_ISA": ""})) == "auto"
    assert ext._cpu_isa(build_settings({"EXLLAMA_CPU_ISA": "AVX512BF16"})) == "avx512bf16"   # the pair kernels
    with pytest.raises(ConfigError, match="EXLLAMA_CPU_ISA='neon' is not one of"):
        ext._cpu_isa(build_settings({"EXLLAMA_CPU_ISA": "neon"}))


def test_isa_the_kernels_cannot_take_is_refused_not_replaced(monkeypatch):
    """A misspelt EXLLAMA_CPU_ISA, or one naming instructions the CPU lacks, fails the first cpu_kernels() call
    (the model's build) with the variable named, instead of running other kernels than the ones forced."""
    from exllamav2.environment import build_settings

    class LacksAvx512:
        def set_isa(self, name):
            raise RuntimeError("set_isa: this CPU lacks AVX-512F; use 'avx2' or 'auto'")

    monkeypatch.setattr(ext, "_cpu_resolved", False)
    monkeypatch.setattr(ext, "_cpu_module", None)
    monkeypatch.setattr(ext, "_build_cpu", lambda settings: LacksAvx512())
    with pytest.raises(ConfigError, match="EXLLAMA_CPU_ISA='avx5l2' is not one of"):
        ext.cpu_kernels(build_settings({"EXLLAMA_CPU_ISA": "avx5l2"}))
    with pytest.raises(ConfigError, match="EXLLAMA_CPU_ISA=avx512: set_isa: this CPU lacks AVX-512F"):
        ext.cpu_kernels(build_settings({"EXLLAMA_CPU_ISA": "avx512"}))
    assert not ext._cpu_resolved            # nothing decided: the next call with a right setting may still build


@needs_kernels
def test_linear_f16w_refuses_wrong_input():
    with pytest.raises(RuntimeError, match="float16"):
        kernels.linear_f16w(torch.randn(1, 8), torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="share K"):
        kernels.linear_f16w(torch.randn(1, 8), torch.randn(4, 9).half())
    with pytest.raises(RuntimeError, match="w must be bfloat16"):
        kernels.linear_bf16w(torch.randn(1, 8), torch.randn(4, 8).half())
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        kernels.linear_bf16w(torch.randn(1, 8).half(), torch.randn(4, 8).bfloat16())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_linear_w16_many_equals_one_call_per_weight(dtype, xdtype, isa, threads):
    """q, k and v (or gate and up) in one call: each output equal to its own call's, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 200, generator=gen).to(xdtype)
    ws = [torch.randn(n, 200, generator=gen).to(dtype) for n in (256, 40, 7)]
    one = kernels.linear_f16w if dtype == torch.float16 else kernels.linear_bf16w
    for got, w in zip(kernels.linear_w16_many(x, ws), ws):
        assert torch.equal(got, one(x, w))
    with pytest.raises(RuntimeError, match="w must be float16"):
        kernels.linear_w16_many(x, [ws[0].half(), ws[1].bfloat16()])
    with pytest.raises(RuntimeError, match="no weights"):
        kernels.linear_w16_many(x, [])


def _decode_logits(model_dir) -> tuple[ExLlamaV2, torch.Tensor]:
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    model.load()
    ids = torch.randint(3, 250, (1, 20), generator=torch.Generator().manual_seed(9))
    cache = ExLlamaV2Cache(model, max_seq_len=32)
    parts = [model.forward(ids[:, :12], cache)] + [model.forward(ids[:, i : i + 1], cache) for i in range(12, 20)]
    return model, torch.cat(parts, 1)


@needs_kernels
def test_decode_projects_q_k_v_and_gate_up_in_one_call_each(tiny_model_factory, monkeypatch, layer_path):
    """The layers' own path: a forward of up to 16 rows calls linear_w16_many twice per layer (q/k/v, gate/up), with the logits of one
    call per weight."""
    model_dir, _ = tiny_model_factory("qwen2")           # biases on q, k and v too
    calls, real = [], kernels.linear_w16_many
    monkeypatch.setattr(kernels, "linear_w16_many", lambda x, ws: calls.append(len(ws)) or real(x, ws))
    model, together = _decode_logits(model_dir)
    # the 12-row prefill and 8 decode steps
    assert calls.count(3) == calls.count(2) == 9 * model.config.num_hidden_layers
    monkeypatch.setattr(kernels, "linear_w16_many", lambda x, ws: [
        (kernels.linear_f16w if w.dtype == torch.float16 else kernels.linear_bf16w)(x, w) for w in ws])
    assert torch.equal(_decode_logits(model_dir)[1], together)


@needs_kernels
def test_fp16_weights_on_the_cpu_match_fp32_weights(tiny_model_factory, monkeypatch):
    model_dir, _ = tiny_model_factory("qwen2")           # biases too
    model, with_kernel = _decode_logits(model_dir)
    assert model.modules[1].q_proj.weight.dtype == torch.float16
    monkeypatch.setattr(ext, "cpu_kernels", lambda: None)
    model, without = _decode_logits(model_dir)
    assert model.modules[1].q_proj.weight.dtype == torch.float32
    torch.testing.assert_close(with_kernel, without, rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) not installed")
def test_avx512_instructions_stay_in_the_avx512_kernels():
    """The library must run on AVX2-only CPUs: AVX-512 registers and EVEX-only instructions may appear only in
    functions of the exlcpu::avx512 and exlcpu::avx512bf16 namespaces (reached after the run-time CPU checks),
    never in shared code."""
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", kernels.__file__],
                             capture_output=True, text=True, check=True).stdout
    evex = re.compile(r"zmm|[xy]mm(1[6-9]|2[0-9]|3[01])\b|\{1to|%k[0-7]|vpternlog|vpermt2|kmov")
    function, offenders, seen = "", set(), 0
    for line in listing.splitlines():
        if line.endswith(">:"):
            function = line
        elif evex.search(line):
            seen += 1
            if "exlcpu::avx512::" not in function and "exlcpu::avx512bf16::" not in function:
                offenders.add(function)
    assert not offenders
    assert seen > 0 or kernels.isa() == "avx2"


def _without_decode_attention(model) -> None:
    """The model's ops tables as they are, less the decode-attention kernels (the backends' own path)."""
    for key, table in model._ops.items():
        model._ops[key] = dataclasses.replace(table, decode_attention=None, paged_decode_attention=None)


def _contiguous_decode(model, batch: int) -> torch.Tensor:
    ids = torch.randint(3, 250, (batch, 14), generator=torch.Generator().manual_seed(9))
    cache = ExLlamaV2Cache(model, batch_size=batch, max_seq_len=32)
    parts = [model.forward(ids[:, :8], cache)] + [model.forward(ids[:, i : i + 1], cache) for i in range(8, 14)]
    return torch.cat(parts, 1).float()


def _paged_decode(model, lengths: list[int]) -> torch.Tensor:
    """Each sequence prefilled alone into its own page, then decoded together: one query per row over a different
    number of keys (the gather path's ragged metadata)."""
    from exllamav2.model.attn_params import PagedParams

    gen = torch.Generator().manual_seed(11)
    cache = ExLlamaV2Cache(model, max_seq_len=256 * len(lengths))
    table = torch.arange(len(lengths), dtype=torch.int32).view(-1, 1)
    for row, n in enumerate(lengths):
        ids = torch.randint(3, 250, (1, n), generator=gen)
        model.forward(ids, cache, attn_params=PagedParams(1, table[row : row + 1], torch.tensor([0]), q_len=n))
    seqlens, steps = torch.tensor(lengths), []
    for _ in range(4):
        ids = torch.randint(3, 250, (len(lengths), 1), generator=gen)
        params = PagedParams(len(lengths), table, seqlens, max_cache_seqlen=int(seqlens.max()))
        steps.append(model.forward(ids, cache, attn_params=params))
        seqlens = seqlens + 1
    return torch.cat(steps, 1).float()


def _with_and_without_decode_attention(model_dir, dtype: str, calls: list) -> tuple[tuple, tuple]:
    """Decode logits (a contiguous cache with batch 2, a paged batch of rows over different numbers of keys) with
    the kernel wired, then without it."""
    config = ExLlamaV2Config(str(model_dir))
    config.cpu_dtype = dtype
    model = ExLlamaV2(config)
    model.load()
    with_kernel = _contiguous_decode(model, 2), _paged_decode(model, [5, 11, 1])
    # per layer (2): the 8-token prefill, 6 contiguous steps and the three paged prompts over their gathered pages
    # (attn_decode), 4 paged steps (attn_decode_paged), the last writing positions 8, 14 and 4
    assert len(calls) == 2 * (1 + 6 + 3 + 4) and calls[0] is None and calls[-1].tolist() == [8, 14, 4]
    _without_decode_attention(model)
    without = _contiguous_decode(model, 2), _paged_decode(model, [5, 11, 1])
    assert len(calls) == 2 * (1 + 6 + 3 + 4)
    return with_kernel, without


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_paged_prefill_takes_the_kernel_where_its_queries_end_the_keys(dtype, isa):
    """A paged batch of 4 new tokens per row after 3, 0 and 7 cached ones (the generator's chunked prefill, or a
    speculative step): the kernel's output through the sdpa backend equals the backend's own path; keys cut short
    of a row's last query are not a prefix per query, and the backend's own path runs."""
    from exllamav2.attn.backends.metadata import paged_metadata
    from exllamav2.attn.backends.sdpa import SdpaBackend

    gen = torch.Generator().manual_seed(3)
    meta = paged_metadata(torch.tensor([3, 0, 7], dtype=torch.int32), 4)
    q = torch.randn(3, 4, 8, 32, generator=gen).to(dtype)
    k, v = (torch.randn(3, meta.k_len, 2, 32, generator=gen).to(dtype) for _ in range(2))
    calls = []
    kernel = lambda *a: calls.append(a[4].tolist()) or _attn_decode(*a)      # noqa: E731
    backend = SdpaBackend("cpu")
    got = backend.attend(q, k, v, meta, scale=32**-0.5, decode_kernel=kernel)
    own = backend.attend(q, k, v, meta, scale=32**-0.5)
    assert calls == [[7, 4, 11]]
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1 / 64, atol=1e-2)
    torch.testing.assert_close(got.float(), own.float(), **tol)
    cut = dataclasses.replace(meta, key_lengths=torch.tensor([7, 3, 11]))
    backend.attend(q, k, v, cut, scale=32**-0.5, decode_kernel=kernel)
    assert len(calls) == 1


@needs_kernels
@pytest.mark.parametrize("arch, backend", [("llama", "sdpa"), ("llama", "matmul"), ("llama_mha", "sdpa")])
def test_decode_attention_kernel_matches_the_backends(tiny_model_factory, monkeypatch, arch, backend, layer_path):
    """The layers' own path: decode logits with the kernel wired (GQA 4/2 and MHA, head dim 16; the kernel takes the
    contiguous prefill too) equal the backend's own path's in float32;
    in bfloat16 (where one attention output rounding the other way moves logits by bf16 ulps) they are as close
    to float32's as the backend's own are."""
    calls = []
    monkeypatch.setattr(kernels, "attn_decode", lambda *a: calls.append(a[4]) or _attn_decode(*a))
    monkeypatch.setattr(kernels, "attn_decode_paged", lambda *a: calls.append(a[6]) or _attn_decode_paged(*a))
    monkeypatch.setenv("EXLLAMA_ATTN_BACKEND", backend)
    model_dir = tiny_model_factory(arch)[0]
    with_kernel, reference = _with_and_without_decode_attention(model_dir, "float32", calls)
    for got, expect in zip(with_kernel, reference):
        torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)
    calls.clear()
    with_kernel, without = _with_and_without_decode_attention(model_dir, "bfloat16", calls)
    for got, own, expect in zip(with_kernel, without, reference):
        assert (got - expect).abs().max() <= 1.25 * (own - expect).abs().max() + 1e-3
