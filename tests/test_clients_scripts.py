"""Upstream-style client scripts, run end to end, so an API drift is caught the day it happens (issue 19).

Each `script_*` is written the way upstream's examples and TabbyAPI / text-generation-webui / ExUI call the
API: only public names, keyword arguments as those clients spell them, results read by the keys they read.
They run on the tiny random Llama (conftest `tiny`) and the bundled demo model (examples/demo_model, FP16
and EXL2). Where a script produces numbers or text, the check is against an independent reference:
transformers' greedy generate on the same weights (merged weights for LoRA), or the same script run
without the feature (speculation, CFG at scale 1).
"""

from __future__ import annotations

import argparse
import asyncio
import re
from pathlib import Path

import pytest
import torch

from exllamav2 import (ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Cache_Q4, ExLlamaV2Cache_Q6, ExLlamaV2Cache_Q8,
                       ExLlamaV2Config, ExLlamaV2Lora, ExLlamaV2Tokenizer, model_init)
from exllamav2.generator import (ExLlamaV2BaseGenerator, ExLlamaV2DynamicGenerator, ExLlamaV2DynamicGeneratorAsync,
                                 ExLlamaV2DynamicJob, ExLlamaV2DynamicJobAsync, ExLlamaV2Sampler,
                                 ExLlamaV2StreamingGenerator)
from tests.test_clients_compat import PATTERN, RegexFilter
from tests.test_lora import make_adapter, merged_reference
from tests.test_generators import hf_greedy, load

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo_model"
CHAT_PROMPT = "User: How do I use json.dumps?\nChatbort:"
PROMPT = "The function returns the value of the"
LORA_PROMPT = "format the string with the given keyword arguments"   # greedy margins >= 0.07 with and without the adapter


@pytest.fixture(scope="module")
def tiny_loaded(tiny):
    model, tok = load(tiny[0], 512)
    return model, tok, tiny[1]


def collect(generator: ExLlamaV2DynamicGenerator) -> dict:
    """Drive iterate() as upstream's examples do; per identifier: text, token ids and the last result."""
    out: dict = {}
    while generator.num_remaining_jobs():
        for r in generator.iterate():
            o = out.setdefault(r["identifier"], {"text": "", "ids": [], "last": None})
            if r["stage"] == "streaming":
                o["text"] += r.get("text", "")
                o["ids"] += r["token_ids"][0].tolist() if "token_ids" in r else []
                if r["eos"]:
                    o["last"] = r
    return out


# 1. dynamic jobs with every sampler setting (TabbyAPI's async path) -------------------------------


def every_setting(tok) -> list[ExLlamaV2Sampler.Settings]:
    """Groups of Sampler.Settings fields Tabby sets from a request; mirostat and dynatemp apart."""
    a = ExLlamaV2Sampler.Settings()
    a.temperature, a.temperature_last, a.smoothing_factor = 0.9, True, 0.0
    a.top_k, a.top_p, a.top_a, a.min_p, a.tfs, a.typical, a.skew = 40, 0.95, 0.05, 0.02, 0.97, 0.95, 0.1
    a.token_repetition_penalty, a.token_repetition_range, a.token_repetition_decay = 1.1, 64, 16
    a.token_frequency_penalty, a.token_presence_penalty = 0.1, 0.1
    a.dry_multiplier, a.dry_allowed_length, a.dry_base, a.dry_range = 0.8, 2, 1.75, 64
    a.dry_sequence_breakers = set(tok.encode("\n .,")[0].tolist())
    a.xtc_probability, a.xtc_threshold = 0.5, 0.1
    a.disallow_tokens(tok, [tok.eos_token_id, 5])
    b = ExLlamaV2Sampler.Settings()
    b.mirostat, b.mirostat_tau, b.mirostat_eta = True, 1.5, 0.1
    b.disallow_tokens(tok, [5])
    c = ExLlamaV2Sampler.Settings()
    c.min_temp, c.max_temp, c.temp_exponent, c.smoothing_factor = 0.5, 1.5, 1.0, 0.3
    c.disallow_tokens(tok, [5])
    d = ExLlamaV2Sampler.Settings()
    d.allow_tokens(tok, list(range(40, 60)))
    bias = torch.zeros(tok.get_vocab_size() + 32)[: -(-tok.get_vocab_size() // 32) * 32]
    bias[5] = float("-inf")
    e = ExLlamaV2Sampler.Settings(token_bias=bias, top_k=0, top_p=0.0)
    return [a, b, c, d, e]


def script_tabby_async_jobs(model, tok) -> list[dict]:
    async def run():
        gen = ExLlamaV2DynamicGeneratorAsync(model=model, cache=ExLlamaV2Cache(model, max_seq_len=512, lazy=False),
                                             draft_model=None, draft_cache=None, tokenizer=tok, max_batch_size=4,
                                             paged=True)
        jobs = []
        for i, settings in enumerate(every_setting(tok)):
            ids = tok.encode(PROMPT, add_bos=True)
            jobs.append(ExLlamaV2DynamicJobAsync(
                gen, input_ids=ids, max_new_tokens=10, min_new_tokens=2, gen_settings=settings, seed=1234,
                stop_conditions=[tok.eos_token_id], decode_special_tokens=False, filters=[], filter_prefer_eos=False,
                return_probs=True, return_top_tokens=2, return_logits=False, banned_strings=[], token_healing=False,
                identifier=f"job-{i}", embeddings=[]))

        async def consume(job):
            return [r async for r in job]

        # Tabby's older grammar path: lm-format-enforcer's filter object, which does not subclass ExLlamaV2Filter
        jobs.append(ExLlamaV2DynamicJobAsync(
            gen, input_ids=tok.encode("Return", add_bos=True), max_new_tokens=10,
            gen_settings=ExLlamaV2Sampler.Settings.greedy(), stop_conditions=[tok.eos_token_id],
            filters=[RegexFilter(tok, PATTERN)], filter_prefer_eos=True, identifier="grammar"))
        results = await asyncio.gather(*(consume(j) for j in jobs))
        await gen.close()
        return results

    return asyncio.run(run())


def test_tabby_async_jobs_with_every_sampler_setting(tiny_loaded):
    model, tok, _ = tiny_loaded
    first = script_tabby_async_jobs(model, tok)
    again = script_tabby_async_jobs(model, tok)
    grammar = first.pop()
    again.pop()
    assert re.fullmatch(PATTERN, "".join(r.get("text", "") for r in grammar if r["stage"] == "streaming"))
    for i, (results, rerun) in enumerate(zip(first, again)):
        ids = [t for r in results if r["stage"] == "streaming" for t in r["token_ids"][0].tolist()]
        assert ids == [t for r in rerun if r["stage"] == "streaming" for t in r["token_ids"][0].tolist()], \
            f"job {i}: the same seed gave different tokens"
        last = results[-1]
        assert last["eos"] and last["identifier"] == f"job-{i}" and 2 <= last["new_tokens"] <= 10
        assert 5 not in ids and tok.eos_token_id not in ids[:2]            # disallowed; min_new_tokens
        for key in ("prompt_tokens", "cached_tokens", "time_enqueued", "time_prefill", "time_generate"):
            assert key in last
        if i == 3:
            assert set(ids) <= set(range(40, 60)), "allow_tokens let other tokens through"
        for r in results:
            if r["stage"] == "streaming" and r["token_ids"].numel():
                assert r["token_probs"].shape == r["token_ids"].shape
                assert r["top_k_tokens"].shape[-1] == 2 and bool((r["top_k_probs"] <= 1).all())


# 2. banned strings and stop conditions ----------------------------------------------------------


def test_banned_strings_and_stop_conditions(tiny_loaded):
    model, tok, hf = tiny_loaded
    ids = tok.encode(PROMPT, add_bos=True)
    plain = tok.decode(torch.tensor(hf_greedy(hf, ids, 16)))
    words = [w for w in plain.split() if len(w) > 2]
    assert words, f"greedy text {plain!r} has no word to ban"
    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=512), tok)
    banned, stop = words[0], words[-1]
    gen.enqueue(ExLlamaV2DynamicJob(ids, 16, gen_settings=ExLlamaV2Sampler.Settings.greedy(), identifier="ban",
                                    banned_strings=[banned]))
    gen.enqueue(ExLlamaV2DynamicJob(ids, 16, gen_settings=ExLlamaV2Sampler.Settings.greedy(), identifier="stop",
                                    stop_conditions=[stop, tok.eos_token_id]))
    out = collect(gen)
    assert banned not in out["ban"]["text"]
    # the text before the banned string's first token is kept (that token may carry a leading space)
    assert out["ban"]["text"].startswith(plain[: plain.index(banned)].rstrip())
    stopped = out["stop"]["last"]
    assert stopped["eos_reason"] == "stop_string" and stopped["eos_triggering_string"] == stop
    assert out["stop"]["text"] == plain[: plain.index(stop)]


# 3. CFG -------------------------------------------------------------------------------------------


def test_cfg_prompt_pair(tiny_loaded):
    model, tok, hf = tiny_loaded
    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=1024), tok, max_batch_size=4)
    settings = ExLlamaV2Sampler.Settings.greedy()
    settings.cfg_scale = 1.0                    # all weight on the positive prompt: plain greedy
    neg = "Open the file and read it"
    text = gen.generate((PROMPT, neg), max_new_tokens=8, gen_settings=settings, completion_only=True, add_bos=True)
    ids = tok.encode(PROMPT, add_bos=True)
    assert text == tok.decode(torch.tensor(hf_greedy(hf, ids, 8)))
    settings.cfg_scale = 2.0
    stronger = gen.generate((PROMPT, neg), max_new_tokens=8, gen_settings=settings, completion_only=True, add_bos=True)
    assert isinstance(stronger, str)


# 4. LoRA ------------------------------------------------------------------------------------------


def test_lora_as_tabby_loads_it(tiny_loaded, tmp_path):
    model, tok, hf = tiny_loaded
    tensors = make_adapter(tmp_path / "lora", hf)
    lora = ExLlamaV2Lora.from_directory(model, str(tmp_path / "lora"), 1.0)
    ids = tok.encode(LORA_PROMPT, add_bos=True)
    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=512), tok)
    gen.set_loras([lora])
    assert gen.current_loras == [lora]
    with_lora = gen.generate(LORA_PROMPT, max_new_tokens=8, gen_settings=ExLlamaV2Sampler.Settings.greedy(),
                             completion_only=True, add_bos=True)
    gen.set_loras([])
    without = gen.generate(LORA_PROMPT, max_new_tokens=8, gen_settings=ExLlamaV2Sampler.Settings.greedy(),
                           completion_only=True, add_bos=True)
    lora.unload()
    assert with_lora == tok.decode(torch.tensor(hf_greedy(merged_reference(hf, tensors, 2.0), ids, 8)))
    assert without == tok.decode(torch.tensor(hf_greedy(hf, ids, 8)))


# 5. draft-model and n-gram speculation -----------------------------------------------------------


def test_speculative_generators_keep_greedy_output(tiny, tiny_loaded):
    model, tok, hf = tiny_loaded
    # upstream chat.py's draft model: a second load of the same weights, RoPE knobs from absent CLI flags
    draft_config = ExLlamaV2Config(str(tiny[0]))
    draft_config.max_seq_len = 512
    draft_config.scale_pos_emb, draft_config.scale_alpha_value = None, None
    draft = ExLlamaV2(draft_config)
    draft.load()
    prompt = " ".join(["the list of items"] * 3)
    ids = tok.encode(prompt, add_bos=True)
    want = tok.decode(torch.tensor(hf_greedy(hf, ids, 12)))
    greedy = ExLlamaV2Sampler.Settings.greedy()
    for kwargs in ({"draft_model": draft, "draft_cache": ExLlamaV2Cache(draft, max_seq_len=512), "num_draft_tokens": 3},
                   {"use_ngram_draft": True}):
        gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=512), tok, **kwargs)
        assert gen.generate(prompt, max_new_tokens=12, gen_settings=greedy, completion_only=True, add_bos=True) == want
    stream = ExLlamaV2StreamingGenerator(model, ExLlamaV2Cache(model, max_seq_len=512), tok, draft_model=draft,
                                         draft_cache=ExLlamaV2Cache(draft, max_seq_len=512), num_speculative_tokens=3)
    stream.set_stop_conditions([])
    stream.begin_stream(ids, greedy)
    got: list[int] = []
    while len(got) < 12:                        # a step may yield several tokens (accepted drafts)
        chunk, eos, token_ids = stream.stream()
        got += token_ids[0].tolist()
    assert tok.decode(torch.tensor(got[:12])) == want
    efficiency, accuracy, total, drafted, accepted = stream.get_sd_stats()
    assert drafted > 0 and accepted > 0
    # text-generation-webui / upstream's speculative example: n-gram speculation with preloaded text
    stream = ExLlamaV2StreamingGenerator(model, ExLlamaV2Cache(model, max_seq_len=512), tok)
    stream.speculative_ngram = True
    stream.speculative_ngram_max_inf, stream.speculative_ngram_threshold = 2, 1
    stream.ngram_preload(tok.encode(prompt + want))
    stream.set_stop_conditions([])
    stream.begin_stream(ids, greedy, loras=None)
    got = []
    while len(got) < 12:
        got += stream.stream()[2][0].tolist()
    assert tok.decode(torch.tensor(got[:12])) == want and stream.get_sd_stats()[4] > 0


# 6. quantized caches with load_autosplit (demo model, as TabbyAPI loads) ------------------------


@pytest.fixture(scope="module")
def demo_fp16_hf():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(str(DEMO / "fp16"), torch_dtype=torch.float32).eval()


def test_quantized_caches_with_autosplit_on_the_demo_model(demo_fp16_hf):
    config = ExLlamaV2Config(str(DEMO / "fp16"))
    config.max_seq_len = 256
    model = ExLlamaV2(config)
    tok = ExLlamaV2Tokenizer(config)
    first = ExLlamaV2Cache_Q8(model, max_seq_len=256, lazy=True)
    model.load_autosplit(first, reserve_vram=[96 * 1024**2])          # Tabby's one-entry autosplit_reserve
    ids = tok.encode(CHAT_PROMPT, add_bos=True)
    # 6 tokens: at each of them the top logit leads the runner-up by >= 0.1 under FP16, Q8, Q6 and Q4 caches
    # (measured); the 7th and 8th are near ties (0.05, 0.006) that rounding could flip on another CPU
    want = tok.decode(torch.tensor(hf_greedy(demo_fp16_hf, ids, 6)))
    greedy = ExLlamaV2Sampler.Settings.greedy()
    for cache in (first, ExLlamaV2Cache_Q6(model, max_seq_len=256), ExLlamaV2Cache_Q4(model, max_seq_len=256)):
        gen = ExLlamaV2DynamicGenerator(model, cache, tok)
        text = gen.generate(CHAT_PROMPT, max_new_tokens=6, gen_settings=greedy, completion_only=True, add_bos=True)
        assert text == want, type(cache).__name__


# 7. streaming with probabilities and top tokens (text-generation-webui, ExUI) on EXL2 ------------


def test_exl2_streaming_with_probabilities_and_top_tokens():
    config = ExLlamaV2Config()
    config.model_dir = str(DEMO / "exl2")
    config.prepare()
    config.max_seq_len = 256
    model = ExLlamaV2(config)
    model.load(None)
    tok = ExLlamaV2Tokenizer(config)
    gen = ExLlamaV2StreamingGenerator(model, ExLlamaV2Cache(model, max_seq_len=256), tok)
    gen.set_stop_conditions(["\nUser:", tok.eos_token_id])
    gen.begin_stream_ex(tok.encode(CHAT_PROMPT, add_bos=True), ExLlamaV2Sampler.Settings.greedy(),
                        return_probabilities=True, return_top_tokens=3)
    text, steps = "", 0
    while steps < 24:
        r = gen.stream_ex()
        steps += 1
        text += r["chunk"]
        n = r["chunk_token_ids"].shape[-1]
        if n:
            assert r["probs"].shape == (1, n) and r["top_tokens"].shape == (1, n, 3)
            assert torch.equal(r["top_tokens"][..., 0], r["chunk_token_ids"])     # greedy picks the top token
            assert torch.allclose(r["probs"], r["top_probs"][..., 0])
        if r["eos"]:
            break
    assert text and "\nUser:" not in text
    chunk, eos, ids, probs, top_tokens, top_probs = gen.stream()          # legacy tuple, same options
    assert ids.shape[0] == probs.shape[0] == 1


# 8. token healing ---------------------------------------------------------------------------------


def test_token_healing_in_dynamic_and_streaming(tiny_loaded):
    model, tok, _ = tiny_loaded
    prompt = "The function returns the val"
    ids = tok.encode(prompt, add_bos=True)
    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=512), tok)
    gen.enqueue(ExLlamaV2DynamicJob(ids, 6, gen_settings=ExLlamaV2Sampler.Settings.greedy(), token_healing=True,
                                    identifier="heal"))
    out = collect(gen)["heal"]
    # the prompt's last token is regrown: the first new token's text starts with it, and the streamed
    # text is what follows the prompt
    full = tok.decode(torch.tensor(ids[0, :-1].tolist() + out["ids"]))
    assert full.startswith(prompt) and full == prompt + out["text"]
    stream = ExLlamaV2StreamingGenerator(model, ExLlamaV2Cache(model, max_seq_len=512), tok)
    stream.set_stop_conditions([])
    stream.begin_stream_ex(ids, ExLlamaV2Sampler.Settings.greedy(), token_healing=True)
    got: list[int] = []
    while len(got) < len(out["ids"]):
        got += stream.stream_ex()["chunk_token_ids"][0].tolist()
    assert got[: len(out["ids"])] == out["ids"]


# 9. model_init flow of upstream's examples, batched base generator --------------------------------


def test_model_init_and_batched_generate_simple(tiny):
    parser = argparse.ArgumentParser()
    model_init.add_args(parser)
    args = parser.parse_args(["-m", str(tiny[0]), "-l", "256", "-rs", "1.0"])
    model_init.check_args(args)
    model, tok = model_init.init(args, quiet=True)
    cache = ExLlamaV2Cache(model, batch_size=2, max_seq_len=256)
    gen = ExLlamaV2BaseGenerator(model, cache, tok)
    gen.warmup()
    prompts = ["Return the value", PROMPT]
    settings = ExLlamaV2Sampler.Settings.greedy()
    batch = gen.generate_simple(prompts, settings, 8, seed=1, add_bos=True, completion_only=True, stop_token=None)
    for p, text in zip(prompts, batch):
        ids = tok.encode(p, add_bos=True)
        assert text == tok.decode(torch.tensor(hf_greedy(tiny[1], ids, 8)))
    # upstream test.py's test_multicache: one cache per batch row
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    caches = [ExLlamaV2Cache(model, max_seq_len=256) for _ in range(2)]
    model.forward(ids[:, :-1], caches, preprocess_only=True)
    logits = model.forward(ids[:, -1:], caches)
    with torch.no_grad():
        ref = tiny[1](ids).logits[:, -1:]
    assert (logits[..., :250] - ref).abs().max() < 1e-3 * ref.abs().max()
