"""Speculative decoding in the dynamic generator, on tiny random Llamas on the CPU.

The reference is the same generator without drafting (itself checked against transformers in
test_generators.py): every sampled position goes through the job's sampler, so drafting may only
change how many main-model passes the output takes, never the output. Drafts come from the model
itself (everything accepted), from a differently seeded model (most rejected), or from n-grams.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2MMEmbedding, ExLlamaV2Sampler
from exllamav2.generator.filters import ExLlamaV2SelectFilter
from tests.test_generators import GREEDY, PROMPT, PROMPTS, boundary_stop_string, load, run_dynamic
from tests.tiny_models import build_tiny_model, write_tokenizer

MODES = ["self_draft", "other_draft", "ngram"]
K = 4                                            # draft tokens per step


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """The main model's directory and a differently seeded model's with the same tokenizer."""
    dirs = []
    for seed in (0, 1):
        d = tmp_path_factory.mktemp(f"spec_llama_{seed}")
        build_tiny_model("llama", d, seed=seed)
        write_tokenizer(d)
        dirs.append(d)
    return dirs


@pytest.fixture(scope="module")
def loaded(model_dirs):
    model, tok = load(model_dirs[0])
    other, _ = load(model_dirs[1])
    return model, tok, other


def make_gen(model, tok, mode: str | None, other=None, paged: bool = True, max_seq_len: int = 2048):
    cache = ExLlamaV2Cache(model, max_seq_len=max_seq_len)
    if mode is None:
        return ExLlamaV2DynamicGenerator(model, cache, tok, paged=paged)
    if mode == "ngram":
        return ExLlamaV2DynamicGenerator(model, cache, tok, paged=paged, use_ngram_draft=True, num_draft_tokens=K)
    draft = model if mode == "self_draft" else other
    return ExLlamaV2DynamicGenerator(model, cache, tok, paged=paged, draft_model=draft, num_draft_tokens=K,
                                     draft_cache=ExLlamaV2Cache(draft, max_seq_len=max_seq_len))


def jobs_for(tok, prompts, n: int) -> list[ExLlamaV2DynamicJob]:
    return [ExLlamaV2DynamicJob(tok.encode(p, add_bos=True), n, gen_settings=GREEDY()) for p in prompts]


def outputs(out: dict) -> list[tuple[list[int], str]]:
    return [(out[s]["ids"], out[s]["text"]) for s in sorted(out)]


def assert_caches_agree(gen: ExLlamaV2DynamicGenerator) -> None:
    """With the model as its own draft, the draft cache must hold the main cache's keys/values at
    every position a page records (those are what a later job reusing the page gets)."""
    ps = gen.page_size
    slots = [p.index * ps + i for p in gen.table.pages for i in range(len(p.tokens))]
    assert slots
    for main, draft in zip(gen.cache.all_tensors(), gen.draft_cache.all_tensors()):
        torch.testing.assert_close(draft[0, slots], main[0, slots], rtol=1e-2, atol=1e-2)


def draft_counts(out: dict) -> tuple[int, int]:
    lasts = [o["last"] for o in out.values()]
    return sum(r["accepted_draft_tokens"] for r in lasts), sum(r["rejected_draft_tokens"] for r in lasts)


# greedy output is unchanged ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["matmul", "sdpa"])
def test_concurrent_greedy_jobs_equal_plain_decoding(model_dirs, backend, mode, monkeypatch):
    monkeypatch.setenv("EXLLAMA_ATTN_BACKEND", backend)
    model, tok = load(model_dirs[0])
    other = load(model_dirs[1])[0] if mode == "other_draft" else None
    assert model.attn_plan.device_plan("cpu").backend == backend
    prompts = [PROMPTS[i] for i in (0, 1, 3, 4, 7)]   # 2 to 300 tokens; the last spans two pages
    lengths = [tok.encode(p, add_bos=True).shape[-1] for p in prompts]
    assert len(set(lengths)) == len(prompts) and max(lengths) > 256

    plain = run_dynamic(make_gen(model, tok, None), jobs_for(tok, prompts, 20))
    gen = make_gen(model, tok, mode, other)
    spec = run_dynamic(gen, jobs_for(tok, prompts, 20))
    assert outputs(spec) == outputs(plain)
    assert all(len(ids) == 20 for ids, _ in outputs(spec))
    assert all(o["last"]["eos_reason"] == "max_new_tokens" and o["last"]["new_tokens"] == 20 for o in spec.values())
    accepted, rejected = draft_counts(spec)
    if mode == "self_draft":
        assert accepted > 0 and rejected == 0
        assert_caches_agree(gen)
    elif mode == "other_draft":
        assert rejected > 0                      # the other model's drafts are mostly wrong
    else:
        assert accepted + rejected > 0           # the repetitive prompts give n-gram drafts
    assert gen.table.free_count() == gen.table.num_pages


@pytest.mark.parametrize("mode", MODES)
def test_unpaged_generation_equals_plain_decoding(loaded, mode):
    model, tok, other = loaded
    ids = tok.encode(PROMPTS[4], add_bos=True)
    (plain,) = run_dynamic(make_gen(model, tok, None, paged=False, max_seq_len=256),
                           [ExLlamaV2DynamicJob(ids, 24, gen_settings=GREEDY())]).values()
    (spec,) = run_dynamic(make_gen(model, tok, mode, other, paged=False, max_seq_len=256),
                          [ExLlamaV2DynamicJob(ids, 24, gen_settings=GREEDY())]).values()
    assert spec["ids"] == plain["ids"] and spec["text"] == plain["text"]


def test_sampled_output_with_a_seed_is_unchanged(loaded):
    """Each position is sampled with the job's own random stream, drafted or not."""
    model, tok, other = loaded
    settings = ExLlamaV2Sampler.Settings(temperature=1.0, top_k=0, top_p=0.95)
    prompts = PROMPTS[:4]

    def jobs():
        return [ExLlamaV2DynamicJob(tok.encode(p, add_bos=True), 24, gen_settings=settings, seed=100 + i)
                for i, p in enumerate(prompts)]

    plain = run_dynamic(make_gen(model, tok, None), jobs())
    for mode in MODES:
        spec = run_dynamic(make_gen(model, tok, mode, other), jobs())
        assert outputs(spec) == outputs(plain), mode
    greedy = run_dynamic(make_gen(model, tok, None), jobs_for(tok, prompts, 24))
    assert outputs(plain) != outputs(greedy)     # the settings really sample


def test_ngram_drafts_never_propose_an_embeddings_ids(loaded):
    model, tok, _ = loaded
    emb = ExLlamaV2MMEmbedding(model, torch.randn(3, model.config.hidden_size) * 0.1)
    head = tok.encode("Open the file", add_bos=True)
    # the prompt ends as it did just before the embedding, so the n-gram continuation starts with its ids
    ids = torch.cat((head, emb.get_ids_tensor(), tok.encode(" and"), head[:, 1:]), dim=1)
    runs = [run_dynamic(make_gen(model, tok, m), [ExLlamaV2DynamicJob(ids, 12, gen_settings=GREEDY(),
                                                                       embeddings=[emb])])
            for m in (None, "ngram")]
    assert outputs(runs[1]) == outputs(runs[0])


# fewer main-model passes ---------------------------------------------------------------------------


def count_decode_passes(model, cache, monkeypatch) -> list[int]:
    """Count the model's forward passes that return logits from `cache` (decode steps, not prefill)."""
    calls = []
    forward = model.forward

    def counting(input_ids, cache_arg=None, *args, **kwargs):
        if cache_arg is cache and not kwargs.get("preprocess_only"):
            calls.append(input_ids.shape[-1])
        return forward(input_ids, cache_arg, *args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    return calls


def test_self_draft_accepts_every_token_and_needs_fewer_passes(loaded, monkeypatch):
    model, tok, _ = loaded
    n = 22
    prompts = PROMPTS[:4]

    plain_gen = make_gen(model, tok, None)
    plain_calls = count_decode_passes(model, plain_gen.cache, monkeypatch)
    plain = run_dynamic(plain_gen, jobs_for(tok, prompts, n))
    monkeypatch.undo()

    gen = make_gen(model, tok, "self_draft")
    calls = count_decode_passes(model, gen.cache, monkeypatch)
    spec = run_dynamic(gen, jobs_for(tok, prompts, n))
    monkeypatch.undo()

    assert outputs(spec) == outputs(plain)
    # all prompts are prefilled in the first iteration, then every job decodes in every pass
    assert len(plain_calls) == n and set(plain_calls) == {1}
    assert len(calls) == math.ceil(n / (K + 1)) and set(calls) == {K + 1}
    for o in spec.values():
        # every draft is accepted; the last pass ends the job before it reaches the unneeded ones
        assert o["last"]["rejected_draft_tokens"] == 0
        assert o["last"]["accepted_draft_tokens"] == n - len(calls)


def test_draft_cache_pages_are_reused_with_the_prefix(loaded):
    """A job reusing cached pages (whole, copied in part, or holding another job's completion)
    gets the draft model's keys/values with them: a self-draft still accepts every token."""
    model, tok, _ = loaded
    gen = make_gen(model, tok, "self_draft")
    shared = " ".join(["format the string with the given keyword arguments"] * 13)
    a = tok.encode(shared + " and return it", add_bos=True)
    b = tok.encode(shared + " then print", add_bos=True)
    (first,) = run_dynamic(gen, [ExLlamaV2DynamicJob(a, 30, gen_settings=GREEDY())]).values()
    assert_caches_agree(gen)
    c = torch.cat((a, torch.tensor([first["ids"]])), dim=1)          # a's prompt and its completion
    (second,) = run_dynamic(gen, [ExLlamaV2DynamicJob(c, 16, gen_settings=GREEDY())]).values()
    assert_caches_agree(gen)
    (third,) = run_dynamic(gen, [ExLlamaV2DynamicJob(b, 16, gen_settings=GREEDY())]).values()
    assert second["last"]["cached_tokens"] > a.shape[-1]            # part of a's completion was reused
    assert third["last"]["cached_pages"] == 1 and third["last"]["cached_tokens"] > 256

    # while `a` still runs, b shares its first page and copies the start of its second
    gen.reset_page_table()
    gen.enqueue(ExLlamaV2DynamicJob(a, 40, gen_settings=GREEDY()))
    while not any(r["stage"] == "streaming" for r in gen.iterate()):
        pass
    late = ExLlamaV2DynamicJob(b, 16, gen_settings=GREEDY())
    gen.enqueue(late)
    got, fourth = [], None
    while gen.num_remaining_jobs():
        for r in gen.iterate():
            if r["job"] is late and r["stage"] == "streaming":
                got += r["token_ids"][0].tolist()
                fourth = r if r["eos"] else fourth
    assert fourth["cached_pages"] == 1 and fourth["cached_tokens"] == third["last"]["cached_tokens"]
    for r in (second["last"], third["last"], fourth):
        assert r["rejected_draft_tokens"] == 0
    assert_caches_agree(gen)

    fresh = make_gen(model, tok, None)
    for ids, want_ids in ((c, second["ids"]), (b, third["ids"]), (b, got)):
        (want,) = run_dynamic(fresh, [ExLlamaV2DynamicJob(ids, 16, gen_settings=GREEDY())]).values()
        assert want_ids == want["ids"]
    assert gen.table.free_count() == gen.table.num_pages


# stop conditions and limits stay exact ----------------------------------------------------------------


def plain_and_spec(loaded, mode: str, n: int = 24, **job_kw) -> tuple[dict, dict]:
    """One job on PROMPT run without drafting and with `mode`. A `select` option becomes a fresh
    select filter for each run (filters hold state)."""
    model, tok, other = loaded
    ids = tok.encode(PROMPT, add_bos=True)
    options = job_kw.pop("select", None)
    results = []
    for m in (None, mode):
        filters = [ExLlamaV2SelectFilter(model, tok, options)] if options else None
        job = ExLlamaV2DynamicJob(ids, n, gen_settings=GREEDY(), filters=filters, **job_kw)
        (r,) = run_dynamic(make_gen(model, tok, m, other), [job]).values()
        results.append(r)
    return results[0], results[1]


@pytest.mark.parametrize("mode", MODES)
def test_max_new_tokens_is_exact(loaded, mode):
    for n in (1, 2, 7, 11):                      # below, at and past multiples of K + 1
        plain, spec = plain_and_spec(loaded, mode, n)
        assert spec["ids"] == plain["ids"] and len(spec["ids"]) == n
        assert spec["last"]["new_tokens"] == n and spec["last"]["eos_reason"] == "max_new_tokens"


@pytest.mark.parametrize("mode", MODES)
def test_stop_token_and_min_new_tokens_are_exact(loaded, mode):
    plain, _ = plain_and_spec(loaded, mode)
    ids = plain["ids"]
    stop_id = ids[6]
    at = ids.index(stop_id)
    _, spec = plain_and_spec(loaded, mode, stop_conditions=[stop_id])
    assert spec["ids"] == ids[:at]
    assert spec["last"]["eos_reason"] == "stop_token" and spec["last"]["eos_triggering_token_id"] == stop_id
    plain_min, spec_min = plain_and_spec(loaded, mode, min_new_tokens=at + 2, stop_conditions=[stop_id])
    assert spec_min["ids"] == plain_min["ids"] and stop_id not in spec_min["ids"][: at + 2]


@pytest.mark.parametrize("mode", MODES)
def test_stop_string_across_tokens_is_exact(loaded, mode):
    tok = loaded[1]
    plain, _ = plain_and_spec(loaded, mode)
    stop, at = boundary_stop_string(tok, plain["ids"], plain["text"])
    _, spec = plain_and_spec(loaded, mode, stop_conditions=[stop])
    assert spec["text"] == plain["text"][:at]
    assert spec["last"]["eos_reason"] == "stop_string" and spec["last"]["eos_triggering_string"] == stop


@pytest.mark.parametrize("mode", MODES)
def test_banned_string_filter_cfg_and_healing_match_plain_decoding(loaded, mode):
    model, tok, other = loaded
    plain, _ = plain_and_spec(loaded, mode)
    stop, _ = boundary_stop_string(tok, plain["ids"], plain["text"])
    pieces = tok.get_id_to_piece_list()
    options = [pieces[40] + pieces[41] + pieces[42], pieces[50] + pieces[51]]
    cases = [dict(banned_strings=[stop.upper()]), dict(select=options), dict(token_healing=True)]
    runs = [plain_and_spec(loaded, mode, **kw) for kw in cases]
    for want, got in runs:
        assert (got["ids"], got["text"]) == (want["ids"], want["text"])
        assert got["last"]["eos_reason"] == want["last"]["eos_reason"]
    (_, banned), (_, selected), _ = runs
    assert stop.lower() not in banned["text"].lower() and banned["text"] != plain["text"]
    assert selected["text"] in options and selected["last"]["eos_reason"] == "end_filter"

    pos, neg = tok.encode(PROMPT, add_bos=True), tok.encode("Split the string", add_bos=True)
    cfg = [run_dynamic(make_gen(model, tok, m, other),
                       [ExLlamaV2DynamicJob([pos, neg], 12, gen_settings=GREEDY(cfg_scale=2.0))]) for m in (None, mode)]
    assert outputs(cfg[1]) == outputs(cfg[0])


# configuration errors ------------------------------------------------------------------------------


def test_draft_model_with_a_smaller_vocabulary_is_refused(loaded, tmp_path):
    model, tok, _ = loaded
    config = transformers.LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    transformers.LlamaForCausalLM(config).half().save_pretrained(tmp_path)
    draft = ExLlamaV2(ExLlamaV2Config(str(tmp_path)))
    draft.load()
    with pytest.raises(ValueError, match="draft model's vocabulary has 200 tokens but the tokenizer's has 250"):
        ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=1024), tok, draft_model=draft,
                                  draft_cache=ExLlamaV2Cache(draft, max_seq_len=1024))


def test_bad_speculative_settings_name_the_problem(loaded):
    model, tok, other = loaded

    def gen(**kw):
        return ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=1024), tok, **kw)

    with pytest.raises(ValueError, match="needs both draft_model and draft_cache"):
        gen(draft_model=other)
    with pytest.raises(ValueError, match="not both"):
        gen(draft_model=other, draft_cache=ExLlamaV2Cache(other, max_seq_len=1024), use_ngram_draft=True)
    with pytest.raises(ValueError, match=r"between 1 and max_q_size \(8\), got 9"):
        gen(use_ngram_draft=True, num_draft_tokens=9)
    with pytest.raises(ValueError, match="max_seq_len=1024; got batch_size=1, max_seq_len=512"):
        gen(draft_model=other, draft_cache=ExLlamaV2Cache(other, max_seq_len=512))

    drafted = gen(draft_model=other, draft_cache=ExLlamaV2Cache(other, max_seq_len=1024))
    emb = ExLlamaV2MMEmbedding(model, torch.zeros(3, model.config.hidden_size))
    ids = torch.cat((tok.encode(PROMPT, add_bos=True), emb.get_ids_tensor(), tok.encode(" the")), dim=1)
    with pytest.raises(ValueError, match="embeddings cannot run with a draft model"):
        drafted.enqueue(ExLlamaV2DynamicJob(ids, 8, gen_settings=GREEDY(), embeddings=[emb]))
    # room for the draft tokens is reserved in the cache, and the error says so
    ids = tok.encode(PROMPT, add_bos=True)
    with pytest.raises(ValueError, match=r"needs 5 cache pages of 256 tokens \(with room for 4 draft tokens\)"):
        drafted.enqueue(ExLlamaV2DynamicJob(ids, 1024 - ids.shape[-1], gen_settings=GREEDY()))
    gen(draft_model=other, draft_cache=ExLlamaV2Cache(other, max_seq_len=1024)).enqueue(
        ExLlamaV2DynamicJob(ids, 1024 - ids.shape[-1] - 4, gen_settings=GREEDY()))


def test_streaming_generator_refuses_a_draft_with_a_smaller_vocabulary(tiny_model_factory):
    """The same check guards both generators: a draft that cannot produce the tokenizer's ids is refused."""
    from exllamav2.generator import ExLlamaV2StreamingGenerator
    from exllamav2.generator.drafting import check_draft_vocab

    class Vocab:
        def __init__(self, n):
            self.config = type("C", (), {"vocab_size": n})()

    tokenizer = type("T", (), {"get_vocab_size": lambda self: 250})()
    with pytest.raises(ValueError, match="same tokenizer"):
        check_draft_vocab(Vocab(200), Vocab(250), tokenizer)
    check_draft_vocab(Vocab(256), Vocab(250), tokenizer)        # padded vocab: a warning, not an error
    assert "check_draft_vocab" in ExLlamaV2StreamingGenerator.__init__.__code__.co_names
