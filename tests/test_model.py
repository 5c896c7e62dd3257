"""Model logits against transformers (fp32, eager) on tiny random models of every architecture."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config

VOCAB = 250
PROMPT = 24          # longer than the sliding windows (8) of the Mistral and Gemma 2 fixtures


@pytest.fixture(params=["auto", "sdpa", "matmul"])
def backend(request, monkeypatch):
    """Every attention backend that can run on this machine, forced through the environment."""
    monkeypatch.setenv("EXLLAMA_ATTN_BACKEND", request.param)
    return request.param


def load(model_dir) -> ExLlamaV2:
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    model.load()
    return model


def assert_matches(ours: torch.Tensor, ref: torch.Tensor) -> None:
    ours = ours[..., :VOCAB].float()
    # within fp16 tolerance of the logit scale, and (nearly) the same argmax everywhere
    tol = 1e-2 * ref.abs().max().item()
    assert (ours - ref).abs().max().item() < tol
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.99


def test_full_prompt(arch, tiny_model_factory):
    model_dir, hf = tiny_model_factory(arch)
    model = load(model_dir)
    ids = torch.randint(3, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    logits = model.forward(ids)
    assert logits.shape == (1, PROMPT, 256)              # vocabulary padded to a multiple of 32
    assert (logits[..., VOCAB:] == -65504.0).all()
    with torch.no_grad():
        assert_matches(logits, hf(ids).logits)


def test_prefill_then_decode(arch, backend, tiny_model_factory):
    model_dir, hf = tiny_model_factory(arch)
    if backend == "sdpa" and arch == "gemma2":
        pytest.skip("sdpa cannot apply Gemma 2's attention softcap (the selector refuses it: tested there)")
    model = load(model_dir)
    if backend != "auto":
        assert model.attn_plan.device_plan(model.devices[0]).backend == backend
    ids = torch.randint(3, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    cache = ExLlamaV2Cache(model, max_seq_len=64)
    parts = [model.forward(ids[:, :10], cache)]
    for i in range(10, PROMPT):
        parts.append(model.forward(ids[:, i : i + 1], cache))
    assert cache.current_seq_len == PROMPT
    with torch.no_grad():
        assert_matches(torch.cat(parts, dim=1), hf(ids).logits)


def test_chunked_prefill_matches(tiny_model_factory):
    model_dir, hf = tiny_model_factory("mistral")
    model = load(model_dir)
    model.config.max_input_len = 5                       # forces 5 chunks through the cache
    ids = torch.randint(3, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    cache = ExLlamaV2Cache(model, max_seq_len=64)
    with torch.no_grad():
        assert_matches(model.forward(ids, cache), hf(ids).logits)
    assert cache.current_seq_len == PROMPT


def test_left_padded_batch(arch, backend, tiny_model_factory):
    model_dir, hf = tiny_model_factory(arch)
    if backend == "sdpa" and arch == "gemma2":
        pytest.skip("sdpa cannot apply Gemma 2's attention softcap (the selector refuses it: tested there)")
    model = load(model_dir)
    gen = torch.Generator().manual_seed(4)
    long = torch.randint(3, VOCAB, (PROMPT,), generator=gen)
    short = torch.randint(3, VOCAB, (PROMPT - 7,), generator=gen)
    ids = torch.stack([long, torch.cat([torch.zeros(7, dtype=torch.long), short])])
    mask = torch.ones(2, PROMPT, dtype=torch.bool)
    mask[1, :7] = False
    offsets = torch.tensor([0, -7])                      # RoPE positions restart at each sequence's start
    cache = ExLlamaV2Cache(model, batch_size=2, max_seq_len=64)
    logits = model.forward(ids, cache, input_mask=mask, position_offsets=offsets)
    with torch.no_grad():
        assert_matches(logits[0], hf(long[None]).logits[0])
        assert_matches(logits[1, 7:], hf(short[None]).logits[0])
    # one decode step for both sequences continues each correctly
    nxt = torch.randint(3, VOCAB, (2, 1), generator=gen)
    step = model.forward(nxt, cache, input_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1),
                         position_offsets=offsets)
    with torch.no_grad():
        assert_matches(step[0], hf(torch.cat([long, nxt[0]])[None]).logits[0, -1:])
        assert_matches(step[1], hf(torch.cat([short, nxt[1]])[None]).logits[0, -1:])


def test_padded_forward_builds_its_attention_mask_once(tiny_model_factory, monkeypatch):
    """Every layer of a forward sees the same keys: the mask is built once per device and window, not per layer."""
    from exllamav2.attn.backends.metadata import AttnMetadata

    monkeypatch.setenv("EXLLAMA_ATTN_BACKEND", "matmul")
    model_dir, _ = tiny_model_factory("llama")
    model = load(model_dir)
    built = []
    original = AttnMetadata._visibility
    monkeypatch.setattr(AttnMetadata, "_visibility", lambda self, *a: built.append(a) or original(self, *a))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, :3] = False
    model.forward(torch.randint(3, VOCAB, (2, 8)), ExLlamaV2Cache(model, batch_size=2, max_seq_len=16),
                  input_mask=mask)
    assert model.config.num_hidden_layers > 1 and len(built) == 1


def test_last_id_only_and_preprocess(tiny_model_factory):
    model_dir, hf = tiny_model_factory("llama")
    model = load(model_dir)
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    cache = ExLlamaV2Cache(model, max_seq_len=32)
    assert model.forward(ids[:, :-1], cache, preprocess_only=True) is None
    last = model.forward(ids[:, -1:], cache, last_id_only=True)
    with torch.no_grad():
        assert_matches(last, hf(ids).logits[:, -1:])


def test_cache_overflow_is_clear(tiny_model_factory):
    model_dir, _ = tiny_model_factory("llama")
    model = load(model_dir)
    cache = ExLlamaV2Cache(model, max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.forward(torch.ones(1, 9, dtype=torch.long), cache)


def test_forward_before_load_is_clear(tiny_model_factory):
    model_dir, _ = tiny_model_factory("llama")
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    with pytest.raises(RuntimeError, match="load"):
        model.forward(torch.ones(1, 4, dtype=torch.long))


def test_autosplit_falls_back_to_cpu(tiny_model_factory, caplog):
    model_dir, hf = tiny_model_factory("qwen2")
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    cache = ExLlamaV2Cache(model, max_seq_len=32, lazy=True)
    with caplog.at_level("INFO"):
        model.load_autosplit(cache, progress=True)
    # without a CUDA device (and only then) everything lands on the CPU and the log says why; on any
    # machine the log names the layers' devices, and each layer's cache tensors sit on its device
    cpu_only = not torch.cuda.is_available()
    layer_devices = sorted({str(m.device) for m in model.modules[1:]})
    assert ("autosplit: no CUDA device" in caplog.text) == cpu_only
    assert (layer_devices == ["cpu"]) == cpu_only
    assert f"{model.config.num_hidden_layers} layers on {', '.join(layer_devices)}" in caplog.text
    from exllamav2.attn import ExLlamaV2Attention

    attn_devices = [m.device for m in model.modules if isinstance(m, ExLlamaV2Attention)]
    assert len(attn_devices) == model.config.num_hidden_layers
    assert [str(t.device) for t in cache.key_states] == [str(d) for d in attn_devices]
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert_matches(model.forward(ids, cache), hf(ids).logits)


def test_load_gen_reports_progress(tiny_model_factory):
    model_dir, _ = tiny_model_factory("llama")
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    seen = []
    model.load(callback=lambda done, total: seen.append((done, total)))
    # as upstream: (i, n) before module i loads, then (n, n); clients key on 0 (start) and n (done)
    assert seen[-1] == (len(model.modules), len(model.modules))
    assert [d for d, _ in seen] == list(range(0, len(model.modules) + 1))
    model.unload()
    assert not model.loaded


def test_rewinding_current_seq_len(tiny_model_factory):
    """Clients rewind the cache by assigning current_seq_len; later tokens overwrite the old ones."""
    model_dir, hf = tiny_model_factory("llama")
    model = load(model_dir)
    gen = torch.Generator().manual_seed(8)
    prefix, a, b = (torch.randint(3, VOCAB, (1, n), generator=gen) for n in (10, 5, 5))
    cache = ExLlamaV2Cache(model, max_seq_len=32)
    model.forward(prefix, cache, preprocess_only=True)
    model.forward(a, cache)
    cache.current_seq_len = 10
    logits = model.forward(b, cache)
    with torch.no_grad():
        assert_matches(logits, hf(torch.cat([prefix, b], 1)).logits[:, 10:])


def test_forced_backend_that_cannot_run_fails_before_loading(tiny_model_factory, monkeypatch):
    """EXLLAMA_ATTN_BACKEND naming a backend this device cannot run raises when the model is built."""
    from exllamav2.attn.env import AttentionConfigError

    model_dir, _ = tiny_model_factory("llama")
    monkeypatch.setenv("EXLLAMA_ATTN_BACKEND", "flash_attn")
    config = ExLlamaV2Config(str(model_dir))
    with pytest.raises(AttentionConfigError, match=r"flash_attn.*(cpu|cuda:\d).*can run there"):
        ExLlamaV2(config)


def test_softcapped_model_never_gets_sdpa(tiny_model_factory, monkeypatch):
    """Gemma 2's attention softcap rules SDPA out; auto mode falls back to matmul with the reason."""
    model_dir, hf = tiny_model_factory("gemma2")
    monkeypatch.delenv("EXLLAMA_ATTN_BACKEND", raising=False)
    model = load(model_dir)
    plan = model.attn_plan.device_plan(model.devices[0])
    assert plan.backend == "matmul"
    assert "softcap" in plan.rejected_dict["sdpa"]


def test_indexed_embeddings_stand_in_for_tokens(tiny_model_factory):
    """ids >= EMBEDDING_INDEX read rows of `indexed_embeddings` (upstream's multimodal path): feeding a
    token's own embedding row that way gives the same logits as the token."""
    from exllamav2.model.embedding import EMBEDDING_INDEX

    model_dir, _ = tiny_model_factory("llama")
    model = load(model_dir)
    ids = torch.tensor([[5, 17, 42, 9]])
    table = model.modules[0].weight
    extra = table[[17, 42]].float()
    mixed = torch.tensor([[5, EMBEDDING_INDEX, EMBEDDING_INDEX + 1, 9]])
    torch.testing.assert_close(model.forward(mixed, indexed_embeddings=extra), model.forward(ids))


def test_longrope_switches_to_long_factors_past_the_original_length(tiny_model_factory):
    """Phi-3 LongRoPE: a prompt past original_max_position_embeddings (64) uses the long factors, as transformers
    does; the shorter prompts of the tests above use the short ones. (A generation that crosses 64 keeps the keys
    cached before it, where transformers' Phi-3 generate re-encodes the whole sequence: the README says so.)"""
    model_dir, hf = tiny_model_factory("phi3_longrope")
    model = load(model_dir)
    ids = torch.randint(3, VOCAB, (1, 80), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert_matches(model.forward(ids), hf(ids).logits)
        assert_matches(model.forward(ids[:, :20]), hf(ids[:, :20]).logits)


def test_paged_forward_builds_its_metadata_once(tiny_model_factory, monkeypatch):
    """A paged forward through the gather fallback (without the CPU attention kernel, which takes this prefill over
    the gathered pages without a mask): one metadata and one visibility mask for all layers, and the longest
    sequence taken from the generator's max_cache_seqlen instead of read back per layer."""
    import exllamav2.model.attn_params as params_module
    from exllamav2.attn.backends.metadata import AttnMetadata
    from exllamav2.model.attn_params import PagedParams

    monkeypatch.setenv("EXLLAMA_ATTN_BACKEND", "matmul")
    model_dir, hf = tiny_model_factory("llama")
    model = load(model_dir)
    for key, table in model._ops.items():
        model._ops[key] = dataclasses.replace(table, decode_attention=None, paged_decode_attention=None)
    built, masks = [], []
    original, visibility = params_module.paged_metadata, AttnMetadata._visibility
    monkeypatch.setattr(params_module, "paged_metadata", lambda *a: built.append(a) or original(*a))
    monkeypatch.setattr(AttnMetadata, "_visibility", lambda self, *a: masks.append(a) or visibility(self, *a))
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(10))
    cache = ExLlamaV2Cache(model, max_seq_len=256)
    table = torch.zeros(1, 1, dtype=torch.int32)
    params = PagedParams(1, table, torch.tensor([0], dtype=torch.int32), max_cache_seqlen=0, page_size=256, q_len=8)
    logits = model.forward(ids, cache, attn_params=params)
    assert model.config.num_hidden_layers > 1 and len(built) == 1 and len(masks) == 1
    with torch.no_grad():
        assert_matches(logits, hf(ids).logits)
