"""Every attention backend against a straightforward reference written here from the visibility rule
of exllamav2/attn/metadata.py (query i of sequence b is at p = past_len[b] + i and sees key j iff
j <= p, j < key_lengths[b], key_mask[b, j] and p - j < window; a row that sees nothing is zero).

On the CPU: matmul and SDPA for real, flash_attn and xformers through the reference fakes in
tests/fakes/reference (the libraries' documented semantics in plain PyTorch), which checks our glue:
mask alignment, window and softcap arguments, GQA, bias alignment, block tables, fallbacks.
GPU tests (marked cuda) run the real packages where installed.
"""

from __future__ import annotations

import pytest
import torch

from exllamav2.attn.backends.backend import AttentionBackend
from exllamav2.attn.backends.matmul import MatmulBackend
from exllamav2.attn.backends.metadata import AttnMetadata
from exllamav2.attn.backends.sdpa import SdpaBackend

HEAD_DIM = 16


def reference(q, k, v, *, past, key_lengths=None, key_mask=None, scale, window=0, softcap=0.0, chunk=0,
              offsets=None):
    """Loop over sequences, queries and heads in float64; `past` is a list of ints. With `chunk`, a query sees
    only keys of its own chunk of positions (position = index + offsets[b])."""
    bsz, q_len, hq, _ = q.shape
    k_len, hkv = k.shape[1], k.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(bsz):
        o = 0 if offsets is None else offsets[b]
        for i in range(q_len):
            p = past[b] + i
            keys = [
                j for j in range(k_len)
                if j <= p
                and (key_lengths is None or j < key_lengths[b])
                and (key_mask is None or key_mask[b][j])
                and (not window or p - j < window)
                and (not chunk or (p + o) // chunk == (j + o) // chunk)
            ]
            if not keys:
                continue
            for h in range(hq):
                kv = h // (hq // hkv)
                scores = torch.stack([q[b, i, h].double() @ k[b, j, kv].double() * scale for j in keys])
                if softcap:
                    scores = softcap * torch.tanh(scores / softcap)
                weights = torch.softmax(scores, dim=0)
                out[b, i, h] = sum(w * v[b, j, kv].double() for w, j in zip(weights, keys))
    return out


# name -> (q_len, k_len, past, key_lengths, key_mask); batch of 2
CASES = {
    "prefill": (6, 6, [0, 0], None, None),
    "chunk_with_cache": (3, 8, [5, 5], None, None),
    "decode": (1, 9, [8, 8], None, None),
    "single_token": (1, 1, [0, 0], None, None),
    "left_padded_prefill": (6, 6, [0, 0], None, [[0, 0, 1, 1, 1, 1], [1] * 6]),
    "left_padded_decode": (1, 7, [6, 6], None, [[0, 0, 0, 1, 1, 1, 1], [1] * 7]),
    "ragged_pages": (2, 6, [4, 1], [6, 3], None),
    "key_mask_with_hole": (6, 6, [0, 0], None, [[1, 1, 0, 1, 1, 1], [1] * 6]),
    "sequence_with_no_keys": (2, 4, [2, 2], None, [[0, 0, 0, 0], [1, 1, 1, 1]]),
}


def make_inputs(case, hq, hkv, dtype, seed=0):
    q_len, k_len, past, key_lengths, key_mask = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(2, q_len, hq, HEAD_DIM, generator=gen) * 2).to(dtype)
    k = (torch.randn(2, k_len, hkv, HEAD_DIM, generator=gen) * 2).to(dtype)
    v = torch.randn(2, k_len, hkv, HEAD_DIM, generator=gen).to(dtype)
    uniform = past[0] == past[1] and key_lengths is None
    meta = AttnMetadata(
        batch_size=2,
        q_len=q_len,
        k_len=k_len,
        past_len=past[0] if uniform else torch.tensor(past),
        key_lengths=None if key_lengths is None else torch.tensor(key_lengths),
        key_mask=None if key_mask is None else torch.tensor(key_mask, dtype=torch.bool),
    )
    ref_kwargs = dict(past=past, key_lengths=key_lengths, key_mask=key_mask)
    return q, k, v, meta, ref_kwargs


TOL = {torch.float32: 2e-5, torch.float16: 1e-2}


def check(backend: AttentionBackend, case, hq, hkv, dtype, window, softcap):
    q, k, v, meta, ref_kwargs = make_inputs(case, hq, hkv, dtype)
    scale = HEAD_DIM**-0.5
    out = backend.attend(q, k, v, meta, scale=scale, window=window, softcap=softcap)
    expect = reference(q, k, v, scale=scale, window=window, softcap=softcap, **ref_kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), expect, atol=TOL[dtype], rtol=TOL[dtype])


GQA = [(4, 4), (4, 2), (4, 1)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_matmul_matches_reference(case, hq, hkv, window, softcap):
    check(MatmulBackend("cpu"), case, hq, hkv, torch.float32, window, softcap)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sdpa_matches_reference(case, hq, hkv, window, dtype):
    check(SdpaBackend("cpu"), case, hq, hkv, dtype, window, 0.0)


@pytest.mark.parametrize("kernels", [("math",), ("flash", "math")])
def test_sdpa_kernel_choice_does_not_change_results(kernels):
    check(SdpaBackend("cpu", kernels=kernels), "chunk_with_cache", 4, 2, torch.float32, 0, 0.0)


def test_sdpa_refuses_softcap_instead_of_ignoring_it():
    q, k, v, meta, _ = make_inputs("prefill", 4, 2, torch.float32)
    with pytest.raises(ValueError, match="softcap"):
        SdpaBackend("cpu").attend(q, k, v, meta, scale=0.25, softcap=5.0)


def test_fp16_matmul_does_not_overflow_on_large_activations():
    # q.k of ~ 64 * 40 * 40 = 1e5 overflows fp16 (max 65504) unless scaled first and summed in fp32
    q = torch.full((1, 2, 2, 64), 40.0, dtype=torch.float16)
    k = torch.full((1, 2, 2, 64), 40.0, dtype=torch.float16)
    v = torch.randn(1, 2, 2, 64).half()
    meta = AttnMetadata(batch_size=1, q_len=2, k_len=2)
    for backend in (MatmulBackend("cpu"), SdpaBackend("cpu")):
        out = backend.attend(q, k, v, meta, scale=64**-0.5)
        assert torch.isfinite(out).all(), backend.name


# paged -------------------------------------------------------------------------------------------


def paged_inputs(page_size, dtype, hq=4, hkv=2, seed=1):
    """Two sequences holding 5 and 2 tokens in scrambled pages, each given 2 new tokens."""
    gen = torch.Generator().manual_seed(seed)
    pages = 6
    k_pages = torch.randn(pages, page_size, hkv, HEAD_DIM, generator=gen).to(dtype)
    v_pages = torch.randn(pages, page_size, hkv, HEAD_DIM, generator=gen).to(dtype)
    per_seq = -(-9 // page_size)
    table = torch.tensor([[5, 2, 0][:per_seq], [1, 4, 3][:per_seq]], dtype=torch.int32)
    seqlens = torch.tensor([5, 2], dtype=torch.int32)
    q = torch.randn(2, 2, hq, HEAD_DIM, generator=gen).to(dtype)
    k_new = torch.randn(2, 2, hkv, HEAD_DIM, generator=gen).to(dtype)
    v_new = torch.randn(2, 2, hkv, HEAD_DIM, generator=gen).to(dtype)
    return q, k_new, v_new, k_pages, v_pages, table, seqlens


def paged_reference(q, k_new, v_new, k_pages, v_pages, table, seqlens, window, chunk=0):
    """Read each sequence's old tokens out of its pages by hand, append the new ones, attend."""
    page_size = k_pages.shape[1]
    outs = []
    for b in range(q.shape[0]):
        n = int(seqlens[b])
        old_k = [k_pages[int(table[b, t // page_size]), t % page_size] for t in range(n)]
        old_v = [v_pages[int(table[b, t // page_size]), t % page_size] for t in range(n)]
        keys = torch.stack(old_k + list(k_new[b])).unsqueeze(0)
        values = torch.stack(old_v + list(v_new[b])).unsqueeze(0)
        outs.append(reference(q[b : b + 1], keys, values, past=[n], scale=HEAD_DIM**-0.5, window=window,
                              chunk=chunk))
    return torch.cat(outs)


def check_paged(backend, page_size, dtype, window=0, chunk=0, **kwargs):
    q, k_new, v_new, k_pages, v_pages, table, seqlens = paged_inputs(page_size, dtype)
    expect = paged_reference(q, k_new, v_new, k_pages, v_pages, table, seqlens, window, chunk)
    pages_k, pages_v = k_pages.clone(), v_pages.clone()
    out = backend.attend_paged(q, k_new, v_new, pages_k, pages_v, table, seqlens, scale=HEAD_DIM**-0.5, window=window,
                               **({"chunk": chunk} if chunk else {}), **kwargs)
    torch.testing.assert_close(out.double(), expect, atol=TOL[dtype], rtol=TOL[dtype])
    # the new tokens were stored at positions seqlens[b], seqlens[b] + 1 of each sequence
    for b in range(2):
        for t in range(2):
            pos = int(seqlens[b]) + t
            page = int(table[b, pos // page_size])
            assert torch.equal(pages_k[page, pos % page_size], k_new[b, t])
            assert torch.equal(pages_v[page, pos % page_size], v_new[b, t])


@pytest.mark.parametrize("backend_cls", [MatmulBackend, SdpaBackend])
@pytest.mark.parametrize("window", [0, 3])
def test_paged_matches_dense_reference(backend_cls, window):
    check_paged(backend_cls("cpu"), page_size=4, dtype=torch.float32, window=window)


# chunked local attention (Llama 4) ---------------------------------------------------------------


@pytest.mark.parametrize("backend_cls", [MatmulBackend, SdpaBackend])
@pytest.mark.parametrize("case", ["prefill", "chunk_with_cache", "decode", "left_padded_prefill",
                                  "left_padded_decode", "ragged_pages", "sequence_with_no_keys"])
@pytest.mark.parametrize("offsets", [None, [-2, 1]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunked_attention_matches_reference(backend_cls, case, offsets, dtype):
    """A query sees only the keys in its own chunk of 3 positions, chunks counted from each sequence's position 0
    (index + position_offsets: left padding moves the boundaries)."""
    import dataclasses

    q, k, v, meta, ref_kwargs = make_inputs(case, 4, 2, dtype)
    meta = dataclasses.replace(meta, position_offsets=None if offsets is None else torch.tensor(offsets))
    scale = HEAD_DIM**-0.5
    out = backend_cls("cpu").attend(q, k, v, meta, scale=scale, chunk=3)
    expect = reference(q, k, v, scale=scale, chunk=3, offsets=offsets, **ref_kwargs)
    torch.testing.assert_close(out.double(), expect, atol=TOL[dtype], rtol=TOL[dtype])
    if case == "prefill":       # the chunks really cut: the unchunked result differs
        assert not torch.allclose(out.double(), reference(q, k, v, scale=scale, **ref_kwargs), atol=1e-2)


@pytest.mark.parametrize("backend_cls", [MatmulBackend, SdpaBackend])
def test_paged_chunked_attention_matches_reference(backend_cls):
    """The dynamic generator's paged path: pages gathered, then chunked as the dense path; the fused paged kernel
    (which knows no chunks) is not used for a chunked layer even where the ops table offers it."""
    def kernel(*args):
        raise AssertionError("the paged-attention kernel ran a chunked layer")

    # float16 pages: a call the kernel would take (paged_kernel_fits) but for the chunk
    check_paged(backend_cls("cpu"), page_size=4, dtype=torch.float16, chunk=3, kernel=kernel)


@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
def test_flash_and_xformers_refuse_chunks_instead_of_ignoring_them(fakes, backend):
    fakes("reference")
    q, k, v, meta, _ = make_inputs("prefill", 4, 2, torch.float16)
    made = flash_backend(SdpaBackend("cpu")) if backend == "flash_attn" else xformers_backend()
    with pytest.raises(ValueError, match="chunked local attention"):
        made.attend(q, k, v, meta, scale=0.25, chunk=3)


# flash_attn and xformers glue, through the reference fakes ---------------------------------------


def flash_backend(fallback=None):
    from exllamav2.attn.backends.flash import FlashAttnBackend

    return FlashAttnBackend("cpu", fallback=fallback)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_flash_glue_matches_reference(fakes, case, hq, hkv, window, softcap):
    fakes("reference")
    fallback = None if softcap else SdpaBackend("cpu")   # as the plan chooses: SDPA can't softcap
    check(flash_backend(fallback), case, hq, hkv, torch.float16, window, softcap)


def test_flash_hands_only_masks_it_cannot_express_to_the_fallback(fakes):
    fakes("reference")

    class Recording(MatmulBackend):
        calls = 0

        def attend(self, *args, **kwargs):
            Recording.calls += 1
            return super().attend(*args, **kwargs)

    backend = flash_backend(Recording("cpu"))
    for case in ("chunk_with_cache", "left_padded_prefill", "left_padded_decode", "ragged_pages", "sequence_with_no_keys"):
        check(backend, case, 4, 2, torch.float16, 0, 0.0)
    assert Recording.calls == 0
    check(backend, "key_mask_with_hole", 4, 2, torch.float16, 0, 0.0)
    assert Recording.calls == 1


@pytest.mark.parametrize("page_size", [256, 4])   # 4: not a multiple of 256 -> gather path
@pytest.mark.parametrize("window", [0, 3])
def test_flash_paged_glue(fakes, page_size, window):
    fakes("reference")
    check_paged(flash_backend(SdpaBackend("cpu")), page_size=page_size, dtype=torch.float16, window=window)


def xformers_backend():
    from exllamav2.attn.backends.xformers import XformersBackend

    return XformersBackend("cpu")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_xformers_glue_matches_reference(fakes, case, hq, hkv, window, dtype):
    fakes("reference")
    check(xformers_backend(), case, hq, hkv, dtype, window, 0.0)


def no_repeat(*args):
    raise AssertionError("a decode step repeated the cache's kv heads")


@pytest.mark.parametrize("case", ["decode", "single_token", "left_padded_decode"])
@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 1)])
def test_sdpa_decode_attends_to_the_cache_as_stored(monkeypatch, case, window, hq, hkv):
    """One query position: each kv head's query heads become rows, so the keys are never copied G times."""
    from exllamav2.attn.backends import sdpa

    monkeypatch.setattr(sdpa, "repeat_kv", no_repeat)
    check(SdpaBackend("cpu"), case, hq, hkv, torch.float32, window, 0.0)


@pytest.mark.parametrize("case", ["decode", "single_token"])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 1)])
def test_xformers_decode_attends_to_the_cache_as_stored(fakes, monkeypatch, case, hq, hkv):
    from exllamav2.attn.backends import xformers

    fakes("reference")
    monkeypatch.setattr(xformers, "repeat_kv", no_repeat)
    check(xformers_backend(), case, hq, hkv, torch.float16, 0, 0.0)


def test_xformers_paged_glue(fakes):
    fakes("reference")
    check_paged(xformers_backend(), page_size=4, dtype=torch.float16, window=3)


def test_xformers_bias_rows_are_aligned_for_odd_key_counts():
    from exllamav2.attn.backends.xformers import additive_bias

    vis = torch.ones(2, 1, 3, 7, dtype=torch.bool).tril(4)
    bias = additive_bias(vis, torch.float16, heads=4)
    assert bias.shape == (2, 4, 3, 7)
    assert all(bias.stride(d) % 8 == 0 for d in range(3))
    assert torch.equal(bias[:, 0] == 0, vis[:, 0])


# GPU ----------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_backends():
    """(name, factory) for every backend that can run on cuda:0 here."""
    from exllamav2.attn.devices import describe_device
    from exllamav2.attn.installed import find_installed
    from exllamav2.attn.registry import backend_class
    from exllamav2.attn.backends.sdpa import allowed_kernels
    from exllamav2.attn.selector import ModelNeeds

    device = describe_device("cuda:0")
    installed = find_installed()
    found = [("sdpa", lambda: SdpaBackend("cuda:0", kernels=allowed_kernels(device)))]
    for name in ("flash_attn", "xformers"):
        if not backend_class(name).validate(device, ModelNeeds(head_dim=HEAD_DIM), installed):
            found.append((name, lambda name=name: backend_class(name)("cuda:0")))
    return found


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 1)])
def test_gpu_backends_match_matmul(case, window, hq, hkv):
    q, k, v, meta, _ = make_inputs(case, hq, hkv, torch.float16)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    scale = HEAD_DIM**-0.5
    expect = MatmulBackend("cuda:0").attend(q, k, v, meta, scale=scale, window=window).float()
    for name, make in gpu_backends():
        out = make().attend(q, k, v, meta, scale=scale, window=window)
        torch.testing.assert_close(out.float(), expect, atol=1e-2, rtol=1e-2, msg=lambda m: f"{name}: {m}")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("page_size", [256, 16])
def test_gpu_paged_matches_matmul(page_size):
    q, k_new, v_new, k_pages, v_pages, table, seqlens = (t.cuda() for t in paged_inputs(page_size, torch.float16))
    scale = HEAD_DIM**-0.5
    expect = MatmulBackend("cuda:0").attend_paged(q, k_new, v_new, k_pages.clone(), v_pages.clone(), table, seqlens, scale=scale)
    for name, make in gpu_backends():
        out = make().attend_paged(q, k_new, v_new, k_pages.clone(), v_pages.clone(), table, seqlens, scale=scale)
        torch.testing.assert_close(out.float(), expect.float(), atol=1e-2, rtol=1e-2, msg=lambda m: f"{name}: {m}")
