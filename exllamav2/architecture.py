"""Architecture table: how each HuggingFace architecture differs from Llama, as data rows.

A row names the checkpoint keys and the few switches the model builder reads; there is no
per-architecture code path. An architecture missing from the table is refused (upstream loaded it as
Llama, which gives fluent garbage for Qwen3, Gemma, Granite and others); the user may opt in to that.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Callable

from .errors import ArchitectureError

log = logging.getLogger(__name__)


class RopeStyle(Enum):
    NONE = 0
    GPTJ = 1   # rotate interleaved pairs (x0, x1), (x2, x3), ...
    NEOX = 2   # rotate halves (x[:d/2], x[d/2:])


@dataclass(frozen=True)
class MoESpec:
    """A mixture-of-experts MLP's layout and routing (exllamav2/moe.py). Keys are relative to the decoder layer
    (block, stacked, alt_routers) or to the block (router, experts, shared_expert, shared_gate)."""
    block: str = "mlp"                    # the sparse block under <layer> (Mixtral: block_sparse_moe)
    router: str = "gate"                  # the router linear under the block, [experts, hidden], kept FP16
    alt_routers: tuple = ()               # the router under <layer> in other layouts (transformers 5's mlp.gate)
    experts: str = "experts"              # per-expert keys: <block>.<experts>.<n>.<gate|up|down>
    expert_keys: tuple = ("gate_proj", "up_proj", "down_proj")
    # stacked layouts under <layer>: (gate_up, down) tensors [experts, 2 x inter (gate rows first), hidden] and
    # [experts, hidden, inter]; transformers 5 writes these with save_original_format=False
    stacked: tuple = (("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),)
    # stacked layouts of three tensors under <layer>: (gate, up, down), each [experts x rows, in] or
    # [experts, rows, in]; DBRX stores down as [experts x inter, hidden], i.e. (in, out) per expert
    stacked_glu: tuple = ()
    stacked_down_transposed: bool = False
    # the stacked tensors store (in, out) per expert: gate_up [experts, hidden, 2 x inter] (gate columns first),
    # down [experts, inter, hidden] (Llama 4)
    stacked_transposed: bool = False
    # "softmax_topk": softmax over all experts, then top-k; "topk_softmax": softmax over the top-k logits;
    # "topk_sigmoid": sigmoid of each of the top-k logits (Llama 4)
    scoring: str = "softmax_topk"
    renormalize: bool | None = None       # top-k weights renormalised to sum 1; None: config.json's norm_topk_prob
    # the routing weight scales each expert's input instead of its output (Llama 4: not the same, the expert is
    # not linear)
    weight_inputs: bool = False
    shared_expert: str | None = None      # a dense expert every token runs (Qwen2-MoE), under the block
    shared_gate: str | None = None        # its sigmoid gate, [1, hidden], under the block


@dataclass(frozen=True)
class ArchParams:
    name: str = "LlamaForCausalLM"
    norm: str = "rmsnorm"                 # or "layernorm"
    norm_weight_offset: float = 0.0       # Gemma stores (weight - 1)
    activation_key: str = "hidden_act"    # config.json key naming the MLP activation
    rope_style: RopeStyle = RopeStyle.NEOX
    fused_qkv: str | None = None          # checkpoint key of a fused q/k/v projection
    fused_gate_up: str | None = None      # checkpoint key of a fused gate/up projection
    embed_scale_sqrt_hidden: bool = False
    # Norms of q and k before RoPE (self_attn.q_norm/k_norm): None, "head" (over each head: Qwen3, Gemma 3) or
    # "full" (over the whole projection: Olmo 2)
    qk_norm: str | None = None
    # config.json's use_qk_norm means a weightless RMS norm of each q and k head after RoPE, on the layers that
    # rotate (Llama 4); elsewhere (Cohere) it names parts this row would have to refuse
    qk_l2_norm: bool = False
    # Norm keys inside a decoder layer; None where the architecture has none (Olmo 2 has only post-norms)
    attn_norm: str | None = "input_layernorm"
    mlp_norm: str | None = "post_attention_layernorm"
    post_attn_norm: str | None = None
    post_mlp_norm: str | None = None
    alternating_swa: bool = False         # even layers sliding, odd global (when layer_types absent)
    global_nope: bool = False             # with a sliding window, the global layers have no RoPE (Exaone 4)
    # values of config.json keys read generically, where config.json lacks the key: the family's transformers
    # config defaults where they differ from the generic ones (Llama 4 chunks attention at 8192 tokens unless
    # told otherwise); a key present with null is not defaulted
    config_defaults: dict = field(default_factory=dict)
    # MLP projection keys under <layer>.mlp: gate, up, down (gated) or in, out (plain: down(act(in(x))))
    mlp_keys: tuple = ("gate_proj", "up_proj", "down_proj")
    attn_key: str = "self_attn"           # the attention's projections are under <layer>.<attn_key>
    mlp_key: str = "mlp"                  # the MLP's projections are under <layer>.<mlp_key>
    qkv_grouped: bool = False             # fused_qkv holds each kv group's q heads, k head, v head in turn
    o_proj_key: str = "o_proj"            # the attention's output projection under <layer>.<attn_key>
    transposed_weights: bool = False      # layers store (in, out) weights (GPT-2's Conv1D)
    default_intermediate_mult: int | None = None   # intermediate size as a multiple of hidden when absent
    kv_heads_key: str | None = "num_key_value_heads"   # None: the family decides (multi_query or MHA)
    # x + attn(norm(x)) + mlp(norm(x)) with one norm (attn_norm), as Cohere and Phi-2; else sequential
    parallel_block: bool = False
    refuse_if: tuple = ()                 # config.json switches of this family whose parts are not built
    default_tie_word_embeddings: bool = False
    keys: dict = field(default_factory=lambda: dict(_CAUSAL_LM_KEYS))
    alt_keys: tuple = ()                  # other key layouts a checkpoint of this architecture may use
    # Key prefixes of a multimodal checkpoint's vision tower and projector: accounted for at load, not read
    # by the text model
    vision_prefixes: tuple = ()
    # how an image's tokens (a run of embedding ids) attend in the text model: "causal" like text, or
    # "bidirectional": each sees every token of its image as well (Gemma 3's token_type_ids mask)
    image_attention: str = "causal"
    moe: MoESpec | None = None            # the sparse MLP's layout; None for a dense model

    def with_keys_for(self, has: Callable[[str], bool]) -> "ArchParams":
        """This row with the key layout the checkpoint uses (the first whose embedding is present)."""
        for keys in (self.keys, *self.alt_keys):
            if has(f"{keys['embed']}.weight"):
                return replace(self, keys=keys)
        return self


_CAUSAL_LM_KEYS = {"embed": "model.embed_tokens", "layers": "model.layers", "norm": "model.norm", "head": "lm_head"}
# A multimodal checkpoint's text model: transformers < 4.52 nested the causal LM under language_model.,
# later versions nest the base model under model.language_model. and keep lm_head at the top.
_NESTED_LM_KEYS = {"embed": "language_model.model.embed_tokens", "layers": "language_model.model.layers",
                   "norm": "language_model.model.norm", "head": "language_model.lm_head"}
_NESTED_BASE_KEYS = {"embed": "model.language_model.embed_tokens", "layers": "model.language_model.layers",
                     "norm": "model.language_model.norm", "head": "lm_head"}


_LLAMA = ArchParams()
# Gemma's family: norms store (weight - 1), GELU-tanh MLP, embedding scaled by sqrt(hidden), tied head
_GEMMA = replace(_LLAMA, name="GemmaForCausalLM", norm_weight_offset=1.0, embed_scale_sqrt_hidden=True,
                 default_tie_word_embeddings=True)
_GEMMA2 = replace(_GEMMA, name="Gemma2ForCausalLM", activation_key="hidden_activation",
                  mlp_norm="pre_feedforward_layernorm", post_attn_norm="post_attention_layernorm",
                  post_mlp_norm="post_feedforward_layernorm", alternating_swa=True)
# Olmo 2: norms after attention and MLP instead of before, q/k norms over the whole projection
_OLMO2 = replace(_LLAMA, name="Olmo2ForCausalLM", qk_norm="full", attn_norm=None, mlp_norm=None,
                 post_attn_norm="post_attention_layernorm", post_mlp_norm="post_feedforward_layernorm")

# Cohere: LayerNorm without bias, interleaved (GPT-J) RoPE, attention and MLP in parallel, tied head
_COHERE = replace(_LLAMA, name="CohereForCausalLM", norm="layernorm", rope_style=RopeStyle.GPTJ,
                  parallel_block=True, mlp_norm=None, default_tie_word_embeddings=True, refuse_if=("use_qk_norm",))
# Phi-2: parallel block, LayerNorm with bias, plain fc1/fc2 MLP, partial rotary, biased head
_PHI = replace(_LLAMA, name="PhiForCausalLM", norm="layernorm", parallel_block=True, mlp_norm=None,
               mlp_keys=("fc1", "fc2"), o_proj_key="dense", refuse_if=("qk_layernorm",),
               keys={**_CAUSAL_LM_KEYS, "norm": "model.final_layernorm"})

# GPT-2 and GPTBigCode: learned positions (keys["pos_embed"]), no RoPE, LayerNorm with bias, fused c_attn,
# plain c_fc/c_proj MLP (4 x hidden unless n_inner says), biases, tied head; GPT-2 stores its weights transposed
_GPT_KEYS = {"embed": "transformer.wte", "pos_embed": "transformer.wpe", "layers": "transformer.h",
             "norm": "transformer.ln_f", "head": "lm_head"}
_GPT_BIGCODE = replace(_LLAMA, name="GPTBigCodeForCausalLM", norm="layernorm", rope_style=RopeStyle.NONE,
                       activation_key="activation_function", fused_qkv="c_attn", attn_key="attn", o_proj_key="c_proj",
                       attn_norm="ln_1", mlp_norm="ln_2", mlp_keys=("c_fc", "c_proj"), default_intermediate_mult=4,
                       default_tie_word_embeddings=True, keys=_GPT_KEYS, kv_heads_key=None,
                       refuse_if=("scale_attn_by_inverse_layer_idx",))

# GLM: interleaved partial RoPE, fused gate_up_proj (GLM-4 adds norms after attention and MLP)
_GLM = replace(_LLAMA, name="GlmForCausalLM", rope_style=RopeStyle.GPTJ, fused_gate_up="gate_up_proj")

# Mixtures of experts (exllamav2/moe.py): which layers are sparse and the sizes come from config.json
_MIXTRAL = replace(_LLAMA, name="MixtralForCausalLM", moe=MoESpec(
    block="block_sparse_moe", alt_routers=("mlp.gate",), expert_keys=("w1", "w3", "w2"), renormalize=True))
_QWEN_MOE = MoESpec()
# Granite-MoE stores its experts stacked: input_linear [experts, 2 x inter, hidden] (gate rows first), output_linear
_GRANITE_MOE = MoESpec(block="block_sparse_moe", router="router.layer", alt_routers=("block_sparse_moe.router",),
                       stacked=(("block_sparse_moe.input_linear.weight", "block_sparse_moe.output_linear.weight"),
                                ("block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.experts.down_proj")),
                       scoring="topk_softmax")
_MOE_ROWS = (
    _MIXTRAL,
    replace(_LLAMA, name="Qwen3MoeForCausalLM", qk_norm="head", moe=_QWEN_MOE),
    replace(_LLAMA, name="Qwen2MoeForCausalLM",
            moe=replace(_QWEN_MOE, shared_expert="shared_expert", shared_gate="shared_expert_gate")),
    replace(_LLAMA, name="GraniteMoeForCausalLM", moe=_GRANITE_MOE),
    replace(_LLAMA, name="OlmoeForCausalLM", qk_norm="full", moe=_QWEN_MOE),
)

# Llama 4: MoE layers (router, experts, shared expert under feed_forward) among dense ones (feed_forward's own
# gate/up/down, intermediate_size_mlp); sigmoid of the top-k logits scales the experts' inputs; experts stacked
# (in, out). Its attention (chunked local layers with RoPE, NoPE layers with temperature tuning, use_qk_norm) is
# read from config.json generically.
_LLAMA4_MOE = MoESpec(block="feed_forward", router="router", stacked=(
    ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"),), stacked_transposed=True,
    scoring="topk_sigmoid", renormalize=False, weight_inputs=True, shared_expert="shared_expert")
_LLAMA4 = replace(_LLAMA, name="Llama4ForCausalLM", rope_style=RopeStyle.GPTJ, mlp_key="feed_forward",
                  qk_l2_norm=True, moe=_LLAMA4_MOE, config_defaults={
                      "attention_chunk_size": 8192, "attn_temperature_tuning": True, "floor_scale": 8192,
                      "attn_scale": 0.1, "use_qk_norm": True, "no_rope_layer_interval": 4, "rope_theta": 500000.0,
                      "head_dim": 128, "max_position_embeddings": 131072})

# DBRX: fused Wqkv (clip_qkv read generically), LayerNorm without bias, experts stored as three flat tensors
_DBRX_MOE = MoESpec(block="ffn", router="router.layer", experts="experts.mlp", expert_keys=("w1", "v1", "w2"),
                    stacked=(), stacked_glu=(("ffn.experts.mlp.w1", "ffn.experts.mlp.v1", "ffn.experts.mlp.w2"),),
                    stacked_down_transposed=True)
_DBRX = replace(_LLAMA, name="DbrxForCausalLM", norm="layernorm", attn_key="norm_attn_norm.attn", fused_qkv="Wqkv",
                o_proj_key="out_proj", attn_norm="norm_attn_norm.norm_1", mlp_norm="norm_attn_norm.norm_2",
                kv_heads_key="kv_n_heads", activation_key="ffn_act_fn", moe=_DBRX_MOE,
                keys={"embed": "transformer.wte", "layers": "transformer.blocks", "norm": "transformer.norm_f",
                      "head": "lm_head"})

# Rows that differ from Llama only in config.json values (multipliers, no-RoPE layers, windows) are
# Llama's row under their own name: those values are read generically by ExLlamaV2Config.
ARCHITECTURES: dict[str, ArchParams] = {a.name: a for a in (
    _LLAMA,
    *_MOE_ROWS,
    replace(_LLAMA, name="MistralForCausalLM"),
    replace(_LLAMA, name="Qwen2ForCausalLM"),
    replace(_LLAMA, name="Qwen3ForCausalLM", qk_norm="head"),
    replace(_LLAMA, name="GraniteForCausalLM"),
    replace(_LLAMA, name="SmolLM3ForCausalLM", config_defaults={"no_rope_layer_interval": 4}),
    _GEMMA,
    _GEMMA2,
    replace(_GEMMA2, name="Gemma3ForCausalLM", qk_norm="head"),
    _OLMO2,
    replace(_OLMO2, name="Exaone4ForCausalLM", qk_norm="head", global_nope=True),
    _COHERE,
    replace(_COHERE, name="Cohere2ForCausalLM", global_nope=True),
    _PHI,
    _GLM,
    _DBRX,
    _LLAMA4,
    # Yi's first checkpoints name the norms ln1/ln2; later ones are saved as Llama
    replace(_LLAMA, name="YiForCausalLM", attn_norm="ln1", mlp_norm="ln2"),
    # StableLM 2 and Orion: Llama with LayerNorm (with bias); StableLM's optional parts are refused
    replace(_LLAMA, name="StableLmForCausalLM", norm="layernorm",
            refuse_if=("use_parallel_residual", "qk_layernorm")),
    replace(_LLAMA, name="OrionForCausalLM", norm="layernorm"),
    # InternLM2: Llama under other names, q/k/v fused per kv group
    replace(_LLAMA, name="InternLM2ForCausalLM", attn_key="attention", fused_qkv="wqkv", qkv_grouped=True,
            o_proj_key="wo", mlp_key="feed_forward", mlp_keys=("w1", "w3", "w2"), attn_norm="attention_norm",
            mlp_norm="ffn_norm", keys={**_CAUSAL_LM_KEYS, "embed": "model.tok_embeddings", "head": "output"}),
    # MiniCPM: Llama with scale_emb, scale_depth and dim_model_base (read generically), tied head
    replace(_LLAMA, name="MiniCPMForCausalLM", default_tie_word_embeddings=True),
    _GPT_BIGCODE,
    replace(_GPT_BIGCODE, name="GPT2LMHeadModel", transposed_weights=True),
    replace(_GLM, name="Glm4ForCausalLM", post_attn_norm="post_self_attn_layernorm",
            post_mlp_norm="post_mlp_layernorm"),
    replace(_LLAMA, name="Starcoder2ForCausalLM", norm="layernorm", mlp_keys=("c_fc", "c_proj"),
            default_tie_word_embeddings=True),
    replace(_LLAMA, name="Phi3ForCausalLM", fused_qkv="qkv_proj", fused_gate_up="gate_up_proj"),
)}

# text_config.model_type -> the causal LM row of a multimodal checkpoint's text model
TEXT_MODEL_TYPES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM", "granite": "GraniteForCausalLM", "phi3": "Phi3ForCausalLM",
    # Qwen2-VL's MRoPE equals plain RoPE for text, whose three position components are equal
    "qwen2_vl_text": "Qwen2ForCausalLM", "qwen2_5_vl_text": "Qwen2ForCausalLM",
    "llama4_text": "Llama4ForCausalLM",
}
_TOWER = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
_VISUAL = ("visual.", "model.visual.")
# multimodal architecture -> (its text model's default model_type, vision key prefixes)
MULTIMODAL = {
    "Gemma3ForConditionalGeneration": ("gemma3_text", _TOWER),
    "Mistral3ForConditionalGeneration": ("mistral", _TOWER),
    "LlavaForConditionalGeneration": ("llama", _TOWER),
    "Qwen2VLForConditionalGeneration": ("qwen2_vl_text", _VISUAL),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_5_vl_text", _VISUAL),
    "Llama4ForConditionalGeneration": ("llama4_text", ("vision_model.", "multi_modal_projector.")),
}

IMAGE_ATTENTION = {"Gemma3ForConditionalGeneration": "bidirectional"}      # the others: "causal"


def _multimodal_row(arch: str, text_model_type: str | None, source: str) -> ArchParams:
    default_type, prefixes = MULTIMODAL[arch]
    text_type = text_model_type or default_type
    if text_type not in TEXT_MODEL_TYPES:
        raise ArchitectureError(
            f"{source}: {arch} with a text model of type {text_type!r} is not supported (supported text models: "
            f"{', '.join(TEXT_MODEL_TYPES)})"
        )
    text = ARCHITECTURES[TEXT_MODEL_TYPES[text_type]]
    return replace(text, name=arch, keys=_NESTED_LM_KEYS, alt_keys=(_NESTED_BASE_KEYS, _CAUSAL_LM_KEYS),
                   vision_prefixes=prefixes, image_attention=IMAGE_ATTENTION.get(arch, "causal"))


def arch_params_for(arch: object, allow_unknown: bool = False, source: str = "config.json",
                    text_model_type: str | None = None) -> ArchParams:
    """The row for `arch` (for a multimodal one, its text model's, from `text_model_type`); an architecture
    missing from the table is refused unless `allow_unknown`, when it loads as Llama with a warning."""
    if isinstance(arch, str) and arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    if isinstance(arch, str) and arch in MULTIMODAL:
        return _multimodal_row(arch, text_model_type, source)
    supported = ", ".join([*ARCHITECTURES, *MULTIMODAL])
    if not allow_unknown:
        raise ArchitectureError(
            f"{source}: architecture {arch!r} is not supported (supported: {supported}). Loading it as Llama "
            f"gives wrong output unless its layout and math really are Llama's; if you know they are, opt in "
            f"with ExLlamaV2Config(model_dir, allow_unknown_arch=True) (or config.allow_unknown_arch = True "
            f"before config.prepare()) or the environment variable EXLLAMA_ALLOW_UNKNOWN_ARCH=1"
        )
    log.warning("architecture %r is not supported (%s): loading it as Llama because you opted in; "
                "its output is wrong unless its math is Llama's", arch, supported)
    return replace(ARCHITECTURES["LlamaForCausalLM"], name=str(arch))
