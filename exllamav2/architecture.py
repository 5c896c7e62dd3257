"""Architecture table: how each HuggingFace architecture differs from Llama, as data rows.

A row names the checkpoint keys and the few switches the model builder reads; there is no
per-architecture code path. An architecture missing from the table is refused (upstream loaded it as
Llama, which gives fluent garbage for Qwen3, Gemma, Granite and others); the user may opt in to that.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from enum import Enum

from .errors import ArchitectureError

log = logging.getLogger(__name__)


class RopeStyle(Enum):
    NONE = 0
    GPTJ = 1   # rotate interleaved pairs (x0, x1), (x2, x3), ...
    NEOX = 2   # rotate halves (x[:d/2], x[d/2:])


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
    qk_norm: bool = False                 # RMS norm over each head of q and k, before RoPE (self_attn.q_norm/k_norm)
    # Norm keys inside a decoder layer; post_* are None where the architecture has none
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    post_attn_norm: str | None = None
    post_mlp_norm: str | None = None
    alternating_swa: bool = False         # even layers sliding, odd global (when layer_types absent)
    default_tie_word_embeddings: bool = False
    keys: dict = field(default_factory=lambda: {
        "embed": "model.embed_tokens",
        "layers": "model.layers",
        "norm": "model.norm",
        "head": "lm_head",
    })


_LLAMA = ArchParams()
# Gemma's family: norms store (weight - 1), GELU-tanh MLP, embedding scaled by sqrt(hidden), tied head
_GEMMA = replace(_LLAMA, name="GemmaForCausalLM", norm_weight_offset=1.0, embed_scale_sqrt_hidden=True,
                 default_tie_word_embeddings=True)
_GEMMA2 = replace(_GEMMA, name="Gemma2ForCausalLM", activation_key="hidden_activation",
                  mlp_norm="pre_feedforward_layernorm", post_attn_norm="post_attention_layernorm",
                  post_mlp_norm="post_feedforward_layernorm", alternating_swa=True)

# Rows that differ from Llama only in config.json values (multipliers, no-RoPE layers, windows) are
# Llama's row under their own name: those values are read generically by ExLlamaV2Config.
ARCHITECTURES: dict[str, ArchParams] = {a.name: a for a in (
    _LLAMA,
    replace(_LLAMA, name="MistralForCausalLM"),
    replace(_LLAMA, name="Qwen2ForCausalLM"),
    replace(_LLAMA, name="Qwen3ForCausalLM", qk_norm=True),
    replace(_LLAMA, name="GraniteForCausalLM"),
    replace(_LLAMA, name="SmolLM3ForCausalLM"),
    _GEMMA,
    _GEMMA2,
    replace(_GEMMA2, name="Gemma3ForCausalLM", qk_norm=True),
    replace(_LLAMA, name="Phi3ForCausalLM", fused_qkv="qkv_proj", fused_gate_up="gate_up_proj"),
)}


def arch_params_for(arch: object, allow_unknown: bool = False, source: str = "config.json") -> ArchParams:
    """The row for `arch`; an architecture missing from the table is refused unless `allow_unknown`,
    when it loads as Llama with a warning."""
    if isinstance(arch, str) and arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    supported = ", ".join(ARCHITECTURES)
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
