"""Tiny random models of each supported architecture, made with transformers, and the small BPE tokenizer
the text-level tests give them (write_tokenizer).

Each spec is small enough to build and run in well under a second on a CPU, yet exercises the
architecture's distinct parts (GQA, biases, fused projections, softcaps, sliding windows, rope scaling).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import transformers

from tests.tokenizer_fixtures import corpus

_COMMON = dict(
    vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

# local and global layers, each with its own RoPE (the global one linearly scaled), windows of 8
_GEMMA3 = {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8, "num_hidden_layers": 3,
           "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
           "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                               "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}}


def _vision(**kw) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, **kw)


ARCH_SPECS: dict[str, tuple] = {
    "llama": ("LlamaConfig", {}),
    "llama_mha": ("LlamaConfig", {"num_key_value_heads": 4, "attention_bias": True}),
    "llama3_rope": ("LlamaConfig", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    "llama_linear_rope": ("LlamaConfig", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
    "llama_yarn": ("LlamaConfig", {"rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}}),
    "mistral": ("MistralConfig", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", {}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
                                "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0}),
    "phi3": ("Phi3Config", {}),
    # 128k Phi-3 / Phi-3.5 / Phi-4-mini: LongRoPE, short factors up to 64 positions, long ones beyond
    "phi3_longrope": ("Phi3Config", {"original_max_position_embeddings": 64, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.1 * i for i in range(8)],
        "long_factor": [1.0 + 0.7 * i for i in range(8)], "original_max_position_embeddings": 64}}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", _GEMMA3),
    "granite": ("GraniteConfig", {"embedding_multiplier": 3.0, "residual_multiplier": 0.5,
                                  "attention_multiplier": 0.1, "logits_scaling": 2.0}),
    "smollm3": ("SmolLM3Config", {"no_rope_layers": [1, 0]}),
    "olmo2": ("Olmo2Config", {}),
    # hybrid: sliding layers with RoPE, a global layer without
    "exaone4": ("Exaone4Config", {"head_dim": 16, "sliding_window": 8, "num_hidden_layers": 3,
                                  "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]}),
    "starcoder2": ("Starcoder2Config", {"sliding_window": 8}),
    "cohere": ("CohereConfig", {"logit_scale": 0.5}),
    "cohere2": ("Cohere2Config", {"logit_scale": 0.5, "sliding_window": 8, "num_hidden_layers": 3,
                                  "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]}),
    "phi": ("PhiConfig", {"partial_rotary_factor": 0.5}),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}),
    "gpt_bigcode": ("GPTBigCodeConfig", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256,
                                         "multi_query": True}),
    "stablelm": ("StableLmConfig", {"partial_rotary_factor": 0.25, "use_qkv_bias": True}),
    "glm": ("GlmConfig", {"head_dim": 16, "attention_bias": True}),
    "glm4": ("Glm4Config", {"head_dim": 16, "attention_bias": True}),
    # multimodal checkpoints, run as text models: (config class, text_config overrides, top-level keys)
    "gemma3_mm": ("Gemma3Config", {**_GEMMA3, "model_type": "gemma3_text"}, {
        "vision_config": _vision(image_size=28, patch_size=14), "mm_tokens_per_image": 4,
        "image_token_index": 255, "boi_token_index": 253, "eoi_token_index": 254}),
    "mistral3_mm": ("Mistral3Config", {"model_type": "mistral", "head_dim": 16, "sliding_window": 8}, {
        "vision_config": _vision(model_type="pixtral", image_size=28, patch_size=14, head_dim=16),
        "image_token_index": 255}),
    "llava": ("LlavaConfig", {"model_type": "llama"}, {
        "vision_config": _vision(model_type="clip_vision_model", image_size=28, patch_size=14),
        "image_token_index": 255}),
    "qwen2vl": ("Qwen2VLConfig", {"head_dim": 16, "rope_parameters": {
        "rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}}, {
        "vision_config": {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2},
        "image_token_id": 255, "video_token_id": 254, "vision_start_token_id": 253}),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", {"head_dim": 16, "rope_parameters": {
        "rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}}, {
        "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                          "out_hidden_size": 64, "fullatt_block_indexes": [0]},
        "image_token_id": 255, "video_token_id": 254, "vision_start_token_id": 253}),
}

# Mixtures of experts: 4 experts, top-2 (Qwen3-MoE: a dense layer among sparse ones; Qwen2-MoE: the shared expert
# and its gate; Granite-MoE: stacked experts and Granite's multipliers). Kept apart from ARCH_SPECS: the shared
# EXL2 and kernel tests hold a model to dense tolerances, which a near-tie in a router breaks legitimately (a
# perturbed hidden state flips the top-k, a discontinuity); tests/test_moe.py runs the same checks routing-aware.
MOE_SPECS: dict[str, tuple] = {
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 48, "norm_topk_prob": True, "num_hidden_layers": 3,
                                     "mlp_only_layers": [1]}),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                                     "shared_expert_intermediate_size": 96}),
    "granitemoe": ("GraniteMoeConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "embedding_multiplier": 3.0,
                                        "residual_multiplier": 0.5, "attention_multiplier": 0.1, "logits_scaling": 2.0}),
    "olmoe": ("OlmoeConfig", {"num_experts": 4, "num_experts_per_tok": 2}),
    # Llama 4, top-1: dense (intermediate_size_mlp) and MoE layers interleaved, stacked (in, out) experts, a shared
    # expert; RoPE layers (interleaved pairs, llama3 scaling, weightless q/k norm) with attention chunks of 8
    # positions, NoPE layers with a temperature that changes every 4 positions
    "llama4": ("Llama4TextConfig", {
        "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 1, "intermediate_size": 48,
        "intermediate_size_mlp": 96, "num_hidden_layers": 4, "interleave_moe_layer_step": 2,
        "no_rope_layers": [1, 1, 0, 0], "attention_chunk_size": 8, "floor_scale": 4, "attn_scale": 0.5,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    # fused Wqkv with clip_qkv, bias-free LayerNorm, experts as three flat tensors (down stored transposed)
    "dbrx": ("DbrxConfig", {"d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 256,
                            "attn_config": {"kv_n_heads": 2, "clip_qkv": 2.0, "rope_theta": 10000.0},
                            "ffn_config": {"ffn_hidden_size": 48, "moe_num_experts": 4, "moe_top_k": 2}}),
}


def _build(spec: tuple) -> torch.nn.Module:
    """(config class, overrides) makes a causal LM; (config class, text overrides, top-level keys) a
    multimodal model whose text_config gets the overrides."""
    cls = getattr(transformers, spec[0])
    if len(spec) == 2:
        config = cls(**{**_COMMON, **spec[1]})
        return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    config = cls(text_config={**_COMMON, **spec[1]}, **spec[2])
    return transformers.AutoModelForImageTextToText.from_config(config, attn_implementation="eager")


def build_tiny_model(arch: str, out_dir: Path, seed: int = 0, spec: tuple | None = None) -> tuple[Path, torch.nn.Module]:
    """The tiny model ARCH_SPECS[arch] or MOE_SPECS[arch] (or `spec`: a transformers config class name and its
    overrides)."""
    torch.manual_seed(seed)
    model = _build(spec or ARCH_SPECS.get(arch) or MOE_SPECS[arch])
    # norms start at exactly 1 (or 0 for Gemma's offset form); randomise them so they matter
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):     # transformers starts biases at 0
                p.add_(torch.randn_like(p) * 0.1)
        for p in model.parameters():                 # fp16-representable weights, fp32 reference math
            p.copy_(p.half().float())
    model.eval()
    # save an fp16 copy; the reference keeps fp32 buffers (RoPE inverse frequencies)
    copy.deepcopy(model).half().save_pretrained(out_dir, safe_serialization=True)
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["architectures"], "transformers did not record the architecture"
    return out_dir, model


def write_tokenizer(model_dir: Path) -> None:
    """A SentencePiece-style BPE with exactly the tiny model's 250 ids: <unk> <s> </s>, then pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=250, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=70,
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    assert tok.get_vocab_size() == 250
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )


def native_multimodal_key(key: str) -> str:
    """A Llava-style checkpoint key in transformers >= 4.52's own layout: the base model under
    model.language_model., the tower and projector under model., lm_head at the top."""
    for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head", "lm_head"),
                     ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def rewrite_checkpoint(src: Path, dst: Path, rename=lambda key: key, edit=lambda cfg: None,
                       architecture: str | None = None) -> Path:
    """A copy of the model directory `src` at `dst` with its tensors renamed by `rename`, config.json changed in
    place by `edit` and, if given, its `architectures` entry replaced (a checkpoint in another layout)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for path in dst.glob("*.safetensors"):
        save_file({rename(k): v.contiguous() for k, v in load_file(path).items()}, path)
    cfg = json.loads((dst / "config.json").read_text())
    if architecture:
        cfg["architectures"] = [architecture]
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst
