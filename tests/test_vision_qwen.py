"""Qwen2-VL and Qwen2.5-VL images through upstream's vision API, against transformers on tiny random models:
preprocessing, image embeddings (tower + merger), logits with one and two images (MRoPE), the generators, EXL2,
and bad input."""

from __future__ import annotations

import io


import pytest
import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer, ExLlamaV2VisionTower
from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler
from exllamav2.model.embedding import EMBEDDING_INDEX
from exllamav2.model.mm_embedding import remap_embeddings
from exllamav2.vlm.mrope import mrope_layout
from exllamav2.vlm.qwen_preprocess import QwenImageSettings, preprocess_qwen
from tests.tiny_models import _COMMON, build_tiny_model, write_tokenizer
from tests.vision_helpers import assert_logits_match, image, run_jobs

PIL = pytest.importorskip("PIL.Image")

VOCAB = 256                 # the image ids sit above the tokenizer's pieces
TOKENIZER_VOCAB = 250
START, END, PAD = 252, 253, 255          # <|vision_start|>, <|vision_end|>, <|image_pad|>
_TEXT = {"vocab_size": VOCAB, "head_dim": 16, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4}}
_TOP = {"image_token_id": PAD, "video_token_id": 254, "vision_start_token_id": START, "vision_end_token_id": END}
SPECS = {
    "qwen2_vl": ("Qwen2VLConfig", _TEXT, {
        **_TOP, "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": _COMMON["hidden_size"], "num_heads": 2}}),
    # two blocks, the second with full attention; windows of 2 x 2 merged patches (56 px)
    "qwen2_5_vl": ("Qwen2_5_VLConfig", _TEXT, {
        **_TOP, "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                  "out_hidden_size": _COMMON["hidden_size"], "fullatt_block_indexes": [1],
                                  "window_size": 56}}),
}
MIN_PIXELS, MAX_PIXELS = 56 * 56, 140 * 140


@pytest.fixture(scope="module", params=list(SPECS))
def qwen(request, tmp_path_factory):
    """(family, model dir, transformers model, HF image processor, our model, our tower)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    family = request.param
    model_dir = tmp_path_factory.mktemp(family)
    _, hf = build_tiny_model(family, model_dir, spec=SPECS[family])
    processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    processor.save_pretrained(model_dir)
    write_tokenizer(model_dir)
    config = ExLlamaV2Config(str(model_dir))
    model = ExLlamaV2(config)
    model.load()
    tower = ExLlamaV2VisionTower(config)
    tower.load()
    return family, model_dir, hf, processor, model, tower


def hf_pixels(processor, img) -> tuple[torch.Tensor, torch.Tensor]:
    out = processor(images=[img], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


@pytest.mark.parametrize("size", [(56, 56), (84, 140), (200, 90), (30, 40), (300, 260)])
def test_preprocessing_equals_transformers(qwen, size):
    _, _, _, processor, _, tower = qwen
    for mode in ("RGB", "RGBA", "L"):
        img = image(sum(size), *size, mode=mode)
        ref, grid = hf_pixels(processor, img)
        ours, our_grid = preprocess_qwen(img, QwenImageSettings.from_config(tower.config))
        assert our_grid == tuple(grid[0].tolist())
        torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=0)


def hf_embeddings(hf, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(hf.model.get_image_features(pixels, grid).pooler_output)


@pytest.mark.parametrize("size", [(56, 56), (140, 84), (84, 140)])
def test_image_embeddings_equal_transformers(qwen, size):
    _, _, hf, processor, model, tower = qwen
    img = image(7, *size)
    emb = tower.get_image_embeddings(model, None, img, text_alias="<image>")
    ref = hf_embeddings(hf, *hf_pixels(processor, img))
    assert emb.embeddings.device.type == "cpu" and emb.length == ref.shape[0]
    torch.testing.assert_close(emb.embeddings.float(), ref, atol=1e-4, rtol=1e-3)
    t, h, w = emb.mrope_grid
    assert emb.get_ids()[0] == START and emb.get_ids()[-1] == END and t * h * w == emb.length
    assert all(i >= EMBEDDING_INDEX for i in emb.get_ids()[1:-1])


def prompt_with_images(parts: list) -> list[int]:
    """Token ids of text pieces (lists of ids) and embeddings (their whole image block) in order."""
    ids: list[int] = []
    for part in parts:
        ids += part.get_ids() if hasattr(part, "get_ids") else part
    return ids


def hf_logits(hf, processor, parts: list) -> torch.Tensor:
    """transformers' logits for the same prompt, written as its processor writes it: start, pads, end."""
    ids, images = [], []
    for part in parts:
        if hasattr(part, "get_ids"):
            ids += [START] + [PAD] * part.length + [END]
            images.append(part.source_image)
        else:
            ids += part
    ids_t = torch.tensor([ids])
    kwargs = {}
    if images:
        out = processor(images=images, return_tensors="pt")
        kwargs = dict(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"],
                      mm_token_type_ids=(ids_t == PAD).int())
    with torch.no_grad():
        return hf(input_ids=ids_t, **kwargs).logits


def embed(tower, model, seed: int, size: tuple[int, int]):
    img = image(seed, *size)
    e = tower.get_image_embeddings(model, None, img)
    e.source_image = img
    return e


def our_logits(model, ids: list[int], embeddings: list, cache=None, split: int | None = None) -> torch.Tensor:
    """Logits of the whole prompt, in one forward or (with a cache) two, MRoPE positions from the layout."""
    layout = mrope_layout(ids, embeddings)
    remapped, table = remap_embeddings(torch.tensor([ids]), embeddings)
    pos = None if layout is None else layout.window(0, len(ids)).unsqueeze(1)
    extra = {} if pos is None else {"mrope_positions": pos}
    if split is None:
        return model.forward(remapped, cache, indexed_embeddings=table, **extra)[..., :VOCAB]
    first = model.forward(remapped[:, :split], cache, indexed_embeddings=table,
                          **({} if pos is None else {"mrope_positions": pos[:, :, :split]}))
    second = model.forward(remapped[:, split:], cache, indexed_embeddings=table,
                           **({} if pos is None else {"mrope_positions": pos[:, :, split:]}))
    return torch.cat((first, second), dim=1)[..., :VOCAB]


def test_logits_with_one_and_two_images_equal_transformers(qwen):
    _, _, hf, processor, model, tower = qwen
    a, b = embed(tower, model, 1, (84, 56)), embed(tower, model, 2, (56, 140))
    text = [[1, 40, 41, 42], [50, 51, 52, 53, 54], [60, 61, 62]]
    for parts in ([text[0], a, text[1]], [text[0], a, text[1], b, text[2]], [text[0], text[1]]):
        ids = prompt_with_images(parts)
        embeddings = [p for p in parts if hasattr(p, "get_ids")]
        ref = hf_logits(hf, processor, parts)
        assert_logits_match(our_logits(model, ids, embeddings), ref)
        # through a cache in two chunks, the second starting inside the first image: positions carry over
        cache = ExLlamaV2Cache(model, max_seq_len=256)
        assert_logits_match(our_logits(model, ids, embeddings, cache=cache, split=len(text[0]) + 3), ref)


def hf_greedy(hf, processor, ids: list[int], images: list, n: int) -> list[int]:
    """transformers' greedy continuation of our prompt ids (an embedding's own ids become image pads), over the
    tokenizer's pieces (the generators sample only those)."""
    ids_t = torch.tensor([[PAD if i >= EMBEDDING_INDEX else i for i in ids]])
    kwargs = {}
    if images:
        out = processor(images=images, return_tensors="pt")
        kwargs = dict(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"],
                      mm_token_type_ids=(ids_t == PAD).int())
    with torch.no_grad():
        # every position attends: the prompt may hold id 0, which generate() would otherwise take for padding
        out = hf.generate(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=n, do_sample=False,
                          min_new_tokens=n,
                          suppress_tokens=list(range(TOKENIZER_VOCAB, VOCAB)), **kwargs)
    return out[0, ids_t.shape[1]:].tolist()


@pytest.fixture(scope="module")
def tokenizer(qwen):
    return ExLlamaV2Tokenizer(ExLlamaV2Config(str(qwen[1])))


def test_dynamic_generator_batch_of_two_images_with_one_alias(qwen, tokenizer, monkeypatch):
    """Two jobs at once, each with its own image under the same alias, then the first again: each continuation is
    transformers', and the page cache (pages of 16 tokens here) reuses pages of the same image only."""
    import exllamav2.generator.dynamic as dynamic

    _, _, hf, processor, model, tower = qwen
    monkeypatch.setattr(dynamic, "PAGE_SIZE", 16)
    cache = ExLlamaV2Cache(model, max_seq_len=512)
    generator = ExLlamaV2DynamicGenerator(model, cache, tokenizer, max_batch_size=4)
    assert generator.page_size == 16
    imgs = [image(11, 112, 84), image(12, 112, 84)]          # the same size: the same ids if the cache mixed them up
    embs = [tower.get_image_embeddings(model, tokenizer, img, text_alias="<image>") for img in imgs]
    prompt = "the cat <image> and the dog"
    ids = [tokenizer.encode(prompt, embeddings=[e], add_bos=True) for e in embs]
    refs = [hf_greedy(hf, processor, i[0].tolist(), [img], 6) for i, img in zip(ids, imgs)]
    assert refs[0] != refs[1]

    def job(i: int, name: str):
        return ExLlamaV2DynamicJob(input_ids=ids[i], max_new_tokens=6, embeddings=[embs[i]], identifier=name,
                                   stop_conditions=[], gen_settings=ExLlamaV2Sampler.Settings.greedy())

    out = run_jobs(generator, [job(0, "a"), job(1, "b")])
    assert out["a"] == refs[0] and out["b"] == refs[1]
    again = run_jobs(generator, [job(1, "b2"), job(0, "a2")])
    assert again["a2"] == refs[0] and again["b2"] == refs[1]
    assert again["a2", "cached"] >= 16 and again["b2", "cached"] >= 16     # whole pages reused, per image


def test_base_and_streaming_generators_with_an_image_and_text_only_prompts(qwen, tokenizer):
    from exllamav2.generator import ExLlamaV2BaseGenerator, ExLlamaV2StreamingGenerator
    from exllamav2.errors import GenerationArgumentError

    _, _, hf, processor, model, tower = qwen
    cache = ExLlamaV2Cache(model, max_seq_len=256)
    generator = ExLlamaV2BaseGenerator(model, cache, tokenizer)
    img = image(21, 84, 84)
    emb = tower.get_image_embeddings(model, tokenizer, img, text_alias="<image>")
    settings = ExLlamaV2Sampler.Settings.greedy()
    for prompt, embeddings, images in (("a <image> b", [emb], [img]), ("the cat and the dog", [], [])):
        ids = tokenizer.encode(prompt, embeddings=embeddings, add_bos=True)
        ref = hf_greedy(hf, processor, ids[0].tolist(), images, 5)
        text = generator.generate_simple(prompt, settings, 5, input_embeddings=embeddings, add_bos=True,
                                         stop_token=None, completion_only=True)
        assert text == tokenizer.decode(torch.tensor(ref))
    ids = tokenizer.encode("a <image> b", embeddings=[emb], add_bos=True)
    ref = hf_greedy(hf, processor, ids[0].tolist(), [img], 6)
    for ngram in (False, True):          # n-gram drafts feed several tokens per forward, past the prompt
        streaming = ExLlamaV2StreamingGenerator(model, cache, tokenizer)
        streaming.speculative_ngram = ngram
        streaming.set_stop_conditions([])
        streaming.begin_stream_ex(ids, settings, input_embeddings=[emb])
        tokens: list[int] = []
        while len(tokens) < 6:
            tokens += streaming.stream_ex()["chunk_token_ids"].view(-1).tolist()
        assert tokens[:6] == ref, ngram
    with pytest.raises(GenerationArgumentError, match="streaming generator"):
        two = tokenizer.encode(["a <image> b", "c <image> d"], embeddings=[emb])
        streaming.begin_stream_ex(two, settings, input_embeddings=[emb])


def test_bad_input_gives_one_clear_error_each(qwen, tokenizer, tmp_path, tiny):
    from exllamav2.errors import InputError

    _, _, _, _, model, tower = qwen
    corrupt = tmp_path / "broken.png"
    good = io.BytesIO()
    image(3, 56, 56).save(good, format="PNG")
    corrupt.write_bytes(good.getvalue()[:60])                 # a PNG cut short
    for bad in (corrupt, b"not an image at all", str(tmp_path / "missing.jpg")):
        with pytest.raises(InputError, match="cannot read the image"):
            tower.get_image_embeddings(model, tokenizer, bad)
    with pytest.raises(InputError, match="aspect ratio"):
        tower.get_image_embeddings(model, tokenizer, image(4, 28 * 210, 28))
    emb = tower.get_image_embeddings(model, tokenizer, image(5, 56, 56), text_alias="<image>")
    ids = tokenizer.encode("the cat <imag> and", embeddings=[emb], add_bos=True)       # misspelt alias
    with pytest.raises(ValueError, match="does not hold the text alias of embedding.*'<image>'"):
        ExLlamaV2DynamicJob(input_ids=ids, max_new_tokens=2, embeddings=[emb])
    text_model = ExLlamaV2(ExLlamaV2Config(str(tiny[0])))
    with pytest.raises(ValueError, match="is not the text model of this qwen2"):
        tower.get_image_embeddings(text_model, tokenizer, image(5, 56, 56))
    with pytest.raises(ValueError, match="LlamaForCausalLM has no vision tower"):
        ExLlamaV2VisionTower(ExLlamaV2Config(str(tiny[0])))


@pytest.mark.parametrize("backend", ["matmul", "sdpa"])
@pytest.mark.parametrize("lengths", [[7], [3, 5, 1, 6]])
def test_block_diagonal_attention_on_each_cpu_backend(backend, lengths):
    """Non-causal attention within each block only, as the vision towers use it, equals attention over each
    block alone."""
    from exllamav2.attn.backends.matmul import MatmulBackend
    from exllamav2.attn.backends.metadata import block_diagonal_metadata
    from exllamav2.attn.backends.sdpa import SdpaBackend

    gen = torch.Generator().manual_seed(0)
    n, heads, dim = sum(lengths), 2, 8
    q, k, v = (torch.randn(1, n, heads, dim, generator=gen) for _ in range(3))
    impl = {"matmul": MatmulBackend, "sdpa": SdpaBackend}[backend]("cpu")
    out = impl.attend(q, k, v, block_diagonal_metadata(lengths), scale=dim ** -0.5)
    start, want = 0, []
    for length in lengths:
        s = slice(start, start + length)
        probs = torch.softmax(torch.einsum("qhd,khd->hqk", q[0, s], k[0, s]) * dim ** -0.5, dim=-1)
        want.append(torch.einsum("hqk,khd->qhd", probs, v[0, s]))
        start += length
    torch.testing.assert_close(out[0], torch.cat(want), atol=1e-5, rtol=1e-5)


def test_exl2_keeps_the_tower_fp16_and_gives_the_same_embeddings(qwen, tmp_path):
    """convert.py quantizes the text model only: every vision tensor is written as it was (FP16), the EXL2 model
    loads with its tower, and the tower gives the same image embeddings."""
    import convert
    from safetensors import safe_open

    family, model_dir, _, _, model, tower = qwen
    out = tmp_path / "exl2"
    assert convert.main(["-i", str(model_dir), "-o", str(tmp_path / "work"), "-cf", str(out), "-b", "4.0",
                         "-r", "4", "-l", "64", "-mr", "4", "-ml", "64"]) == 0
    src = ExLlamaV2Config(str(model_dir)).index
    with safe_open(str(next(out.glob("*.safetensors"))), framework="pt") as f:
        written = set(f.keys())
        vision = sorted(k for k in written if k.startswith(tower.prefix))
        assert vision == sorted(k for k in src.keys() if k.startswith(tower.prefix))
        for key in vision:
            t = f.get_tensor(key)
            assert t.dtype == torch.float16 and torch.equal(t, src.get(key).half()), key
    assert any(k.endswith(".q_weight") for k in written)          # the text model is quantized
    config = ExLlamaV2Config(str(out))
    assert config.vision_model_type == family
    quantized = ExLlamaV2(config)
    quantized.load()
    assert quantized.is_quant()
    exl2_tower = ExLlamaV2VisionTower(config)
    exl2_tower.load()
    img = image(31, 84, 112)
    torch.testing.assert_close(exl2_tower.get_image_embeddings(quantized, None, img).embeddings,
                               tower.get_image_embeddings(model, None, img).embeddings, atol=0, rtol=0)


def test_vision_example_answers_as_transformers(qwen, tmp_path):
    """examples/vision.py --image PATH: the reply is transformers' greedy continuation of the same prompt."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import vision

    _, model_dir, hf, processor, model, tower = qwen
    path = tmp_path / "img.png"
    image(41, 84, 56).save(path)
    args = vision.parse_args(["-m", str(model_dir), "--image", str(path), "--prompt", "the cat",
                              "--max-new-tokens", "5"])
    reply = vision.run(args)
    tokenizer = ExLlamaV2Tokenizer(ExLlamaV2Config(str(model_dir)))
    emb = tower.get_image_embeddings(model, tokenizer, path, text_alias="<image 0>")
    ids = tokenizer.encode(vision.build_prompt(["<image 0>"], "the cat"), encode_special_tokens=True, embeddings=[emb])
    ref = hf_greedy(hf, processor, ids[0].tolist(), [PIL.open(path)], 5)
    assert reply == tokenizer.decode(torch.tensor(ref))


def test_tabbyapi_vision_flow(qwen, tokenizer):
    """TabbyAPI's calls: vision_model_type decides, load_gen(callback_gen=) with progress, keyword
    get_image_embeddings, the alias in the prompt, the async dynamic generator with paged=False (its compatibility
    mode) and embeddings= on the job; the reply is transformers'."""
    import asyncio

    from exllamav2.generator import ExLlamaV2DynamicGeneratorAsync, ExLlamaV2DynamicJobAsync

    _, model_dir, hf, processor, model, _ = qwen
    config = ExLlamaV2Config()
    config.model_dir = str(model_dir)
    config.prepare()
    assert config.vision_model_type
    tower = ExLlamaV2VisionTower(config)
    progress = []

    def callback_gen(i, total):
        progress.append((i, total))
        yield i

    assert list(tower.load_gen(callback_gen=callback_gen)) == [i for i, _ in progress]
    assert progress[0] == (0, progress[-1][1]) and progress[-1][0] == progress[-1][1]
    img = image(51, 56, 84)
    emb = tower.get_image_embeddings(model=model, tokenizer=tokenizer, image=img, text_alias="{{EMBED_x}}")
    ids = tokenizer.encode(f"the cat {emb.text_alias} and the", add_bos=True, embeddings=[emb])
    ref = hf_greedy(hf, processor, ids[0].tolist(), [img], 4)
    cache = ExLlamaV2Cache(model, max_seq_len=256)

    async def run():
        gen = ExLlamaV2DynamicGeneratorAsync(model=model, cache=cache, tokenizer=tokenizer, max_batch_size=1,
                                             paged=False)
        job = ExLlamaV2DynamicJobAsync(gen, input_ids=ids, max_new_tokens=4, gen_settings=ExLlamaV2Sampler.Settings.greedy(),
                                       stop_conditions=[], identifier="req", embeddings=[emb])
        tokens = [t for r in [r async for r in job] if r["stage"] == "streaming" for t in r["token_ids"].view(-1).tolist()]
        await gen.close()
        return tokens

    assert asyncio.run(run()) == ref
    tower.unload()
    with pytest.raises(RuntimeError, match="not loaded"):
        tower.get_image_embeddings(model, tokenizer, img)


def test_older_config_layout_loads(qwen, tmp_path):
    """Checkpoints written by transformers < 4.52: text fields at the top, rope_scaling of type 'mrope', the tower's
    in_chans / spatial_patch_size: the same vision settings and MRoPE sections."""
    from tests.tiny_models import rewrite_checkpoint

    family, model_dir, _, _, model, tower = qwen

    def old_style(cfg: dict) -> None:
        text = cfg.pop("text_config")
        rope = text.pop("rope_parameters")
        cfg.update(text)
        cfg["rope_theta"] = rope["rope_theta"]
        cfg["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
        vc = cfg["vision_config"]
        vc["in_chans"], vc["spatial_patch_size"] = vc.pop("in_channels"), vc.pop("patch_size")
        vc.pop("rope_parameters", None)

    config = ExLlamaV2Config(str(rewrite_checkpoint(model_dir, tmp_path / "old", edit=old_style)))
    assert config.vision_model_type == family and config.mrope_section == [2, 3, 3]
    for name in ("vision_hidden_size", "vision_in_channels", "vision_patch_size", "vision_window_size",
                 "vision_fullatt_block_indexes", "vision_min_pixels", "vision_max_pixels"):
        assert getattr(config, name) == getattr(tower.config, name), name


@pytest.mark.parametrize("backend", ["matmul", "sdpa"])
def test_attend_blocks_equals_the_block_diagonal_mask(backend):
    """The tower's batched blocks (one unmasked call per block length) equal one block-diagonal masked call."""
    from exllamav2.attn.backends.matmul import MatmulBackend
    from exllamav2.attn.backends.metadata import block_diagonal_metadata
    from exllamav2.attn.backends.sdpa import SdpaBackend
    from exllamav2.vlm.tower import attend_blocks

    lengths = [16, 16, 8, 16, 4, 8]
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(sum(lengths), 2, 8, generator=gen) for _ in range(3))
    impl = {"matmul": MatmulBackend, "sdpa": SdpaBackend}[backend]("cpu")
    want = MatmulBackend("cpu").attend(q[None], k[None], v[None], block_diagonal_metadata(lengths), scale=0.3)[0]
    torch.testing.assert_close(attend_blocks(impl, q, k, v, lengths, 0.3), want, atol=1e-5, rtol=1e-5)
