"""Gemma 3 images through upstream's vision API, against transformers (float32, eager) on a tiny random model:
the config reader, preprocessing, the image block's ids, image embeddings (SigLIP + projector), logits with one and
two images (bidirectional attention within each image, which a causal-only model fails), the cache, the
generators on each CPU attention backend, EXL2, and bad input."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import shutil

import pytest
import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer, ExLlamaV2VisionTower
from exllamav2.errors import CheckpointError, ConfigError, GenerationArgumentError, InputError
from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler
from exllamav2.model.embedding import EMBEDDING_INDEX
from exllamav2.model.mm_embedding import remap_embeddings
from exllamav2.vlm.gemma3_preprocess import Gemma3ImageSettings, pixel_values_gemma3
from tests.tiny_models import _GEMMA3, build_tiny_model, native_multimodal_key, write_tokenizer
from tests.vision_helpers import assert_logits_match, image, prompt_ids, run_jobs

PIL = pytest.importorskip("PIL.Image")

VOCAB = 256                 # the image markers sit above the tokenizer's 250 pieces
TOKENIZER_VOCAB = 250
BOI, EOI, IMAGE = 253, 254, 255
TOKENS = 9                  # mm_tokens_per_image: a 6 x 6 patch grid pooled 2 x 2, more tokens than the window (8)
SIZE = 42
SPEC = ("Gemma3Config", {**_GEMMA3, "vocab_size": VOCAB, "model_type": "gemma3_text"}, {
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "image_size": SIZE, "patch_size": 7, "vision_use_head": False},
    "mm_tokens_per_image": TOKENS, "image_token_index": IMAGE, "boi_token_index": BOI, "eoi_token_index": EOI,
    "tie_word_embeddings": False})


def _gemma_tokenizer(model_dir) -> None:
    """The tiny BPE without a space prepended to each text: like Gemma's, "\\n\\n" encodes the same anywhere."""
    write_tokenizer(model_dir)
    path = model_dir / "tokenizer.json"
    tok = json.loads(path.read_text())
    tok["pre_tokenizer"]["prepend_scheme"] = "never"
    path.write_text(json.dumps(tok))


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """(model dir, transformers model, HF image processor, our model, our tower, our tokenizer)."""
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    model_dir = tmp_path_factory.mktemp("gemma3_vision")
    _, hf = build_tiny_model("gemma3_vision", model_dir, spec=SPEC)
    with torch.no_grad():           # transformers starts the projection at zero: make it matter
        w = hf.model.multi_modal_projector.mm_input_projection_weight
        w.copy_((torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) * 0.3).half().float())
    copy.deepcopy(hf).half().save_pretrained(model_dir, safe_serialization=True)
    processor = Gemma3ImageProcessorPil(size={"height": SIZE, "width": SIZE})
    processor.save_pretrained(model_dir)
    _gemma_tokenizer(model_dir)
    config = ExLlamaV2Config(str(model_dir))
    model = ExLlamaV2(config)
    model.load()
    tower = ExLlamaV2VisionTower(config)
    tower.load()
    return model_dir, hf, processor, model, tower, ExLlamaV2Tokenizer(config)


def test_config_reads_the_tower_and_refuses_what_it_cannot_run(gemma, tmp_path):
    model_dir, *_ = gemma
    config = ExLlamaV2Config(str(model_dir))
    assert config.vision_model_type == "gemma3" and config.arch.image_attention == "bidirectional"
    assert (config.vision_hidden_size, config.vision_num_layers, config.vision_image_size) == (32, 2, SIZE)
    assert (config.vision_mm_tokens_per_image, config.vision_boi_token_id, config.vision_eoi_token_id) == (TOKENS, BOI, EOI)
    assert (config.vision_resample, config.vision_image_mean) == (2, [0.5, 0.5, 0.5])
    for edit, match in (({"do_pan_and_scan": True}, "do_pan_and_scan"), ({"crop_size": 3}, "'crop_size'"),
                        ({"size": {"height": 64, "width": 64}}, "not the tower's image size"),
                        ({"image_seq_length": 4}, "mm_tokens_per_image")):
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        shutil.copytree(model_dir, bad)
        pre = json.loads((bad / "preprocessor_config.json").read_text())
        (bad / "preprocessor_config.json").write_text(json.dumps({**pre, **edit}))
        with pytest.raises(ConfigError, match=match):
            ExLlamaV2Config(str(bad))


@pytest.mark.parametrize("size", [(SIZE, SIZE), (70, 50), (20, 90), (300, 260)])
def test_preprocessing_equals_transformers(gemma, size):
    _, _, processor, _, tower, _ = gemma
    for mode in ("RGB", "RGBA", "L"):
        img = image(sum(size), *size, mode=mode)
        ref = processor(images=[img], return_tensors="pt")["pixel_values"][0]
        ours = pixel_values_gemma3(img, Gemma3ImageSettings.from_config(tower.config))
        torch.testing.assert_close(ours, ref.float(), atol=1e-6, rtol=0)


def test_image_block_is_what_the_processor_writes(gemma):
    """The alias's ids are Gemma3Processor's for one image (its image tokens as our embedding ids), with
    transformers' tokenizer holding the markers as special tokens."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import Gemma3Processor, PreTrainedTokenizerFast

    model_dir, _, processor, model, tower, tokenizer = gemma
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    names = ["<unused0>", "<unused1>", "<unused2>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    tok.add_special_tokens([AddedToken(n, special=True) for n in names])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens={
        "boi_token": names[3], "eoi_token": names[4], "image_token": names[5]})
    hf_proc = Gemma3Processor(image_processor=processor, tokenizer=hf_tok, image_seq_length=TOKENS)
    ref = hf_proc(text=[hf_proc.boi_token], images=[[image(1, 50, 40)]], return_tensors="pt")
    emb = tower.get_image_embeddings(model, tokenizer, image(1, 50, 40))
    ids = [IMAGE if i >= EMBEDDING_INDEX else i for i in emb.get_ids()]
    assert ids == ref["input_ids"][0].tolist() and ids.count(IMAGE) == TOKENS
    assert (ref["token_type_ids"][0] == 1).tolist() == [i >= EMBEDDING_INDEX for i in emb.get_ids()]


@pytest.mark.parametrize("size", [(SIZE, SIZE), (70, 50)])
def test_image_embeddings_equal_transformers(gemma, size):
    _, hf, processor, model, tower, tokenizer = gemma
    img = image(7, *size)
    emb = tower.get_image_embeddings(model, tokenizer, img, text_alias="<image>")
    with torch.no_grad():
        ref = hf.model.get_image_features(processor(images=[img], return_tensors="pt")["pixel_values"]).pooler_output
    assert emb.embeddings.device.type == "cpu" and emb.length == TOKENS
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(emb.embeddings.float(), ref[0], atol=1e-4, rtol=1e-3)


def _hub(key: str) -> str:
    """transformers < 5's layout (the hub's Gemma 3 checkpoints): SigLIP under vision_tower.vision_model."""
    return key.replace("vision_tower.", "vision_tower.vision_model.", 1)


@pytest.mark.parametrize("rename", [_hub, native_multimodal_key])
def test_other_key_layouts_give_the_same_embeddings(gemma, tmp_path, rename):
    from tests.tiny_models import rewrite_checkpoint

    model_dir, _, _, model, tower, tokenizer = gemma
    config = ExLlamaV2Config(str(rewrite_checkpoint(model_dir, tmp_path / "m", rename=rename)))
    other = ExLlamaV2VisionTower(config)
    other.load()
    assert other.prefix == rename("vision_tower.embeddings.").removesuffix("embeddings.")
    img = image(9, 40, 50)
    torch.testing.assert_close(other.get_image_embeddings(model, tokenizer, img).embeddings,
                               tower.get_image_embeddings(model, tokenizer, img).embeddings, atol=0, rtol=0)


def embed(gemma, seed: int, size: tuple[int, int]):
    _, _, _, model, tower, tokenizer = gemma
    img = image(seed, *size)
    e = tower.get_image_embeddings(model, tokenizer, img)
    e.source_image = img
    return e


def hf_inputs(processor, ids: list[int], images: list) -> dict:
    """transformers' inputs for our prompt ids: an embedding's ids as image tokens, marked by token_type_ids (the
    bidirectional mask), and the images' pixels."""
    ids_t = torch.tensor([[IMAGE if i >= EMBEDDING_INDEX else i for i in ids]])
    kwargs = {"input_ids": ids_t}
    if images:
        kwargs |= dict(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"],
                       token_type_ids=(ids_t == IMAGE).long())
    return kwargs


def our_logits(model, ids: list[int], embeddings: list, cache=None) -> torch.Tensor:
    remapped, table = remap_embeddings(torch.tensor([ids]), embeddings)
    return model.forward(remapped, cache, indexed_embeddings=table)[..., :VOCAB]


def test_logits_with_one_and_two_images_equal_transformers(gemma, monkeypatch):
    """Without a cache, and through one in chunks of 12 tokens that images cross; a causal-only text model (image
    attention switched off) is far from transformers, so the test sees the bidirectional mask."""
    _, hf, processor, model, _, _ = gemma
    a, b = embed(gemma, 1, (70, 50)), embed(gemma, 2, (30, 60))
    text = [[2, 40, 41, 42], [50, 51, 52, 53, 54], [60, 61, 62]]
    for parts in ([text[0], a, text[1]], [text[0], a, text[1], b, text[2]], [text[0], text[1]]):
        ids = prompt_ids(parts)
        embeddings = [p for p in parts if hasattr(p, "get_ids")]
        with torch.no_grad():
            ref = hf(**hf_inputs(processor, ids, [e.source_image for e in embeddings])).logits
        assert_logits_match(our_logits(model, ids, embeddings), ref)
        monkeypatch.setattr(model.config, "max_input_len", 12)
        assert_logits_match(our_logits(model, ids, embeddings, ExLlamaV2Cache(model, max_seq_len=64)), ref)
        monkeypatch.undo()
        if embeddings:
            monkeypatch.setattr(model, "archparams", dataclasses.replace(model.archparams, image_attention="causal"))
            assert not torch.allclose(our_logits(model, ids, embeddings), ref, atol=2e-2, rtol=2e-2)
            monkeypatch.undo()


def hf_greedy(hf, processor, ids: list[int], images: list, n: int) -> list[int]:
    """transformers' greedy continuation of our prompt ids, over the tokenizer's pieces (the generators sample
    only those)."""
    kwargs = hf_inputs(processor, ids, images)
    with torch.no_grad():
        out = hf.generate(**kwargs, attention_mask=torch.ones_like(kwargs["input_ids"]), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, suppress_tokens=list(range(TOKENIZER_VOCAB, VOCAB)))
    return out[0, kwargs["input_ids"].shape[1]:].tolist()


def test_prefill_through_the_cache_then_decode(gemma, monkeypatch):
    """The prompt prefilled (all but its last token) in chunks of 11 that images cross, then its last token: the
    logits transformers gives there; then decoded token by token: transformers' greedy continuation."""
    _, hf, processor, model, _, _ = gemma
    a, b = embed(gemma, 3, (50, 50)), embed(gemma, 4, (90, 40))
    ids = prompt_ids([[2, 40, 41], a, [50, 51], b, [60, 61, 62]])
    images = [a.source_image, b.source_image]
    with torch.no_grad():
        ref_last = hf(**hf_inputs(processor, ids, images)).logits[:, -1:]
    ref = hf_greedy(hf, processor, ids, images, 5)
    remapped, table = remap_embeddings(torch.tensor([ids]), [a, b])
    cache = ExLlamaV2Cache(model, max_seq_len=64)
    monkeypatch.setattr(model.config, "max_input_len", 11)
    model.forward(remapped[:, :-1], cache, preprocess_only=True, indexed_embeddings=table)
    monkeypatch.undo()
    logits = model.forward(remapped[:, -1:], cache)[..., :VOCAB]
    assert_logits_match(logits, ref_last)
    tokens = [int(logits[0, -1, :TOKENIZER_VOCAB].argmax())]
    for _ in range(4):
        tokens.append(int(model.forward(torch.tensor([tokens[-1:]]), cache)[0, -1, :TOKENIZER_VOCAB].argmax()))
    assert tokens == ref


@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.parametrize("backend", ["sdpa", "matmul"])
def test_dynamic_generator_batch_of_two_images(gemma, backend, paged, monkeypatch):
    """Two jobs at once, each with its own image under the same alias, then again (reusing pages of 16 tokens that
    end inside an image): transformers' continuations; prefill chunks of 12 tokens never cut an image."""
    import exllamav2.generator.dynamic as dynamic

    model_dir, hf, processor, _, tower, tokenizer = gemma
    config = ExLlamaV2Config(str(model_dir))
    config.attn_backend = backend
    model = ExLlamaV2(config)
    model.load()
    assert model.attn_plan.backend_for(torch.device("cpu")).name == backend
    monkeypatch.setattr(dynamic, "PAGE_SIZE", 16)
    cache = ExLlamaV2Cache(model, max_seq_len=256)
    generator = ExLlamaV2DynamicGenerator(model, cache, tokenizer, max_batch_size=4, max_chunk_size=12, paged=paged)
    imgs = [image(11, 60, 45), image(12, 60, 45)]
    embs = [tower.get_image_embeddings(model, tokenizer, img, text_alias="<image>") for img in imgs]
    ids = [tokenizer.encode("the cat is <image> and the dog", embeddings=[e], add_bos=True) for e in embs]
    refs = [hf_greedy(hf, processor, i[0].tolist(), [img], 5) for i, img in zip(ids, imgs)]
    assert refs[0] != refs[1]

    def job(i: int, name: str):
        return ExLlamaV2DynamicJob(input_ids=ids[i], max_new_tokens=5, embeddings=[embs[i]], identifier=name,
                                   stop_conditions=[], gen_settings=ExLlamaV2Sampler.Settings.greedy())

    jobs = [job(0, "a"), job(1, "b")] if paged else [job(0, "a")]      # paged=False runs one job at a time
    out = run_jobs(generator, jobs)
    assert all(out[j.identifier] == refs[j.identifier == "b"] for j in jobs)
    if paged:
        image_start = ids[0][0].tolist().index(BOI) + 1
        assert image_start < 16 < image_start + TOKENS          # the reused page ends inside the image
        again = run_jobs(generator, [job(1, "b2"), job(0, "a2")])
        assert again["a2"] == refs[0] and again["b2"] == refs[1] and again["a2", "cached"] >= 16


def test_base_and_streaming_generators_with_an_image_and_text_only(gemma):
    from exllamav2.generator import ExLlamaV2BaseGenerator, ExLlamaV2StreamingGenerator

    _, hf, processor, model, tower, tokenizer = gemma
    cache = ExLlamaV2Cache(model, max_seq_len=128)
    img = image(21, 40, 40)
    emb = tower.get_image_embeddings(model, tokenizer, img, text_alias="<image>")
    settings = ExLlamaV2Sampler.Settings.greedy()
    generator = ExLlamaV2BaseGenerator(model, cache, tokenizer)
    for prompt, embeddings, images in (("a <image> b", [emb], [img]), ("the cat and the dog", [], [])):
        ids = tokenizer.encode(prompt, embeddings=embeddings, add_bos=True)
        ref = hf_greedy(hf, processor, ids[0].tolist(), images, 4)
        text = generator.generate_simple(prompt, settings, 4, input_embeddings=embeddings, add_bos=True,
                                         stop_token=None, completion_only=True)
        assert text == tokenizer.decode(torch.tensor(ref))
    ids = tokenizer.encode("a <image> b", embeddings=[emb], add_bos=True)
    ref = hf_greedy(hf, processor, ids[0].tolist(), [img], 4)
    streaming = ExLlamaV2StreamingGenerator(model, cache, tokenizer)
    streaming.set_stop_conditions([])
    streaming.begin_stream_ex(ids, settings, input_embeddings=[emb])
    tokens: list[int] = []
    while len(tokens) < 4:
        tokens += streaming.stream_ex()["chunk_token_ids"].view(-1).tolist()
    assert tokens[:4] == ref


def test_vision_example_answers_as_transformers(gemma, tmp_path):
    """examples/vision.py --image PATH on Gemma 3: the reply is transformers' greedy continuation of the same
    prompt (Gemma's turn format)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import vision

    model_dir, hf, processor, model, tower, tokenizer = gemma
    path = tmp_path / "img.png"
    image(43, 50, 40).save(path)
    args = vision.parse_args(["-m", str(model_dir), "--image", str(path), "--prompt", "the cat",
                              "--max-new-tokens", "4"])
    reply = vision.run(args)
    emb = tower.get_image_embeddings(model, tokenizer, path, text_alias="<image 0>")
    ids = tokenizer.encode(vision.build_prompt(["<image 0>"], "the cat", "gemma3"), encode_special_tokens=True,
                           embeddings=[emb])
    ref = hf_greedy(hf, processor, ids[0].tolist(), [PIL.open(path)], 4)
    assert reply == tokenizer.decode(torch.tensor(ref))


def test_exl2_keeps_the_tower_fp16_and_gives_the_same_embeddings(gemma, tmp_path):
    import convert
    from safetensors import safe_open

    model_dir, _, _, model, tower, tokenizer = gemma
    out = tmp_path / "exl2"
    assert convert.main(["-i", str(model_dir), "-o", str(tmp_path / "work"), "-cf", str(out), "-b", "4.0",
                         "-r", "4", "-l", "64", "-mr", "4", "-ml", "64"]) == 0
    src = ExLlamaV2Config(str(model_dir)).index
    owned = tower.owned_prefixes()
    with safe_open(str(next(out.glob("*.safetensors"))), framework="pt") as f:
        written = set(f.keys())
        vision = sorted(k for k in written if k.startswith(owned))
        assert vision == sorted(k for k in src.keys() if k.startswith(owned)) and len(vision) > 30
        for key in vision:
            t = f.get_tensor(key)
            assert t.dtype == torch.float16 and torch.equal(t, src.get(key).half()), key
    assert any(k.endswith(".q_weight") for k in written)
    config = ExLlamaV2Config(str(out))
    quantized = ExLlamaV2(config)
    quantized.load()
    exl2_tower = ExLlamaV2VisionTower(config)
    exl2_tower.load()
    img = image(31, 50, 70)
    torch.testing.assert_close(exl2_tower.get_image_embeddings(quantized, tokenizer, img).embeddings,
                               tower.get_image_embeddings(model, tokenizer, img).embeddings, atol=0, rtol=0)


def test_bad_input_gives_one_clear_error_each(gemma, tmp_path, tiny_model_factory):
    model_dir, _, _, model, tower, tokenizer = gemma
    good = io.BytesIO()
    image(3, 40, 40).save(good, format="PNG")
    for bad in (good.getvalue()[:60], b"not an image at all", str(tmp_path / "missing.jpg")):
        with pytest.raises(InputError, match="cannot read the image"):
            tower.get_image_embeddings(model, tokenizer, bad)
    with pytest.raises(ValueError, match="pass the model's tokenizer"):
        tower.get_image_embeddings(model, None, image(3, 40, 40))
    emb = tower.get_image_embeddings(model, tokenizer, image(5, 40, 40), text_alias="<image>")
    ids = tokenizer.encode("the cat <imag> and", embeddings=[emb], add_bos=True)       # misspelt alias
    with pytest.raises(ValueError, match="does not hold the text alias of embedding.*'<image>'"):
        ExLlamaV2DynamicJob(input_ids=ids, max_new_tokens=2, embeddings=[emb])
    remapped, table = remap_embeddings(torch.tensor([[2, 40, *emb.get_ids(), 50]]), [emb])
    with pytest.raises(InputError, match="ends on an image's token"):                 # split inside the image
        model.forward(remapped[:, :8], ExLlamaV2Cache(model, max_seq_len=64), indexed_embeddings=table)
    rows = torch.cat((remapped, torch.cat((remapped[:, 1:], remapped[:, :1]), dim=1)))
    with pytest.raises(InputError, match="images at different positions"):
        model.forward(rows, indexed_embeddings=table)
    cache = ExLlamaV2Cache(model, max_seq_len=256)
    with pytest.raises(GenerationArgumentError, match="image of 9 tokens does not fit .* max_chunk_size 9"):
        ExLlamaV2DynamicGenerator(model, cache, tokenizer, max_chunk_size=9).enqueue(
            ExLlamaV2DynamicJob(input_ids=torch.tensor([[2, 40, *emb.get_ids(), 50]]), max_new_tokens=2,
                                embeddings=[emb]))
    text_dir, _ = tiny_model_factory("gemma3")
    text_model = ExLlamaV2(ExLlamaV2Config(str(text_dir)))
    with pytest.raises(ValueError, match="is not the text model of this gemma3"):
        tower.get_image_embeddings(text_model, tokenizer, image(5, 40, 40))
    with pytest.raises(ValueError, match="Gemma3ForCausalLM has no vision tower"):
        ExLlamaV2VisionTower(ExLlamaV2Config(str(text_dir)))
    from safetensors.torch import load_file, save_file

    extra = tmp_path / "extra"                  # a projector tensor the tower does not read
    shutil.copytree(model_dir, extra)
    path = next(extra.glob("*.safetensors"))
    save_file({**load_file(path), "multi_modal_projector.extra.weight": torch.ones(4, dtype=torch.float16)}, path)
    with pytest.raises(CheckpointError, match="multi_modal_projector.extra.weight"):
        ExLlamaV2VisionTower(ExLlamaV2Config(str(extra))).load()
    head = tmp_path / "head"
    shutil.copytree(model_dir, head)
    cfg = json.loads((head / "config.json").read_text())
    cfg["vision_config"]["vision_use_head"] = True
    (head / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="vision_use_head"):
        ExLlamaV2VisionTower(ExLlamaV2Config(str(head)))


def test_spans_and_chunk_ends():
    """Text spans causal, each image one non-causal span; a chunk end inside an image moves back to the image's
    start, or (for a chunk starting in it) past it and the token after it; too long an image is refused."""
    from exllamav2.model.image_attention import attention_spans, chunk_end

    is_image = [False, False, True, True, True, False, True, True, False, False]
    assert attention_spans(is_image) == [(0, 2, True), (2, 5, False), (5, 6, True), (6, 8, False), (8, 10, True)]
    assert attention_spans(None) is None and chunk_end(None, 0, 3, 4) == 3
    assert [chunk_end(is_image, 0, end, 9) for end in (2, 3, 4, 5, 6, 10)] == [2, 2, 2, 2, 6, 10]
    assert chunk_end(is_image, 2, 3, 9) == 6 and chunk_end(is_image, 3, 4, 9) == 6 and chunk_end(is_image, 6, 7, 9) == 9
    assert chunk_end(is_image[:8], 6, 7, 9) == 8               # the input's end: no token after the image
    with pytest.raises(InputError, match="image of 3 tokens does not fit a forward chunk of 3"):
        chunk_end(is_image, 2, 4, 3)
