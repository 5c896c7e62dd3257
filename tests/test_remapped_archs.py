"""Architectures without a transformers class of their own (remote-code checkpoints: Yi's first release, Orion,
MiniCPM), each tested against a transformers model with the same math whose checkpoint is rewritten into the
architecture's layout: key names, config.json keys and the `architectures` entry. The transformers model's logits
on the same weights are the reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from tests.test_model import PROMPT, VOCAB, assert_matches
from tests.tiny_models import build_tiny_model


def rewrite(src: Path, dst: Path, arch: str, rename=lambda k: k, config=lambda c: None) -> Path:
    shutil.copytree(src, dst)
    for path in dst.glob("*.safetensors"):
        save_file({rename(k): v.contiguous() for k, v in load_file(path).items()}, path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = [arch]
    config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def check_against(model_dir: Path, hf) -> None:
    """Full prompt and prefill-then-decode against the reference."""
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    model.load()
    ids = torch.randint(3, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(21))
    cache = ExLlamaV2Cache(model, max_seq_len=64)
    stepped = torch.cat([model.forward(ids[:, :10], cache), *(model.forward(ids[:, i : i + 1], cache)
                                                              for i in range(10, PROMPT))], dim=1)
    with torch.no_grad():
        ref = hf(ids).logits
    assert_matches(model.forward(ids), ref)
    assert_matches(stepped, ref)


def test_yi_norm_names(tiny_model_factory, tmp_path):
    """Yi's first checkpoints: Llama with the norms named ln1 / ln2."""
    src, hf = tiny_model_factory("llama")
    names = {"input_layernorm": "ln1", "post_attention_layernorm": "ln2"}

    def rename(key: str) -> str:
        for old, new in names.items():
            key = key.replace(f".{old}.", f".{new}.")
        return key

    check_against(rewrite(src, tmp_path / "yi", "YiForCausalLM", rename), hf)


def test_orion_is_llama_with_layernorm(tmp_path):
    """Orion: Llama with LayerNorm (weight and bias); transformers' StableLM with full rotary and no QKV bias has
    exactly that math and Orion's key names."""
    spec = ("StableLmConfig", {"partial_rotary_factor": 1.0, "use_qkv_bias": False})
    src, hf = build_tiny_model("orion_ref", tmp_path / "ref", spec=spec)
    check_against(rewrite(src, tmp_path / "orion", "OrionForCausalLM"), hf)


def test_minicpm_scales(tmp_path):
    """MiniCPM: embeddings times scale_emb, each residual branch times scale_depth / sqrt(layers), logits of the
    hidden state divided by hidden_size / dim_model_base; transformers' Granite with the equivalent multipliers
    (and attention_multiplier = head_dim ** -0.5) is the reference."""
    scale_emb, scale_depth, dim_model_base, layers, hidden = 4.0, 1.4, 16, 2, 64
    spec = ("GraniteConfig", {"embedding_multiplier": scale_emb, "residual_multiplier": scale_depth / layers**0.5,
                              "logits_scaling": hidden / dim_model_base, "attention_multiplier": 16 ** -0.5})
    src, hf = build_tiny_model("minicpm_ref", tmp_path / "ref", spec=spec)

    def config(cfg: dict) -> None:
        for key in ("embedding_multiplier", "residual_multiplier", "logits_scaling", "attention_multiplier"):
            del cfg[key]
        cfg.update(scale_emb=scale_emb, scale_depth=scale_depth, dim_model_base=dim_model_base)

    check_against(rewrite(src, tmp_path / "minicpm", "MiniCPMForCausalLM", config=config), hf)
