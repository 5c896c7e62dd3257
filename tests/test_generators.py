"""Generators on a tiny random Llama with a small BPE tokenizer, on the CPU.

Greedy output of every generator is checked against transformers' greedy `generate` on the same
weights; batched (paged) dynamic generation against each job run alone, on the matmul and SDPA
attention backends and through the extension's paged kernel (on the CUDA emulator); and stop strings, banned strings, filters, cancel and length errors against
what a plain greedy run produced.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import torch

import exllamav2.ext as ext
from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from exllamav2.generator import (ExLlamaV2BaseGenerator, ExLlamaV2DynamicGenerator, ExLlamaV2DynamicGeneratorAsync,
                                 ExLlamaV2DynamicJob, ExLlamaV2DynamicJobAsync, ExLlamaV2Sampler,
                                 ExLlamaV2StreamingGenerator)
from exllamav2.generator.filters import ExLlamaV2SelectFilter
from exllamav2.tokenizer import ExLlamaV2Tokenizer
from tests.test_kernel_dispatch import CountingKernels

GREEDY = ExLlamaV2Sampler.Settings.greedy
PROMPT = "The function returns the value of the"
# Prompts of different lengths, two of them longer than a cache page (256 tokens).
PROMPTS = [
    "Return",
    "The function returns the value of the",
    "Split the string at each separator and",
    "a b c d e f g",
    " ".join(["the list of items"] * 18),
    "Open the file and read it line by line until the end",
    " ".join(["format the string with the given keyword arguments"] * 25),
    " ".join(["if the path is absolute"] * 60),
]


def load(model_dir: Path, max_seq_len: int = 1024):
    config = ExLlamaV2Config(str(model_dir))
    config.max_seq_len = max_seq_len            # room for prompts longer than a page
    model = ExLlamaV2(config)
    model.load()
    return model, ExLlamaV2Tokenizer(config)


@pytest.fixture(scope="module")
def loaded(tiny):
    model, tokenizer = load(tiny[0])
    return model, tokenizer, tiny[1]


def hf_greedy(hf, ids: torch.Tensor, n: int) -> list[int]:
    out = hf.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                      attention_mask=torch.ones_like(ids))
    return out[0, ids.shape[-1]:].tolist()


def until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def run_dynamic(gen: ExLlamaV2DynamicGenerator, jobs: list[ExLlamaV2DynamicJob]) -> dict[int, dict]:
    """Run jobs to the end; per serial: the concatenated text and token ids, and the last result."""
    out = {gen.enqueue(j): {"text": "", "ids": [], "last": None, "stages": set()} for j in jobs}
    while gen.num_remaining_jobs():
        for r in gen.iterate():
            out[r["serial"]]["stages"].add(r["stage"])
            if r["stage"] == "streaming":
                o = out[r["serial"]]
                o["text"] += r["text"]
                o["ids"] += r["token_ids"][0].tolist()
                if r["eos"]:
                    o["last"] = r
    return out


# greedy equals transformers --------------------------------------------------------------------


def test_base_generator_matches_transformers(loaded):
    model, tok, hf = loaded
    ids = tok.encode(PROMPT, add_bos=True)
    want = until_eos(hf_greedy(hf, ids, 20), tok.eos_token_id)
    gen = ExLlamaV2BaseGenerator(model, ExLlamaV2Cache(model, max_seq_len=256), tok)
    text = gen.generate_simple(PROMPT, GREEDY(), 20, add_bos=True, completion_only=True)
    assert gen.sequence_ids[0, ids.shape[-1]:].tolist()[: len(want)] == want
    assert text == tok.decode(torch.tensor(want))


def test_base_generator_left_padded_batch_matches_single(loaded):
    model, tok, _ = loaded
    prompts = ["Return the value", "Split the string at each separator and"]
    gen = ExLlamaV2BaseGenerator(model, ExLlamaV2Cache(model, batch_size=2, max_seq_len=256), tok)
    batch = gen.generate_simple(prompts, GREEDY(), 12, add_bos=True, completion_only=True, stop_token=None)
    single = [gen.generate_simple(p, GREEDY(), 12, add_bos=True, completion_only=True, stop_token=None) for p in prompts]
    assert batch == single


def test_streaming_generator_matches_transformers(loaded):
    model, tok, hf = loaded
    ids = tok.encode(PROMPT, add_bos=True)
    want = hf_greedy(hf, ids, 20)
    gen = ExLlamaV2StreamingGenerator(model, ExLlamaV2Cache(model, max_seq_len=256), tok)
    gen.set_stop_conditions([])
    gen.begin_stream_ex(ids, GREEDY())
    got, text = [], ""
    while len(got) < 20:
        r = gen.stream_ex()
        got += r["chunk_token_ids"][0].tolist()
        text += r["chunk"]
    assert got[:20] == want
    assert text.startswith(tok.decode(torch.tensor(want[:-1])))
    # a second stream sharing the prompt reuses its cached keys/values and gives the same tokens
    gen.begin_stream_ex(ids, GREEDY())
    chunk, eos, token_ids = gen.stream()
    assert token_ids[0, 0].item() == want[0] and not eos


@pytest.mark.parametrize("paged", [True, False])
def test_dynamic_generator_matches_transformers(loaded, paged):
    model, tok, hf = loaded
    ids = tok.encode(PROMPT, add_bos=True)
    want = hf_greedy(hf, ids, 20)
    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=1024), tok, paged=paged)
    out = run_dynamic(gen, [ExLlamaV2DynamicJob(ids, 20, gen_settings=GREEDY())])
    (result,) = out.values()
    assert result["ids"] == want
    assert result["text"] == tok.decode(torch.tensor(want))
    assert result["stages"] == {"started", "prefill", "streaming"}
    last = result["last"]
    assert last["eos_reason"] == "max_new_tokens" and last["new_tokens"] == 20
    assert last["prompt_tokens"] == ids.shape[-1] and last["full_completion"] == result["text"]
    for key in ("time_enqueued", "time_prefill", "time_generate", "cached_tokens", "cached_pages"):
        assert key in last
    # the same prompt again reuses every cached prompt token but the last, and gives the same tokens
    (again,) = run_dynamic(gen, [ExLlamaV2DynamicJob(ids, 20, gen_settings=GREEDY())]).values()
    assert again["ids"] == want and again["last"]["cached_tokens"] == ids.shape[-1] - 1


def check_extras_against_transformers(hf, prompt: torch.Tensor, tokens: list[int], probs, top_tokens, top_probs,
                                      logits) -> None:
    """Per-token extras of n sampled tokens (unfiltered sampling at temperature 1) against transformers' logits
    for the same sequence: the logits themselves, softmax probabilities and the top-3 tokens."""
    n = len(tokens)
    with torch.no_grad():
        ref = hf(torch.cat((prompt, torch.tensor([tokens])), 1)).logits[0, prompt.shape[-1] - 1 : -1]
    vocab = ref.shape[-1]
    assert probs.shape == (1, n) and top_tokens.shape == top_probs.shape == (1, n, 3) and logits.shape[:2] == (1, n)
    assert torch.allclose(logits[0, :, :vocab].float(), ref, atol=1e-3)
    soft = ref.softmax(-1)
    assert torch.allclose(probs[0], soft[torch.arange(n), tokens], atol=1e-4)
    assert torch.equal(top_tokens[0], soft.topk(3).indices)
    assert torch.allclose(top_probs[0], soft.topk(3).values, atol=1e-4)


def unfiltered() -> ExLlamaV2Sampler.Settings:
    return ExLlamaV2Sampler.Settings(temperature=1.0, top_k=0, top_p=1.0, token_repetition_penalty=1.0)


def test_dynamic_job_token_extras_match_transformers(loaded):
    model, tok, hf = loaded
    ids = tok.encode(PROMPT, add_bos=True)
    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=1024), tok)
    gen.enqueue(ExLlamaV2DynamicJob(ids, 12, gen_settings=unfiltered(), seed=3, return_probs=True,
                                    return_top_tokens=3, return_logits=True))
    chunks = []
    while gen.num_remaining_jobs():
        chunks += [r for r in gen.iterate() if r["stage"] == "streaming"]
    tokens = torch.cat([r["token_ids"] for r in chunks], 1)[0].tolist()
    assert len(tokens) == 12
    joined = [torch.cat([r[key] for r in chunks], dim) for key, dim in
              (("token_probs", -1), ("top_k_tokens", 1), ("top_k_probs", 1), ("logits", 1))]
    check_extras_against_transformers(hf, ids, tokens, *joined)


def test_streaming_token_extras_match_transformers(loaded):
    model, tok, hf = loaded
    ids = tok.encode(PROMPT, add_bos=True)
    gen = ExLlamaV2StreamingGenerator(model, ExLlamaV2Cache(model, max_seq_len=256), tok)
    gen.set_stop_conditions([])
    gen.begin_stream_ex(ids, unfiltered(), return_probabilities=True, return_top_tokens=3, return_logits=True)
    chunks = []
    while sum(r["chunk_token_ids"].shape[-1] for r in chunks) < 12:
        chunks.append(gen.stream_ex())
    tokens = torch.cat([r["chunk_token_ids"] for r in chunks], 1)[0].tolist()
    joined = [torch.cat([r[key] for r in chunks], dim) for key, dim in
              (("probs", -1), ("top_tokens", 1), ("top_probs", 1), ("logits", 1))]
    check_extras_against_transformers(hf, ids, tokens, *joined)


# batching --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["matmul", "sdpa"])
def test_eight_concurrent_jobs_equal_each_alone(tiny, backend, monkeypatch, caplog):
    monkeypatch.setenv("EXLLAMA_ATTN_BACKEND", backend)
    model, tok = load(tiny[0])
    assert model.attn_plan.device_plan("cpu").backend == backend
    with caplog.at_level(logging.INFO, logger="exllamav2.generator.dynamic"):
        gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=4096), tok, paged=True)
    assert f"paged batching via cpu {backend}" in caplog.text
    check_jobs_together_equal_each_alone(gen, tok, PROMPTS, 12)


def test_concurrent_jobs_through_the_paged_kernel(tiny, monkeypatch, emulated_extension):
    """The same through exllamav2_ext's paged decode-attention kernel, the path the dynamic generator batches
    through on a Turing GPU: here the kernel runs on the CUDA emulator (tests/cuda_emu), the model in float16 on
    the CPU. Four of the prompts (two longer than a page) and fewer tokens keep the emulator's time down."""
    kernels = CountingKernels(emulated_extension)
    monkeypatch.setattr(ext, "kernels_for", lambda device: kernels)
    config = ExLlamaV2Config(str(tiny[0]))
    config.max_seq_len = 1024
    model = ExLlamaV2(config)
    model.dtype = torch.float16
    model.load()
    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=4096), ExLlamaV2Tokenizer(config),
                                    paged=True)
    check_jobs_together_equal_each_alone(gen, gen.tokenizer, PROMPTS[4:], 6)
    assert kernels.calls["paged_attention"] > 0


def check_jobs_together_equal_each_alone(gen, tok, prompts: list[str], new_tokens: int) -> None:
    """Greedy jobs of different prompt lengths run together give, token for token, what each gives alone."""

    def jobs():
        return [ExLlamaV2DynamicJob(tok.encode(p, add_bos=True), new_tokens, gen_settings=GREEDY(), identifier=i)
                for i, p in enumerate(prompts)]

    lengths = [j.input_ids[0].shape[-1] for j in jobs()]
    assert len(set(lengths)) == len(prompts) and max(lengths) > 256

    alone = []
    for job in jobs():
        gen.reset_page_table()              # nothing cached from an earlier job
        (r,) = run_dynamic(gen, [job]).values()
        alone.append(r["ids"])
    gen.reset_page_table()
    together = run_dynamic(gen, jobs())
    assert [together[s]["ids"] for s in sorted(together)] == alone
    assert all(len(ids) == new_tokens for ids in alone)
    assert gen.table.free_count() == gen.table.num_pages


def test_prefix_pages_are_reused_across_jobs(loaded):
    model, tok, _ = loaded
    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=2048), tok)
    shared = " ".join(["format the string with the given keyword arguments"] * 13)
    a = tok.encode(shared + " and return it", add_bos=True)
    b = tok.encode(shared + " then print", add_bos=True)
    (first,) = run_dynamic(gen, [ExLlamaV2DynamicJob(a, 8, gen_settings=GREEDY())]).values()
    (second,) = run_dynamic(gen, [ExLlamaV2DynamicJob(b, 8, gen_settings=GREEDY())]).values()
    common = next(i for i in range(min(a.shape[-1], b.shape[-1])) if a[0, i] != b[0, i])
    assert 256 < common < b.shape[-1] - 1
    assert first["last"]["cached_tokens"] == 0
    # one whole shared page, then the rest of the common prefix copied from a's second page
    assert second["last"]["cached_pages"] == 1 and second["last"]["cached_tokens"] == common
    gen.reset_page_table()
    (fresh,) = run_dynamic(gen, [ExLlamaV2DynamicJob(b, 8, gen_settings=GREEDY())]).values()
    assert fresh["ids"] == second["ids"] and fresh["last"]["cached_tokens"] == 0

    # while `a` is still running its pages are shared (page 0) and copied from (page 1)
    gen.reset_page_table()
    gen.enqueue(ExLlamaV2DynamicJob(a, 40, gen_settings=GREEDY()))
    while not any(r["stage"] == "streaming" for r in gen.iterate()):
        pass
    late = ExLlamaV2DynamicJob(b, 8, gen_settings=GREEDY())
    gen.enqueue(late)
    got, last = [], None
    while gen.num_remaining_jobs():
        for r in gen.iterate():
            if r["job"] is late and r["stage"] == "streaming":
                got += r["token_ids"][0].tolist()
                last = r if r["eos"] else last
    assert got == fresh["ids"] and last["cached_pages"] == 1 and last["cached_tokens"] == common
    assert gen.table.free_count() == gen.table.num_pages


def test_cfg_job_with_scale_one_is_the_positive_prompt(loaded):
    model, tok, _ = loaded
    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=1024), tok)
    pos, neg = tok.encode(PROMPT, add_bos=True), tok.encode("Split the string", add_bos=True)
    (plain,) = run_dynamic(gen, [ExLlamaV2DynamicJob(pos, 10, gen_settings=GREEDY())]).values()
    (cfg,) = run_dynamic(gen, [ExLlamaV2DynamicJob([pos, neg], 10, gen_settings=GREEDY(cfg_scale=1.0))]).values()
    assert cfg["ids"] == plain["ids"]
    (mixed,) = run_dynamic(gen, [ExLlamaV2DynamicJob([pos, neg], 10, gen_settings=GREEDY(cfg_scale=3.0))]).values()
    assert len(mixed["ids"]) == 10


# stop conditions, banned strings, filters ------------------------------------------------------


def greedy_text(loaded, n: int = 24) -> tuple[list[int], str]:
    model, tok, _ = loaded
    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=1024), tok)
    (r,) = run_dynamic(gen, [ExLlamaV2DynamicJob(tok.encode(PROMPT, add_bos=True), n, gen_settings=GREEDY())]).values()
    return r["ids"], r["text"]


def token_ends(tok, ids: list[int], text: str) -> list[int]:
    """End offset in `text` of each token's text (a decode on its own may drop a leading space)."""
    shift = len(text) - len(tok.decode(torch.tensor(ids)))
    return [shift + len(tok.decode(torch.tensor(ids[: i + 1]))) for i in range(len(ids))]


def boundary_stop_string(tok, ids: list[int], text: str) -> tuple[str, int]:
    """A string that starts inside one token's text and ends inside the next one, and where it
    first occurs in `text`."""
    ends = [0] + token_ends(tok, ids, text)
    for i in range(1, len(ids) - 1):
        a, b, c = ends[i - 1], ends[i], ends[i + 1]
        if b - a >= 2 and c - b >= 2:
            s = text[b - 1 : b + 1]
            return s, text.find(s)
    pytest.skip("greedy text has no two adjacent multi-character tokens")


def test_stop_string_across_tokens_dynamic_and_streaming(loaded):
    model, tok, _ = loaded
    ids, text = greedy_text(loaded)
    stop, at = boundary_stop_string(tok, ids, text)
    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=1024), tok)
    job = ExLlamaV2DynamicJob(tok.encode(PROMPT, add_bos=True), 24, gen_settings=GREEDY(), stop_conditions=[stop])
    (r,) = run_dynamic(gen, [job]).values()
    assert r["text"] == text[:at]
    assert r["last"]["eos_reason"] == "stop_string" and r["last"]["eos_triggering_string"] == stop

    sgen = ExLlamaV2StreamingGenerator(model, ExLlamaV2Cache(model, max_seq_len=256), tok)
    sgen.set_stop_conditions([stop])
    sgen.begin_stream_ex(tok.encode(PROMPT, add_bos=True), GREEDY())
    streamed, steps = "", 0
    while True:
        res = sgen.stream_ex()
        streamed += res["chunk"]
        steps += 1
        assert stop not in streamed
        if res["eos"] or steps > 30:
            break
    assert res["eos"] and res["eos_reason"] == "stop_string" and streamed == text[:at]


def test_stop_token_and_min_new_tokens(loaded):
    model, tok, _ = loaded
    ids, _ = greedy_text(loaded)
    stop_id = ids[3]
    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=1024), tok)
    prompt = tok.encode(PROMPT, add_bos=True)
    (r,) = run_dynamic(gen, [ExLlamaV2DynamicJob(prompt, 24, gen_settings=GREEDY(), stop_conditions=[stop_id])]).values()
    assert r["ids"] == ids[: ids.index(stop_id)]
    assert r["last"]["eos_reason"] == "stop_token" and r["last"]["eos_triggering_token_id"] == stop_id
    job = ExLlamaV2DynamicJob(prompt, 24, min_new_tokens=ids.index(stop_id) + 2, gen_settings=GREEDY(),
                              stop_conditions=[stop_id])
    (r,) = run_dynamic(gen, [job]).values()
    assert stop_id not in r["ids"][: ids.index(stop_id) + 2]


def test_banned_string_is_never_emitted_and_text_before_it_is_kept(loaded):
    model, tok, _ = loaded
    ids, text = greedy_text(loaded)
    stop, at = boundary_stop_string(tok, ids, text)
    banned = stop.upper()                       # banned strings match in any case
    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=1024), tok)
    job = ExLlamaV2DynamicJob(tok.encode(PROMPT, add_bos=True), 24, gen_settings=GREEDY(), banned_strings=[banned])
    (r,) = run_dynamic(gen, [job]).values()
    assert stop.lower() not in r["text"].lower()
    # everything before the token in which the banned string began is kept
    kept = max([e for e in token_ends(tok, ids, text) if e <= at], default=0)
    assert r["text"].startswith(text[:kept]) and r["ids"][:1] == ids[:1]
    assert r["text"] != text and len(r["ids"]) == 24


def test_select_filter_constrains_dynamic_output(loaded):
    model, tok, _ = loaded
    pieces = tok.get_id_to_piece_list()
    options = [pieces[40] + pieces[41] + pieces[42], pieces[50] + pieces[51]]
    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=1024), tok)
    f = ExLlamaV2SelectFilter(model, tok, options)
    job = ExLlamaV2DynamicJob(tok.encode(PROMPT, add_bos=True), 20, gen_settings=GREEDY(), filters=[f])
    (r,) = run_dynamic(gen, [job]).values()
    assert r["text"] in options and r["last"]["eos_reason"] == "end_filter"


def test_token_healing_regenerates_the_last_prompt_token(loaded):
    model, tok, _ = loaded
    prompt = "The function returns the val"
    ids = tok.encode(prompt, add_bos=True)
    removed = tok.get_id_to_piece_list()[ids[0, -1].item()]
    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=1024), tok)
    job = ExLlamaV2DynamicJob(ids, 6, gen_settings=GREEDY(), token_healing=True)
    (r,) = run_dynamic(gen, [job]).values()
    first = tok.get_id_to_piece_list()[r["ids"][0]]
    assert first.startswith(removed)
    assert r["text"].startswith(first[len(removed):])
    assert len(r["ids"]) == 7                   # the healed token plus max_new_tokens


# cancel, async, errors -------------------------------------------------------------------------


def test_cancel_mid_stream_leaves_other_jobs_untouched(loaded):
    model, tok, _ = loaded
    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=1024), tok)
    a = ExLlamaV2DynamicJob(tok.encode(PROMPTS[1], add_bos=True), 30, gen_settings=GREEDY())
    b_ids = tok.encode(PROMPTS[2], add_bos=True)
    (alone,) = run_dynamic(gen, [ExLlamaV2DynamicJob(b_ids, 12, gen_settings=GREEDY())]).values()

    b = ExLlamaV2DynamicJob(b_ids, 12, gen_settings=GREEDY())
    serial_a, serial_b = gen.enqueue([a, b])
    seen_a, b_ids_out, cancelled = 0, [], False
    while gen.num_remaining_jobs():
        for r in gen.iterate():
            if r["serial"] == serial_a:
                assert not cancelled, "a cancelled job produced output"
                seen_a += r["stage"] == "streaming"
            elif r["stage"] == "streaming":
                b_ids_out += r["token_ids"][0].tolist()
        if seen_a == 3 and not cancelled:
            a.cancel()
            cancelled = True
    assert cancelled and b_ids_out == alone["ids"]
    assert gen.table.free_count() == gen.table.num_pages


def test_async_generator_runs_and_cancels_jobs(loaded):
    model, tok, _ = loaded
    ids = tok.encode(PROMPT, add_bos=True)
    sync = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=1024), tok)
    (want,) = run_dynamic(sync, [ExLlamaV2DynamicJob(ids, 10, gen_settings=GREEDY())]).values()

    async def main():
        gen = ExLlamaV2DynamicGeneratorAsync(model=model, cache=ExLlamaV2Cache(model, max_seq_len=1024), tokenizer=tok)
        keep = ExLlamaV2DynamicJobAsync(gen, input_ids=ids, max_new_tokens=10, gen_settings=GREEDY(), identifier="keep")
        drop = ExLlamaV2DynamicJobAsync(gen, input_ids=ids, max_new_tokens=50, gen_settings=GREEDY())
        got, dropped_results = [], 0
        async for r in drop:
            dropped_results += 1
            if r["stage"] == "streaming":
                await drop.cancel()
                break
        async for r in keep:
            assert r["identifier"] == "keep"
            if r["stage"] == "streaming":
                got += r["token_ids"][0].tolist()
        await gen.close()
        return got, drop.cancelled

    got, cancelled = asyncio.run(main())
    assert got == want["ids"] and cancelled


def test_length_overflow_errors_name_the_limit(loaded):
    model, tok, _ = loaded
    ids = tok.encode(PROMPT, add_bos=True)
    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=1024), tok)
    with pytest.raises(ValueError, match="max_seq_len is 1024"):
        gen.enqueue(ExLlamaV2DynamicJob(ids, 1024, gen_settings=GREEDY()))
    small = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=256), tok)
    with pytest.raises(ValueError, match="cache has 1"):
        small.enqueue(ExLlamaV2DynamicJob(ids, 400, gen_settings=GREEDY()))
    base = ExLlamaV2BaseGenerator(model, ExLlamaV2Cache(model, max_seq_len=64), tok)
    with pytest.raises(ValueError, match="exceeds the cache's max_seq_len of 64"):
        base.generate_simple(PROMPT, GREEDY(), 60)
    stream = ExLlamaV2StreamingGenerator(model, ExLlamaV2Cache(model, max_seq_len=16), tok)
    with pytest.raises(ValueError, match="max_seq_len of 16"):
        stream.begin_stream_ex(tok.encode(PROMPT * 2, add_bos=True), GREEDY())
    with pytest.raises(ValueError, match="multiple of 256"):
        ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=300), tok)


# speculative decoding --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["draft", "ngram"])
def test_speculative_streaming_keeps_greedy_output(loaded, mode):
    model, tok, hf = loaded
    ids = tok.encode(" ".join(["the list of items"] * 4), add_bos=True)
    want = hf_greedy(hf, ids, 24)
    if mode == "draft":
        gen = ExLlamaV2StreamingGenerator(model, ExLlamaV2Cache(model, max_seq_len=256), tok,
                                          draft_model=model, draft_cache=ExLlamaV2Cache(model, max_seq_len=256),
                                          num_speculative_tokens=3)
    else:
        gen = ExLlamaV2StreamingGenerator(model, ExLlamaV2Cache(model, max_seq_len=256), tok)
        gen.speculative_ngram = True
    gen.set_stop_conditions([])
    gen.begin_stream_ex(ids, GREEDY())
    got = []
    while len(got) < 24:
        got += gen.stream_ex()["chunk_token_ids"][0].tolist()
    assert got[:24] == want
    efficiency, accuracy, total, drafted, accepted = gen.get_sd_stats()
    assert drafted > 0 and total >= 24 and 0 <= accepted <= drafted
    if mode == "draft":
        assert accuracy > 0.9                   # the draft is the model itself


# text streaming, with a byte-level tokenizer stand-in ---------------------------------------------


class ByteTokenizer:
    """decode() joins the tokens' bytes and decodes UTF-8 (cutting at EOS unless decoding specials),
    as byte-level BPE tokenizers do."""

    eos_token_id = 0

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def decode(self, ids: torch.Tensor, decode_special_tokens: bool = False) -> str:
        ids = ids.tolist()
        if not decode_special_tokens and self.eos_token_id in ids:
            ids = ids[: ids.index(self.eos_token_id)]
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def stream_all(ts, tokens):
    return [ts.push(t) for t in tokens]


def test_text_stream_stop_string_over_three_tokens():
    from exllamav2.generator.stop import TextStream

    tok = ByteTokenizer([b"<eos>", b"ab", b"c", b"de", b"f"])
    steps = stream_all(TextStream(tok, stop_strings=["bcd"]), [1, 2, 3])
    # "ab" is held whole ("b" may start the stop string; tokens are released whole), then "c"
    assert [s.released for s in steps] == [[], [], [1, 2, 3]]
    assert steps[-1].text == "a" and steps[-1].stop_string == "bcd"


def test_text_stream_releases_a_false_start_and_survives_eos_in_context():
    from exllamav2.generator.stop import TextStream

    tok = ByteTokenizer([b"<eos>", b"ax", b"y", b"q", b"z"])
    ts = TextStream(tok, stop_strings=["xyz"], context=[0, 1])
    steps = stream_all(ts, [1, 2, 3, 0, 4])
    assert "".join(s.text for s in steps) == "axyqz"
    assert all(s.stop_string is None for s in steps)


def test_text_stream_waits_for_split_utf8_and_strips_healed_text():
    from exllamav2.generator.stop import TextStream

    tok = ByteTokenizer([b"<eos>", b"caf", b"\xc3", b"\xa9!", b"ca"])
    ts = TextStream(tok, context=[4], healed_token=4)    # "ca" was removed from the prompt
    steps = stream_all(ts, [1, 2, 3])
    assert [s.text for s in steps] == ["f", "", "é!"]


def test_text_stream_banned_string_rewinds_to_its_first_token():
    from exllamav2.generator.stop import TextStream

    tok = ByteTokenizer([b"<eos>", b"go ", b"Ba", b"d", b"!"])
    ts = TextStream(tok, banned_strings=["bad"])
    steps = stream_all(ts, [1, 2, 3])
    assert steps[0].text == "go " and steps[1].text == ""
    assert (steps[2].rewind, steps[2].ban_token, steps[2].suppressed_text) == (2, 2, "Bad")
    assert ts.push(4).text == "!"
