"""The vision families as data: which module holds a family's tower, where its tensors sit, and what differs
between close relatives (Qwen2-VL and Qwen2.5-VL) is a row here, never a branch on a name in the forward code."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class VisionFamily:
    name: str                       # config.vision_model_type
    module: str                     # the vlm module whose `Tower` class runs it
    prefixes: tuple[str, ...]       # where the tower's tensors sit in the checkpoint (both transformers layouts)
    probe: str                      # a tensor every checkpoint of the family has, under its prefix
    # Qwen's towers: "layernorm" (weight and bias) or "rmsnorm" (weight only) in blocks and merger; the MLP's
    # ("fc1", "fc2"): act(fc1) -> fc2, or ("gate_proj", "up_proj", "down_proj"): SwiGLU; window attention except
    # in config.vision_fullatt_block_indexes
    norm: str = "layernorm"
    mlp: tuple[str, ...] = ("fc1", "fc2")
    windowed: bool = False
    # the Pixtral tower's projector: Mistral 3's RMSNorm + patch merger before Llava's MLP, or that MLP alone
    patch_merger: bool = False


FAMILIES = {
    "qwen2_vl": VisionFamily("qwen2_vl", "qwen_tower", ("visual.", "model.visual."), "patch_embed.proj.weight",
                             "layernorm", ("fc1", "fc2"), False),
    "qwen2_5_vl": VisionFamily("qwen2_5_vl", "qwen_tower", ("visual.", "model.visual."), "patch_embed.proj.weight",
                               "rmsnorm", ("gate_proj", "up_proj", "down_proj"), True),
    "mistral3": VisionFamily("mistral3", "pixtral_tower", ("vision_tower.", "model.vision_tower."), "patch_conv.weight",
                             "rmsnorm", ("gate_proj", "up_proj", "down_proj"), patch_merger=True),
    "pixtral": VisionFamily("pixtral", "pixtral_tower", ("vision_tower.", "model.vision_tower."), "patch_conv.weight",
                            "rmsnorm", ("gate_proj", "up_proj", "down_proj")),
    # SigLIP, with or without its vision_model. level (checkpoints of transformers < 5 and >= 5); the projector sits
    # beside it, under multi_modal_projector.
    "gemma3": VisionFamily("gemma3", "gemma3_tower", ("vision_tower.vision_model.", "model.vision_tower.vision_model.",
                                                      "vision_tower.", "model.vision_tower."),
                           "embeddings.patch_embedding.weight"),
}


def family_of(config: object) -> VisionFamily:
    name = getattr(config, "vision_model_type", None)
    if name not in FAMILIES:
        arch = getattr(config, "architecture", "this model")
        raise ValueError(f"{arch} has no vision tower this library runs (vision_model_type is {name!r}; vision is "
                         f"supported for {', '.join(FAMILIES)}): load a vision model's directory, or leave vision off")
    return FAMILIES[name]


def find_prefix(family: VisionFamily, keys) -> str:
    for prefix in family.prefixes:
        if f"{prefix}{family.probe}" in keys:
            return prefix
    raise ConfigError(f"the checkpoint has no {family.name} vision tower (no "
                      f"{' or '.join(p + family.probe for p in family.prefixes)})")
