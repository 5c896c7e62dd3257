"""Calls real clients make the way upstream exllamav2 0.3.2 accepts them (issue 19), on the tiny Llama.

- filters get the sampled token as a (1, 1) long tensor from all three generators, and a filter that only
  duck-types ExLlamaV2Filter works: lm-format-enforcer's own ExLlamaV2 integration from PyPI when installed,
  and a filter written the same way (begin/feed/next/clone only) always;
- RoPE knobs set to None (chat.py's draft path, TabbyAPI, text-generation-webui) mean "unset";
- `loras=` takes one ExLlamaV2Lora or a list, in generate_simple, begin_stream(_ex), set_loras and forward;
- the streaming generator's n-gram speculation settings and ngram_preload.

References are independent of the code under test: transformers' fp32 logits and greedy generate, a
regular expression, and plain (non-speculative) greedy decoding.
"""

from __future__ import annotations

import re

import pytest
import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Lora
from exllamav2.generator import (ExLlamaV2BaseGenerator, ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob,
                                 ExLlamaV2Sampler, ExLlamaV2StreamingGenerator)
from exllamav2.generator.filters import ExLlamaV2Filter
from exllamav2.tokenizer import ExLlamaV2Tokenizer
from tests.test_lora import make_adapter, merged_reference

GREEDY = ExLlamaV2Sampler.Settings.greedy
# With and without the test adapter, every greedy step on this prompt leads its runner-up by >= 0.07 in
# transformers' logits (measured), so an implementation difference of ~1e-5 cannot flip a token.
LORA_PROMPT = "format the string with the given keyword arguments"


@pytest.fixture(scope="module")
def loaded(tiny):
    config = ExLlamaV2Config(str(tiny[0]))
    model = ExLlamaV2(config)
    model.load()
    return model, ExLlamaV2Tokenizer(config), tiny[1]


def hf_greedy(hf, ids: torch.Tensor, n: int) -> list[int]:
    out = hf.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                      attention_mask=torch.ones_like(ids))
    return out[0, ids.shape[-1]:].tolist()


# filters ----------------------------------------------------------------------------------------

PATTERN = r"(the list|a file) of (items|lines)"


class RegexFilter:
    """A filter written the way lm-format-enforcer's ExLlamaV2TokenEnforcerFilter is: no base class,
    only begin/feed/next/clone, and feed reads the token as int(token[0][0])."""

    def __init__(self, tokenizer, pattern: str):
        self.pieces = tokenizer.get_id_to_piece_list()
        self.eos = tokenizer.eos_token_id
        self.pattern = pattern
        self.token_sequence: list[int] = []

    def begin(self, prefix_str: str) -> None:
        self.token_sequence = []

    def feed(self, token: torch.Tensor) -> None:
        self.token_sequence.append(int(token[0][0]))

    def clone(self):
        return self

    def next(self):
        text = "".join(self.pieces[t] for t in self.token_sequence)
        allowed = self._allowed(text)
        if re.fullmatch(self.pattern, text):
            allowed.add(self.eos)
        return allowed, set()

    def _allowed(self, text: str) -> set[int]:
        options = ["the list of items", "the list of lines", "a file of items", "a file of lines"]   # PATTERN's words
        return {t for t, p in enumerate(self.pieces) if p and any(o.startswith(text + p) for o in options)}


class BackgroundRegexFilter(ExLlamaV2Filter):
    """The shape of upstream's examples/inference_lmfe.py wrapper: an ExLlamaV2Filter subclass whose next()
    returns a sorted list, evaluated on the generator's background worker, fed int(token[0][0])."""

    def __init__(self, model, tokenizer, pattern: str):
        super().__init__(model, tokenizer)
        self.inner = RegexFilter(tokenizer, pattern)

    @property
    def token_sequence(self) -> list[int]:
        return self.inner.token_sequence

    def begin(self, prefix_str: str = "") -> None:
        self.inner.begin(prefix_str)

    def feed(self, token) -> None:
        self.inner.feed(token)

    def next(self):
        allowed, _ = self.inner.next()
        return sorted(allowed), []

    def use_background_worker(self) -> bool:
        return True


def lmfe_filter(tokenizer):
    lmfe = pytest.importorskip("lmformatenforcer", reason="lm-format-enforcer not installed (test extra)")
    from lmformatenforcer.integrations.exllamav2 import ExLlamaV2TokenEnforcerFilter

    return ExLlamaV2TokenEnforcerFilter(lmfe.RegexParser(PATTERN), tokenizer)


def run_three_generators(model, tok, make_filter) -> dict[str, tuple[str, list[int]]]:
    """(text, ids the filter was fed) from the dynamic, streaming and base generators, greedy."""
    out = {}
    prompt = "Return"
    f = make_filter(tok)
    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=256), tok)
    text = gen.generate(prompt, max_new_tokens=16, gen_settings=GREEDY(), filters=[f], completion_only=True,
                        stop_conditions=[tok.eos_token_id])
    out["dynamic"] = (text, list(f.token_sequence))

    f = make_filter(tok)
    sgen = ExLlamaV2StreamingGenerator(model, ExLlamaV2Cache(model, max_seq_len=256), tok)
    sgen.begin_stream_ex(tok.encode(prompt), GREEDY(), filters=[f])
    text = ""
    for _ in range(16):
        r = sgen.stream_ex()
        text += r["chunk"]
        if r["eos"]:
            break
    out["streaming"] = (text, list(f.token_sequence))

    f = make_filter(tok)
    bgen = ExLlamaV2BaseGenerator(model, ExLlamaV2Cache(model, max_seq_len=256), tok)
    text = bgen.generate_simple(prompt, GREEDY(), 16, filters=[f], completion_only=True)
    out["base"] = (text, list(f.token_sequence))
    return out


@pytest.mark.parametrize("kind", ["lm-format-enforcer", "written-like-it", "upstream-example-subclass"])
def test_duck_typed_filter_gets_a_tensor_token_from_every_generator(loaded, kind):
    model, tok, _ = loaded
    make = {"lm-format-enforcer": lmfe_filter,
            "written-like-it": lambda t: RegexFilter(t, PATTERN),
            "upstream-example-subclass": lambda t: BackgroundRegexFilter(model, t, PATTERN)}[kind]
    for name, (text, fed) in run_three_generators(model, tok, make).items():
        assert re.fullmatch(PATTERN, text), f"{name}: {text!r} breaks the filter's pattern"
        # every sampled token reached the filter, in order (EOS, which ends the text, may follow)
        fed_text = tok.decode(torch.tensor([t for t in fed if t != tok.eos_token_id]))
        assert fed_text == text, f"{name}: the filter was fed {fed_text!r}"


def test_filter_is_fed_a_1x1_long_tensor(loaded):
    model, tok, _ = loaded
    seen = []

    class Probe(RegexFilter):
        def feed(self, token):
            seen.append((type(token), tuple(token.shape), token.dtype))
            super().feed(token)

    run_three_generators(model, tok, lambda t: Probe(t, PATTERN))
    assert seen and set(seen) == {(torch.Tensor, (1, 1), torch.long)}


def test_object_that_is_not_a_filter_is_refused_by_name(loaded):
    model, tok, _ = loaded

    class NoNext:
        def begin(self, prefix_str):
            pass

        def feed(self, token):
            pass

    with pytest.raises(TypeError, match=r"NoNext is not a filter: it has no next\(\)"):
        ExLlamaV2DynamicJob(tok.encode("Return"), 4, filters=[NoNext()])


# RoPE knobs set to None -----------------------------------------------------------------------


def test_rope_knobs_set_to_none_mean_unset(tiny):
    _, hf = tiny
    config = ExLlamaV2Config(str(tiny[0]))
    config.scale_pos_emb = None             # chat.py's draft path: config.scale_pos_emb = args.rope_scale
    config.scale_alpha_value = None
    config.rope_scaling = None
    model = ExLlamaV2(config)
    model.load()
    ids = torch.randint(3, 250, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
    ours = model.forward(ids)[..., :250]
    assert (ours - ref).abs().max() < 1e-3 * ref.abs().max()


def test_rope_alpha_still_applies_and_bad_values_are_named(tiny):
    config = ExLlamaV2Config(str(tiny[0]))
    config.scale_alpha_value = 4.0
    model = ExLlamaV2(config)
    model.load()
    ids = torch.randint(3, 250, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = tiny[1](ids).logits
    assert (model.forward(ids)[..., :250] - plain).abs().max() > 1e-2     # NTK alpha changed the positions
    config = ExLlamaV2Config(str(tiny[0]))
    config.scale_pos_emb = "two"
    with pytest.raises(ValueError, match="config.scale_pos_emb must be a number"):
        m = ExLlamaV2(config)
        m.load()
        m.forward(ids)


# loras= one adapter or a list -----------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_setup(loaded, tmp_path_factory):
    model, tok, hf = loaded
    path = tmp_path_factory.mktemp("lora") / "adapter"
    tensors = make_adapter(path, hf)
    lora = ExLlamaV2Lora.from_directory(model, str(path))
    return lora, merged_reference(hf, tensors, 8.0 / 4)


def test_single_lora_object_is_accepted_everywhere(loaded, lora_setup):
    model, tok, _ = loaded
    lora, merged = lora_setup
    ids = tok.encode(LORA_PROMPT, add_bos=True)
    want = hf_greedy(merged, ids, 10)
    with torch.no_grad():
        ref = merged(ids).logits
    for loras in (lora, [lora], (lora,)):
        ours = model.forward(ids, loras=loras)[..., :250]
        assert (ours - ref).abs().max() < 1e-3 * ref.abs().max()

    base = ExLlamaV2BaseGenerator(model, ExLlamaV2Cache(model, max_seq_len=256), tok)
    base.generate_simple(LORA_PROMPT, GREEDY(), 10, add_bos=True, loras=lora,
                         stop_token=None)
    assert base.sequence_ids[0, ids.shape[-1]:].tolist() == want

    stream = ExLlamaV2StreamingGenerator(model, ExLlamaV2Cache(model, max_seq_len=256), tok)
    stream.set_stop_conditions([])
    for begin in (stream.begin_stream, stream.begin_stream_ex):
        begin(ids, GREEDY(), loras=lora)
        got = []
        while len(got) < 10:
            got += stream.stream_ex()["chunk_token_ids"][0].tolist()
        assert got[:10] == want

    dyn = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=256), tok)
    dyn.set_loras(lora)
    out = dyn.generate(LORA_PROMPT, max_new_tokens=10, gen_settings=GREEDY(),
                       add_bos=True, completion_only=True)
    dyn.set_loras(None)
    assert out == tok.decode(torch.tensor(want))


def test_streaming_reuses_cached_prefix_only_under_the_same_adapters(loaded, lora_setup):
    model, tok, hf = loaded
    lora, merged = lora_setup
    ids = tok.encode(LORA_PROMPT, add_bos=True)
    stream = ExLlamaV2StreamingGenerator(model, ExLlamaV2Cache(model, max_seq_len=256), tok)
    stream.set_stop_conditions([])
    for loras, reference in ((lora, merged), (None, hf), (lora, merged)):   # same prompt, adapters switched
        stream.begin_stream_ex(ids, GREEDY(), loras=loras)
        got = []
        while len(got) < 6:
            got += stream.stream_ex()["chunk_token_ids"][0].tolist()
        assert got[:6] == hf_greedy(reference, ids, 6)


def test_lora_arguments_that_cannot_work_are_refused(loaded, lora_setup, tiny_model_factory):
    model, tok, _ = loaded
    ids = tok.encode("Return")
    with pytest.raises(TypeError, match="loras must be an ExLlamaV2Lora"):
        model.forward(ids, loras="adapter")
    other = ExLlamaV2(ExLlamaV2Config(str(tiny_model_factory("llama")[0])))
    other.load()
    with pytest.raises(ValueError, match="loaded for another model"):
        other.forward(ids, loras=lora_setup[0])


# n-gram speculation in the streaming generator --------------------------------------------------


def stream_tokens(gen, ids, n):
    gen.set_stop_conditions([])
    gen.begin_stream_ex(ids, GREEDY())
    got = []
    while len(got) < n:
        got += gen.stream_ex()["chunk_token_ids"][0].tolist()
    return got[:n]


@pytest.mark.parametrize("settings", [
    {},
    {"speculative_ngram_min": 2, "speculative_ngram_max": 4, "speculative_ngram_max_inf": 4},
    {"speculative_ngram_threshold": 2},
])
def test_ngram_speculation_with_preload_keeps_greedy_output(loaded, settings):
    model, tok, _ = loaded
    ids = tok.encode("Open the file and read it line by line until the end", add_bos=True)
    plain = ExLlamaV2StreamingGenerator(model, ExLlamaV2Cache(model, max_seq_len=256), tok)
    want = stream_tokens(plain, ids, 30)

    gen = ExLlamaV2StreamingGenerator(model, ExLlamaV2Cache(model, max_seq_len=256), tok, num_speculative_tokens=4)
    gen.speculative_ngram = True
    for k, v in settings.items():
        setattr(gen, k, v)
    assert gen.ngram_preloaded is None
    gen.ngram_preload(torch.tensor([want]))          # the exact continuation: drafts should be accepted
    gen.ngram_preload(want[:10])                     # lists are taken too, and add to the counts
    assert gen.ngram_preloaded is not None
    assert stream_tokens(gen, ids, 30) == want
    efficiency, accuracy, total, drafted, accepted = gen.get_sd_stats()
    assert drafted > 0 and accepted > 0


def test_ngram_settings_that_cannot_draft_are_refused(loaded):
    model, tok, _ = loaded
    gen = ExLlamaV2StreamingGenerator(model, ExLlamaV2Cache(model, max_seq_len=256), tok)
    gen.speculative_ngram = True
    gen.speculative_ngram_min, gen.speculative_ngram_max = 3, 2
    with pytest.raises(ValueError, match="speculative_ngram_min"):
        gen.begin_stream_ex(tok.encode("Return"), GREEDY())
