"""Pixtral-tower images through upstream's vision API, against transformers on tiny random models: Mistral 3
(Pixtral tower, RMSNorm + patch merger + MLP) and Llava with a Pixtral tower (Pixtral-12B's HF layout).
Preprocessing, the image block ([IMG] rows, [IMG_BREAK], [IMG_END]), image embeddings, logits with one and two
images, the generators, EXL2, the config readers and bad input."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
import torch

from exllamav2 import (ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2MultimodalProjector, ExLlamaV2Tokenizer,
                       ExLlamaV2VisionTower)
from exllamav2.errors import ConfigError
from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler
from exllamav2.model.embedding import EMBEDDING_INDEX
from exllamav2.model.mm_embedding import SLOT, ExLlamaV2MMEmbedding, check_aliases_present, remap_embeddings
from exllamav2.vlm.pixtral_preprocess import PixtralImageSettings, preprocess_pixtral
from tests.tiny_models import build_tiny_model, rewrite_checkpoint, write_tokenizer
from tests.vision_helpers import assert_logits_match, image, prompt_ids, run_jobs

PIL = pytest.importorskip("PIL.Image")

VOCAB = 256                     # the image tokens sit above the tokenizer's 250 pieces
TOKENIZER_VOCAB = 253
IMG, BREAK, END = 250, 251, 252          # [IMG], [IMG_BREAK], [IMG_END], added to the tokenizer
PATCH, LONGEST = 14, 112
_TEXT = {"model_type": "mistral", "vocab_size": VOCAB, "head_dim": 16}
_TOWER = {"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 2, "image_size": LONGEST, "patch_size": PATCH,
          "initializer_range": 0.2}     # large enough weights that attention (and so the 2-D RoPE) matters
SPECS = {    # family -> (config class, text overrides, top-level keys), spatial merge size
    "mistral3": (("Mistral3Config", _TEXT, {"vision_config": _TOWER, "image_token_index": IMG,
                                            "spatial_merge_size": 2}), 2),
    "pixtral": (("LlavaConfig", _TEXT, {"vision_config": _TOWER, "image_token_index": IMG, "vision_feature_layer": -1,
                                        "vision_feature_select_strategy": "full", "multimodal_projector_bias": True}),
                1),
}


def write_image_tokenizer(model_dir) -> None:
    """The tiny BPE tokenizer with [IMG], [IMG_BREAK] and [IMG_END] added as special tokens (ids 250-252)."""
    from tokenizers import Tokenizer

    write_tokenizer(model_dir)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.add_special_tokens(["[IMG]", "[IMG_BREAK]", "[IMG_END]"])
    tok.save(str(model_dir / "tokenizer.json"))
    assert [tok.token_to_id(t) for t in ("[IMG]", "[IMG_BREAK]", "[IMG_END]")] == [IMG, BREAK, END]


@pytest.fixture(scope="module", params=list(SPECS))
def pixtral(request, tmp_path_factory):
    """SimpleNamespace(family, merge, dir, hf, processor, model, tower, tokenizer)."""
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    family = request.param
    spec, merge = SPECS[family]
    model_dir = tmp_path_factory.mktemp(family)
    _, hf = build_tiny_model(family, model_dir, spec=spec)
    processor = PixtralImageProcessorPil(size={"longest_edge": LONGEST}, patch_size={"height": PATCH, "width": PATCH})
    processor.save_pretrained(model_dir)
    write_image_tokenizer(model_dir)
    config = ExLlamaV2Config(str(model_dir))
    model = ExLlamaV2(config)
    model.load()
    tower = ExLlamaV2VisionTower(config)
    tower.load()
    return SimpleNamespace(family=family, merge=merge, dir=model_dir, hf=hf, processor=processor, model=model,
                           tower=tower, tokenizer=ExLlamaV2Tokenizer(config))


def hf_pixels(px, images: list) -> dict:
    """The image processor's output as PixtralProcessor calls it (patch size = patch * merge), padded to a batch."""
    unit = PATCH * px.merge
    return dict(px.processor(images=images, patch_size={"height": unit, "width": unit}, return_tensors="pt"))


def hf_image_block(px, height: int, width: int) -> list[int]:
    """PixtralProcessor.replace_image_token's block for an image of this processed size, as token ids (its module
    needs torchvision, so its rule is restated: per row of (patch * merge) squares one [IMG] each and
    [IMG_BREAK], the last [IMG_BREAK] replaced by [IMG_END])."""
    unit = PATCH * px.merge
    block = ([IMG] * (width // unit) + [BREAK]) * (height // unit)
    return block[:-1] + [END]


def test_config_reads_the_vision_settings(pixtral):
    cfg = pixtral.tower.config
    assert cfg.vision_model_type == pixtral.family
    assert (cfg.vision_hidden_size, cfg.vision_num_layers, cfg.vision_head_dim, cfg.vision_spatial_merge_size) == \
        (32, 2, 16, pixtral.merge)
    assert (cfg.image_token_id, cfg.vision_image_break_token_id, cfg.vision_image_end_token_id) == (IMG, BREAK, END)
    assert cfg.vision_size == {"longest_edge": LONGEST} and cfg.vision_resample == 3
    assert cfg.vision_projector_bias == (pixtral.family == "pixtral")


@pytest.mark.parametrize("size", [(56, 56), (84, 140), (200, 90), (30, 40), (300, 260), (13, 113)])
def test_preprocessing_equals_transformers(pixtral, size):
    settings = PixtralImageSettings.from_config(pixtral.tower.config)
    for mode in ("RGB", "RGBA", "L"):
        img = image(sum(size), *size, mode=mode)
        ref = hf_pixels(pixtral, [img])
        ours = preprocess_pixtral(img, settings)
        assert tuple(ref["image_sizes"][0].tolist()) == tuple(ours.shape[1:])
        torch.testing.assert_close(ours, ref["pixel_values"][0].float(), atol=1e-5, rtol=0)


def hf_embeddings(px, img) -> torch.Tensor:
    inputs = hf_pixels(px, [img])
    with torch.no_grad():
        return torch.cat(px.hf.model.get_image_features(inputs["pixel_values"], image_sizes=inputs["image_sizes"])
                         .pooler_output)


@pytest.mark.parametrize("size", [(56, 56), (140, 84), (84, 140), (30, 100)])
def test_image_embeddings_and_block_equal_transformers(pixtral, size):
    img = image(7, *size)
    emb = pixtral.tower.get_image_embeddings(pixtral.model, None, img, text_alias="<image>")
    ref = hf_embeddings(pixtral, img)
    assert emb.embeddings.device.type == "cpu" and emb.length == ref.shape[0]
    torch.testing.assert_close(emb.embeddings.float(), ref, atol=1e-4, rtol=1e-3)
    height, width = hf_pixels(pixtral, [img])["image_sizes"][0].tolist()
    ids = emb.get_ids()
    assert [IMG if i >= EMBEDDING_INDEX else i for i in ids] == hf_image_block(pixtral, height, width)
    assert [i for i in ids if i >= EMBEDDING_INDEX] == list(range(ids[0], ids[0] + emb.length))


def embed(px, seed: int, size: tuple[int, int], alias: str | None = None):
    img = image(seed, *size)
    e = px.tower.get_image_embeddings(px.model, px.tokenizer, img, text_alias=alias)
    e.source_image = img
    return e


def hf_logits(px, parts: list) -> torch.Tensor:
    """transformers' logits for the same prompt: each embedding id an [IMG], the images through its processor."""
    ids = torch.tensor([[IMG if i >= EMBEDDING_INDEX else i for i in prompt_ids(parts)]])
    images = [p.source_image for p in parts if hasattr(p, "get_ids")]
    kwargs = {}
    if images:
        inputs = hf_pixels(px, images)
        kwargs = dict(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    with torch.no_grad():
        return px.hf(input_ids=ids, **kwargs).logits


def our_logits(model, ids: list[int], embeddings: list, cache=None, split: int | None = None) -> torch.Tensor:
    remapped, table = remap_embeddings(torch.tensor([ids]), embeddings)
    if split is None:
        return model.forward(remapped, cache, indexed_embeddings=table)[..., :VOCAB]
    first = model.forward(remapped[:, :split], cache, indexed_embeddings=table)
    second = model.forward(remapped[:, split:], cache, indexed_embeddings=table)
    return torch.cat((first, second), dim=1)[..., :VOCAB]


def test_logits_with_one_and_two_images_equal_transformers(pixtral):
    a, b = embed(pixtral, 1, (84, 56)), embed(pixtral, 2, (56, 140))
    text = [[1, 40, 41, 42], [50, 51, 52, 53, 54], [60, 61, 62]]
    for parts in ([text[0], a, text[1]], [text[0], a, text[1], b, text[2]], [text[0], text[1]]):
        ids = prompt_ids(parts)
        embeddings = [p for p in parts if hasattr(p, "get_ids")]
        ref = hf_logits(pixtral, parts)
        assert_logits_match(our_logits(pixtral.model, ids, embeddings), ref)
        # through a cache in two chunks, the second starting inside the first image's block
        cache = ExLlamaV2Cache(pixtral.model, max_seq_len=256)
        assert_logits_match(our_logits(pixtral.model, ids, embeddings, cache=cache, split=len(text[0]) + 2), ref)


def hf_greedy(px, ids: list[int], images: list, n: int) -> list[int]:
    """transformers' greedy continuation of our prompt ids (embedding ids become [IMG]) over the tokenizer's
    pieces (the generators sample only those)."""
    ids_t = torch.tensor([[IMG if i >= EMBEDDING_INDEX else i for i in ids]])
    kwargs = {}
    if images:
        inputs = hf_pixels(px, images)
        kwargs = dict(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    with torch.no_grad():
        out = px.hf.generate(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, suppress_tokens=list(range(TOKENIZER_VOCAB, VOCAB)),
                             **kwargs)
    return out[0, ids_t.shape[1]:].tolist()


@pytest.mark.parametrize("backend", ["matmul", "sdpa"])
def test_dynamic_generator_batch_of_two_images_with_one_alias(pixtral, backend, monkeypatch):
    """Two jobs at once, each with its own image under the same alias, then both again, on each CPU attention
    backend (tower and text model): each continuation is transformers', and the page cache (pages of 16 tokens)
    reuses pages of the same image only."""
    import exllamav2.generator.dynamic as dynamic

    monkeypatch.setattr(dynamic, "PAGE_SIZE", 16)
    config = ExLlamaV2Config(str(pixtral.dir))
    config.attn_backend = backend
    model = ExLlamaV2(config)
    model.load()
    tower = ExLlamaV2VisionTower(config)
    tower.load()
    tokenizer = pixtral.tokenizer
    generator = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, max_seq_len=512), tokenizer, max_batch_size=4)
    imgs = [image(11, 112, 84), image(12, 112, 84)]          # the same size: the same layout if the cache mixed them
    embs = [tower.get_image_embeddings(model, tokenizer, img, text_alias="<image>") for img in imgs]
    ids = [tokenizer.encode("the cat <image> and the dog", embeddings=[e], add_bos=True) for e in embs]
    refs = [hf_greedy(pixtral, i[0].tolist(), [img], 6) for i, img in zip(ids, imgs)]
    assert refs[0] != refs[1]

    def job(i: int, name: str):
        return ExLlamaV2DynamicJob(input_ids=ids[i], max_new_tokens=6, embeddings=[embs[i]], identifier=name,
                                   stop_conditions=[], gen_settings=ExLlamaV2Sampler.Settings.greedy())

    out = run_jobs(generator, [job(0, "a"), job(1, "b")])
    assert out["a"] == refs[0] and out["b"] == refs[1]
    again = run_jobs(generator, [job(1, "b2"), job(0, "a2")])
    assert again["a2"] == refs[0] and again["b2"] == refs[1]
    assert again["a2", "cached"] >= 16 and again["b2", "cached"] >= 16


def test_text_only_prompt_on_a_vision_checkpoint(pixtral):
    from exllamav2.generator import ExLlamaV2BaseGenerator

    tokenizer = pixtral.tokenizer
    generator = ExLlamaV2BaseGenerator(pixtral.model, ExLlamaV2Cache(pixtral.model, max_seq_len=256), tokenizer)
    ids = tokenizer.encode("the cat and the dog", add_bos=True)
    ref = hf_greedy(pixtral, ids[0].tolist(), [], 5)
    text = generator.generate_simple("the cat and the dog", ExLlamaV2Sampler.Settings.greedy(), 5, add_bos=True,
                                     stop_token=None, completion_only=True)
    assert text == tokenizer.decode(torch.tensor(ref))


def test_exl2_keeps_the_tower_fp16_and_gives_the_same_embeddings(pixtral, tmp_path):
    """convert.py quantizes the text model only: every tower and projector tensor is written as it was (FP16), the
    EXL2 model loads with its tower, and the tower gives the same image embeddings."""
    import convert
    from safetensors import safe_open

    out = tmp_path / "exl2"
    assert convert.main(["-i", str(pixtral.dir), "-o", str(tmp_path / "work"), "-cf", str(out), "-b", "4.0",
                         "-r", "4", "-l", "64", "-mr", "4", "-ml", "64"]) == 0
    src = ExLlamaV2Config(str(pixtral.dir)).index
    owned = pixtral.tower.owned_prefixes()
    with safe_open(str(next(out.glob("*.safetensors"))), framework="pt") as f:
        written = set(f.keys())
        vision = sorted(k for k in written if k.startswith(owned))
        assert vision == sorted(k for k in src.keys() if k.startswith(owned)) and len(owned) == 2
        assert any(k.startswith(owned[1]) for k in vision)                  # the projector too
        for key in vision:
            t = f.get_tensor(key)
            assert t.dtype == torch.float16 and torch.equal(t, src.get(key).half()), key
    assert any(k.endswith(".q_weight") for k in written)
    config = ExLlamaV2Config(str(out))
    assert config.vision_model_type == pixtral.family
    quantized = ExLlamaV2(config)
    quantized.load()
    assert quantized.is_quant()
    exl2_tower = ExLlamaV2VisionTower(config)
    exl2_tower.load()
    img = image(31, 84, 112)
    torch.testing.assert_close(exl2_tower.get_image_embeddings(quantized, None, img).embeddings,
                               pixtral.tower.get_image_embeddings(pixtral.model, None, img).embeddings, atol=0, rtol=0)


def test_transformers_5_key_layout_loads_the_same_tower(pixtral, tmp_path):
    """model.vision_tower.* and model.multi_modal_projector.* (transformers >= 4.52): the same embeddings."""
    def native(key: str) -> str:
        for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head", "lm_head"),
                         ("vision_tower.", "model.vision_tower."),
                         ("multi_modal_projector.", "model.multi_modal_projector.")):
            if key.startswith(old):
                return new + key[len(old):]
        return key

    config = ExLlamaV2Config(str(rewrite_checkpoint(pixtral.dir, tmp_path / "native", rename=native)))
    tower = ExLlamaV2VisionTower(config)
    tower.load()
    assert tower.owned_prefixes() == ("model.vision_tower.", "model.multi_modal_projector.")
    img = image(9, 56, 84)
    torch.testing.assert_close(tower.get_image_embeddings(pixtral.model, None, img).embeddings,
                               pixtral.tower.get_image_embeddings(pixtral.model, None, img).embeddings, atol=0, rtol=0)


def test_vision_example_answers_as_transformers(pixtral, tmp_path):
    """examples/vision.py --image PATH on these models: the reply is transformers' greedy continuation of the
    same prompt (Mistral's [INST] format)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import vision

    path = tmp_path / "img.png"
    image(41, 84, 56).save(path)
    args = vision.parse_args(["-m", str(pixtral.dir), "--image", str(path), "--prompt", "the cat",
                              "--max-new-tokens", "5"])
    reply = vision.run(args)
    tokenizer = pixtral.tokenizer
    emb = pixtral.tower.get_image_embeddings(pixtral.model, tokenizer, path, text_alias="<image 0>")
    prompt = vision.build_prompt(["<image 0>"], "the cat", pixtral.family)
    ids = tokenizer.encode(prompt, encode_special_tokens=True, embeddings=[emb])
    ref = hf_greedy(pixtral, ids[0].tolist(), [PIL.open(path)], 5)
    assert reply == tokenizer.decode(torch.tensor(ref))


def test_bad_input_gives_one_clear_error_each(pixtral, tmp_path, tiny):
    from exllamav2.errors import InputError

    model, tower, tokenizer = pixtral.model, pixtral.tower, pixtral.tokenizer
    corrupt = tmp_path / "broken.png"
    good = io.BytesIO()
    image(3, 56, 56).save(good, format="PNG")
    corrupt.write_bytes(good.getvalue()[:60])
    for bad in (corrupt, b"not an image at all", str(tmp_path / "missing.jpg")):
        with pytest.raises(InputError, match="cannot read the image"):
            tower.get_image_embeddings(model, tokenizer, bad)
    with pytest.raises(InputError, match="aspect ratio is too extreme"):
        tower.get_image_embeddings(model, tokenizer, image(4, 2000, 1))
    emb = tower.get_image_embeddings(model, tokenizer, image(5, 56, 56), text_alias="<image>")
    ids = tokenizer.encode("the cat <imag> and", embeddings=[emb], add_bos=True)       # misspelt alias
    with pytest.raises(ValueError, match="does not hold the text alias of embedding.*'<image>'"):
        ExLlamaV2DynamicJob(input_ids=ids, max_new_tokens=2, embeddings=[emb])
    text_model = ExLlamaV2(ExLlamaV2Config(str(tiny[0])))
    with pytest.raises(ValueError, match=f"is not the text model of this {pixtral.family}"):
        tower.get_image_embeddings(text_model, tokenizer, image(5, 56, 56))
    with pytest.raises(ValueError, match="runs inside ExLlamaV2VisionTower"):
        ExLlamaV2MultimodalProjector(tower.config)


def _rewritten(px, tmp_path, edit=lambda cfg: None, files: dict | None = None) -> ExLlamaV2Config:
    dst = rewrite_checkpoint(px.dir, tmp_path / "m", edit=edit)
    for name, content in (files or {}).items():
        (dst / name).write_text(json.dumps(content)) if content is not None else (dst / name).unlink()
    return ExLlamaV2Config(str(dst))


def test_unknown_settings_are_refused_by_name(pixtral, tmp_path):
    pre = json.loads((pixtral.dir / "preprocessor_config.json").read_text())
    with pytest.raises(ConfigError, match="'do_center_crop'"):
        _rewritten(pixtral, tmp_path / "a", files={"preprocessor_config.json": {**pre, "do_center_crop": True}})
    with pytest.raises(ConfigError, match="resample 2"):
        _rewritten(pixtral, tmp_path / "b", files={"preprocessor_config.json": {**pre, "resample": 2}})
    with pytest.raises(ConfigError, match="'image_seq_len'"):
        _rewritten(pixtral, tmp_path / "c", files={"processor_config.json": {"image_seq_len": 4}})
    with pytest.raises(ConfigError, match="spatial_merge_size 3 disagrees"):
        _rewritten(pixtral, tmp_path / "d", files={"processor_config.json": {"spatial_merge_size": 3}})

    def layer(cfg):
        cfg["vision_feature_layer"] = -2

    with pytest.raises(ConfigError, match="vision_feature_layer -2"):
        _rewritten(pixtral, tmp_path / "e", edit=layer)
    # a tokenizer without [IMG_BREAK]: the text model loads, the tower says what is missing
    config = _rewritten(pixtral, tmp_path / "f", files={"tokenizer.json": None})
    assert config.vision_model_type == pixtral.family and config.vision_image_break_token_id is None
    with pytest.raises(ConfigError, match=r"no \[IMG_BREAK\] token"):
        ExLlamaV2VisionTower(config)


def test_a_tower_tensor_left_unread_is_an_error(pixtral, tmp_path):
    from safetensors.torch import load_file, save_file

    from exllamav2.errors import CheckpointError

    dst = rewrite_checkpoint(pixtral.dir, tmp_path / "m")
    path = next(dst.glob("*.safetensors"))
    tensors = load_file(path)
    tensors["multi_modal_projector.extra.weight"] = torch.ones(4, dtype=torch.float16)
    save_file(tensors, path)
    tower = ExLlamaV2VisionTower(ExLlamaV2Config(str(dst)))
    with pytest.raises(CheckpointError, match="multi_modal_projector.extra.weight"):
        tower.load()


def test_llava_with_a_clip_tower_stays_text_only(tiny_model_factory):
    src, _ = tiny_model_factory("llava")
    config = ExLlamaV2Config(str(src))
    assert config.vision_model_type is None
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration has no vision tower"):
        ExLlamaV2VisionTower(config)


class _Model:
    config = SimpleNamespace(hidden_size=4)


def test_mm_embedding_template_interleaves_plain_ids():
    """A template places the embedding's ids among plain ids; remapping, the alias check and the content hash
    work on it; a wrong template is refused; without one the ids are consecutive, as before."""
    rows = torch.arange(24, dtype=torch.float32).view(6, 4)
    template = [SLOT, SLOT, SLOT, BREAK, SLOT, SLOT, SLOT, END]
    e = ExLlamaV2MMEmbedding(_Model(), rows, "<i>", pre_ids=[7], template=template)
    first = EMBEDDING_INDEX + e.first_index
    assert e.get_ids() == [7, first, first + 1, first + 2, BREAK, first + 3, first + 4, first + 5, END]
    plain = ExLlamaV2MMEmbedding(_Model(), rows, "<p>")
    assert plain.get_ids() == list(range(EMBEDDING_INDEX + plain.first_index, EMBEDDING_INDEX + plain.first_index + 6))
    assert plain.content_hash != e.content_hash and plain.first_index != e.first_index   # another layout
    other = ExLlamaV2MMEmbedding(_Model(), rows, template=[SLOT] * 3 + [BREAK] + [SLOT] * 3 + [BREAK])
    assert other.first_index != e.first_index
    assert ExLlamaV2MMEmbedding(_Model(), rows.clone(), template=template).first_index == e.first_index
    ids, table = remap_embeddings(torch.tensor([[1, *e.get_ids(), 2]]), [e])
    assert ids[0].tolist() == [1, 7, *[EMBEDDING_INDEX + i for i in range(3)], BREAK,
                               *[EMBEDDING_INDEX + i for i in range(3, 6)], END, 2]
    assert torch.equal(table, rows)
    check_aliases_present([torch.tensor(e.get_ids())], [e])
    for bad, match in (([SLOT] * 5, "5 slots for 6"), ([SLOT] * 6 + [-3], "plain token ids"),
                       ([SLOT] * 6 + [EMBEDDING_INDEX], "plain token ids")):
        with pytest.raises(ValueError, match=match):
            ExLlamaV2MMEmbedding(_Model(), rows, template=bad)
    with pytest.raises(ValueError, match="mrope_grid takes no template"):
        ExLlamaV2MMEmbedding(_Model(), rows, mrope_grid=(1, 2, 3), template=[SLOT] * 6)
