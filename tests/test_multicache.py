"""model.forward(ids, [cache_0, cache_1, ...]): one cache per batch row, as upstream's test_multicache
calls it. Each row must give what a separate forward on its own cache gives, and what transformers
(fp32, eager) gives for that row's whole sequence."""

from __future__ import annotations

import pytest
import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Cache_Q8, ExLlamaV2Config


@pytest.fixture(scope="module")
def model_and_hf(tiny_model_factory):
    model_dir, hf = tiny_model_factory("llama")
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    model.load()
    return model, hf


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() < 1e-3 * b.abs().max())


def test_multicache_rows_equal_separate_forwards_and_transformers(model_and_hf):
    model, hf = model_and_hf
    gen = torch.Generator().manual_seed(7)
    bsz, prompt_len, steps = 3, 12, 4
    ids = torch.randint(3, 250, (bsz, prompt_len + steps), generator=gen)
    caches = [ExLlamaV2Cache(model, max_seq_len=64) for _ in range(bsz)]
    singles = [ExLlamaV2Cache(model, max_seq_len=64) for _ in range(bsz)]

    assert model.forward(ids[:, :prompt_len], caches, preprocess_only=True) is None
    for i in range(bsz):
        model.forward(ids[i : i + 1, :prompt_len], singles[i], preprocess_only=True)
    for step in range(steps):
        pos = prompt_len + step
        logits = model.forward(ids[:, pos : pos + 1], caches)
        assert logits.shape[0] == bsz
        for i in range(bsz):
            alone = model.forward(ids[i : i + 1, pos : pos + 1], singles[i])
            assert torch.equal(logits[i : i + 1], alone)
    assert [c.current_seq_len for c in caches] == [prompt_len + steps] * bsz
    with torch.no_grad():
        ref = hf(ids).logits[:, -1:]
    assert close(logits[..., :250], ref)


def test_multicache_caches_may_hold_different_lengths(model_and_hf):
    model, hf = model_and_hf
    gen = torch.Generator().manual_seed(8)
    rows = [torch.randint(3, 250, (1, n), generator=gen) for n in (5, 17)]
    caches = [ExLlamaV2Cache(model, max_seq_len=64), ExLlamaV2Cache_Q8(model, max_seq_len=64)]
    for r, c in zip(rows, caches):
        model.forward(r[:, :-1], c, preprocess_only=True)
    last = torch.cat([r[:, -1:] for r in rows], dim=0)
    logits, state = model.forward(last, caches, return_last_state=True)
    assert state.shape[0] == 2
    with torch.no_grad():
        ref0 = hf(rows[0]).logits[:, -1:]
    assert close(logits[:1, :, :250], ref0)              # FP16 cache row: transformers' logits
    alone = ExLlamaV2Cache_Q8(model, max_seq_len=64)               # Q8 row: what a separate call on Q8 gives
    model.forward(rows[1][:, :-1], alone, preprocess_only=True)
    assert torch.equal(logits[1:], model.forward(rows[1][:, -1:], alone))


def test_multicache_mismatches_are_named(model_and_hf):
    model, _ = model_and_hf
    ids = torch.randint(3, 250, (2, 4))
    cache = ExLlamaV2Cache(model, max_seq_len=64)
    with pytest.raises(ValueError, match="one cache per batch row: got 1 caches for 2 rows"):
        model.forward(ids, [cache])
    with pytest.raises(ValueError, match="same cache appears twice"):
        model.forward(ids, [cache, cache])
    with pytest.raises(TypeError, match=r"cache\[1\] is a str"):
        model.forward(ids, [cache, "cache"])
