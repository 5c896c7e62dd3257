"""Architectures without a transformers class of their own (remote-code checkpoints: Yi's first release, Orion,
MiniCPM), each tested against a transformers model with the same math whose checkpoint is rewritten into the
architecture's layout: key names, config.json keys and the `architectures` entry. The transformers model's logits
on the same weights are the reference."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import convert
from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from tests.test_model import PROMPT, VOCAB, assert_matches
from tests.tiny_models import build_tiny_model, rewrite_checkpoint, write_tokenizer


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

    check_against(rewrite_checkpoint(src, tmp_path / "yi", rename, architecture="YiForCausalLM"), hf)


def test_orion_is_llama_with_layernorm(tmp_path):
    """Orion: Llama with LayerNorm (weight and bias); transformers' StableLM with full rotary and no QKV bias has
    exactly that math and Orion's key names."""
    spec = ("StableLmConfig", {"partial_rotary_factor": 1.0, "use_qkv_bias": False})
    src, hf = build_tiny_model("orion_ref", tmp_path / "ref", spec=spec)
    check_against(rewrite_checkpoint(src, tmp_path / "orion", architecture="OrionForCausalLM"), hf)


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

    check_against(rewrite_checkpoint(src, tmp_path / "minicpm", edit=config, architecture="MiniCPMForCausalLM"), hf)


def test_internlm2_grouped_wqkv(tiny_model_factory, tmp_path):
    """InternLM2: Llama under other key names, with q, k and v fused into wqkv per kv group (the group's query
    heads, then its key head, then its value head). The tiny Llama (GQA: 4 query heads, 2 kv heads) is packed so."""
    src, hf = tiny_model_factory("llama")
    heads, kv_heads, dim = 4, 2, 16
    group = heads // kv_heads
    names = {"model.embed_tokens": "model.tok_embeddings", "lm_head": "output", ".self_attn.o_proj": ".attention.wo",
             ".mlp.gate_proj": ".feed_forward.w1", ".mlp.up_proj": ".feed_forward.w3",
             ".mlp.down_proj": ".feed_forward.w2", ".input_layernorm": ".attention_norm",
             ".post_attention_layernorm": ".ffn_norm"}
    dst = tmp_path / "internlm2"
    rewrite_checkpoint(src, dst, architecture="InternLM2ForCausalLM")
    path = next(dst.glob("*.safetensors"))
    tensors = load_file(path)
    out = {}
    for key, t in tensors.items():
        if ".self_attn.q_proj." in key:
            layer = key.split(".self_attn.")[0]
            q, k, v = (tensors[f"{layer}.self_attn.{p}_proj.weight"] for p in "qkv")
            packed = torch.cat([q.view(kv_heads, group * dim, -1), k.view(kv_heads, dim, -1),
                                v.view(kv_heads, dim, -1)], dim=1)
            out[f"{layer}.attention.wqkv.weight"] = packed.reshape(-1, q.shape[1]).contiguous()
        elif ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            continue
        else:
            for old, new in names.items():
                key = key.replace(old, new)
            out[key] = t
    save_file(out, path)
    check_against(dst, hf)
    check_exl2_round_trip(dst, tmp_path)


def check_exl2_round_trip(model_dir: Path, tmp_path: Path) -> None:
    """convert.py at 8.0 bpw: the fused tensor is split into quantized layers that load and track the FP16 model."""
    write_tokenizer(model_dir)
    out = tmp_path / "exl2"
    assert convert.main(["-i", str(model_dir), "-o", str(tmp_path / "work"), "-cf", str(out), "-b", "8.0",
                         "-r", "4", "-l", "64"]) == 0
    ids = torch.randint(3, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(22))
    ref, q8 = (_loaded(d).forward(ids)[..., :VOCAB] for d in (model_dir, out))
    assert _loaded(out).is_quant()
    assert (q8 - ref).abs().max().item() < 0.06 * (ref.max() - ref.min()).item()


def _loaded(model_dir: Path) -> ExLlamaV2:
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    model.load()
    return model
