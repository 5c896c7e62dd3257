"""Llama 4's text model (Llama4ForCausalLM, and the text model of Llama4ForConditionalGeneration) against
transformers fp32 eager. The tiny spec (tests/tiny_models.py MOE_SPECS["llama4"]) runs test_model.py's checks and
the MoE checks of tests/test_moe.py (EXL2 4.0/8.0 bpw through convert.py, the dynamic generator); here: what is
Llama 4's own: each of its attention terms changes the output (so matching transformers means something), top-2,
the multimodal checkpoint, both expert layouts, and the config.json forms and refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from exllamav2.errors import ConfigError
from exllamav2.model.attention import ExLlamaV2Attention
from tests.test_model import assert_matches
from tests.tiny_models import MOE_SPECS, build_tiny_model, rewrite_checkpoint

VOCAB = 250
PROMPT = 24             # three chunks of 8 on the RoPE layers; the NoPE layers' temperature steps every 4

_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
               patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
MULTIMODAL = ("Llama4Config", {**MOE_SPECS["llama4"][1], "model_type": "llama4_text"},
              {"vision_config": _VISION, "image_token_index": 249, "boi_token_index": 247, "eoi_token_index": 248})


def load(model_dir) -> ExLlamaV2:
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    model.load()
    return model


def ids(n: int = PROMPT, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _without_temperature(hf):
    for layer in hf.model.layers:
        layer.self_attn.attn_temperature_tuning = False


def _without_chunks(hf):
    hf.config.layer_types = ["full_attention"] * hf.config.num_hidden_layers


def _without_qk_norm(hf):
    for layer in hf.model.layers:
        if hasattr(layer.self_attn, "qk_norm"):
            del layer.self_attn.qk_norm


@pytest.mark.parametrize("remove", [_without_temperature, _without_chunks, _without_qk_norm])
def test_each_attention_term_changes_the_output(remove, tiny_model_factory):
    """transformers without one of Llama 4's attention terms gives other logits on the test prompt: the chunks cut,
    the temperature is not 1 within it and the q/k norm matters, so matching transformers tests each of them."""
    _, hf = tiny_model_factory("llama4")
    with torch.no_grad():
        ref = hf(ids()).logits
        changed = copy.deepcopy(hf)
        remove(changed)
        assert (changed(ids()).logits - ref).abs().max() > 0.1


def test_layers_get_their_terms(tiny_model_factory):
    """RoPE layers (0, 1): interleaved-pair rotation, chunks of 8, the weightless q/k norm; NoPE layers (2, 3): the
    temperature (floor_scale 4, attn_scale 0.5), no chunks; the plan knows the model needs chunked attention."""
    model = load(tiny_model_factory("llama4")[0])
    attn = [m for m in model.modules if isinstance(m, ExLlamaV2Attention)]
    assert [a.chunk for a in attn] == [8, 8, 0, 0]
    assert [a.qk_l2_eps is not None for a in attn] == [True, True, False, False]
    assert [a.temperature for a in attn] == [None, None, (4.0, 0.5), (4.0, 0.5)]
    assert [a.rope_style.name for a in attn] == ["GPTJ", "GPTJ", "NONE", "NONE"]
    assert model.attn_plan.needs.attention_chunk == 8
    cfg = model.config
    assert (cfg.intermediate_size, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size) == (96, 48, 48)


def test_top2_matches_transformers(tmp_path):
    """Two experts per token (sigmoid weights on each expert's input, summed with the shared expert): the full
    prompt, and a prefill then token-by-token decode through the cache."""
    spec = ("Llama4TextConfig", {**MOE_SPECS["llama4"][1], "num_experts_per_tok": 2})
    model_dir, hf = build_tiny_model("llama4_top2", tmp_path, spec=spec)
    model = load(model_dir)
    prompt = ids(seed=5)
    with torch.no_grad():
        ref = hf(prompt).logits
    assert_matches(model.forward(prompt), ref)
    cache = ExLlamaV2Cache(model, max_seq_len=64)
    parts = [model.forward(prompt[:, :10], cache)] + [model.forward(prompt[:, i : i + 1], cache)
                                                      for i in range(10, PROMPT)]
    assert_matches(torch.cat(parts, dim=1), ref)


def test_multimodal_checkpoint_runs_its_text_model(tmp_path, caplog):
    """Llama4ForConditionalGeneration: the text model under language_model., the vision model and projector
    accounted for and not read."""
    model_dir, hf = build_tiny_model("llama4_mm", tmp_path, spec=MULTIMODAL)
    assert any(k.startswith("vision_model.") for k in load_file(next(model_dir.glob("*.safetensors"))))
    with caplog.at_level("INFO"):
        model = load(model_dir)
    assert "vision tower and projector tensors" in caplog.text
    assert model.config.arch.name == "Llama4ForConditionalGeneration"
    prompt = ids(seed=7)
    with torch.no_grad():
        assert_matches(model.forward(prompt), hf(prompt).logits)


def _per_expert(tensors: dict[str, torch.Tensor], inter: int) -> dict[str, torch.Tensor]:
    """The stacked (in, out) experts as one (out, in) linear per expert and projection."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("experts.gate_up_proj"):
            base = name.removesuffix("gate_up_proj")
            for e in range(t.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = t[e, :, :inter].T.contiguous()
                out[f"{base}{e}.up_proj.weight"] = t[e, :, inter:].T.contiguous()
        elif name.endswith("experts.down_proj"):
            base = name.removesuffix("down_proj")
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = t[e].T.contiguous()
        else:
            out[name] = t
    return out


def test_per_expert_layout_gives_identical_logits(tiny_model_factory, tmp_path):
    """Experts stored one linear each (feed_forward.experts.<n>.gate_proj ...) load to bit-identical logits."""
    src, _ = tiny_model_factory("llama4")
    dst = rewrite_checkpoint(src, tmp_path / "per_expert")
    path = next(dst.glob("*.safetensors"))
    save_file(_per_expert(load_file(path), 48), path)
    prompt = ids(seed=9)
    assert torch.equal(load(src).forward(prompt), load(dst).forward(prompt))


def _config(src, tmp_path, **changes) -> ExLlamaV2Config:
    def edit(cfg):
        for key, value in changes.items():
            if value is ...:
                cfg.pop(key, None)
            else:
                cfg[key] = value
    return ExLlamaV2Config(str(rewrite_checkpoint(src, tmp_path / "m", edit=edit)))


@pytest.mark.parametrize("changes,rope,chunked,chunk", [
    # Llama 4's released configs write no_rope_layers [] for "every no_rope_layer_interval-th layer has no RoPE"
    ({"no_rope_layers": [], "no_rope_layer_interval": 2, "layer_types": ...}, [1, 0, 1, 0], [1, 0, 1, 0], 8),
    ({"no_rope_layers": [], "no_rope_layer_interval": ..., "layer_types": ...}, [1, 1, 1, 0], [1, 1, 1, 0], 8),
    # without attention_chunk_size transformers chunks at 8192; null means no chunks
    ({"attention_chunk_size": ..., "layer_types": ...}, [1, 1, 0, 0], [1, 1, 0, 0], 8192),
    ({"attention_chunk_size": None, "layer_types": ...}, [1, 1, 0, 0], [0, 0, 0, 0], 0),
])
def test_config_forms(changes, rope, chunked, chunk, tiny_model_factory, tmp_path):
    cfg = _config(tiny_model_factory("llama4")[0], tmp_path, **changes)
    assert cfg.rope_layers == [bool(r) for r in rope]
    assert cfg.chunked_layers == [bool(c) for c in chunked]
    assert cfg.attention_chunk_size == chunk


def test_temperature_and_qk_norm_switches(tiny_model_factory, tmp_path):
    src = tiny_model_factory("llama4")[0]
    assert ExLlamaV2Config(str(src)).attn_temperature == (4.0, 0.5) and ExLlamaV2Config(str(src)).qk_l2_norm
    cfg = _config(src, tmp_path, attn_temperature_tuning=False, use_qk_norm=False)
    assert cfg.attn_temperature is None and not cfg.qk_l2_norm


@pytest.mark.parametrize("changes,match", [
    ({"layer_types": ["chunked_attention", "linear_attention", "full_attention", "full_attention"]},
     "layer_types"),
    ({"attention_chunk_size": None}, "attention_chunk_size"),           # chunked_attention layers with no chunk
    ({"moe_layers": [1, 4]}, "moe_layers"),
    ({"floor_scale": 0}, "floor_scale"),
])
def test_config_refusals(changes, match, tiny_model_factory, tmp_path):
    with pytest.raises(ConfigError, match=match):
        _config(tiny_model_factory("llama4")[0], tmp_path, **changes)


def test_raw_config_without_transformers_defaults(tiny_model_factory, tmp_path):
    """A config.json written by hand, with only what differs from Llama4TextConfig's defaults, reads as
    transformers reads it (rope_theta 500000, chunks of 8192, temperature and q/k norm on)."""
    drop = ("rope_parameters", "attention_chunk_size", "layer_types", "attn_temperature_tuning", "floor_scale",
            "attn_scale", "use_qk_norm")
    cfg = _config(tiny_model_factory("llama4")[0], tmp_path, **{k: ... for k in drop})
    assert cfg.rotary_embedding_base == 500000.0 and cfg.attention_chunk_size == 8192
    assert cfg.attn_temperature == (8192.0, 0.1) and cfg.qk_l2_norm


def test_moe_layers_from_the_interleave_step(tiny_model_factory, tmp_path):
    cfg = _config(tiny_model_factory("llama4")[0], tmp_path, moe_layers=..., interleave_moe_layer_step=2)
    assert cfg.moe_layers == [False, True, False, True]
