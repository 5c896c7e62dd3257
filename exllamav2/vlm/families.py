"""The vision families as data: what differs between Qwen2-VL's and Qwen2.5-VL's towers is a row here, never a
branch on a name in the forward code."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class VisionFamily:
    name: str                       # config.vision_model_type
    prefixes: tuple[str, ...]       # where the tower's tensors sit in the checkpoint (both transformers layouts)
    norm: str                       # "layernorm" (weight and bias) or "rmsnorm" (weight only), blocks and merger
    mlp: tuple[str, ...]            # ("fc1", "fc2"): act(fc1) -> fc2; ("gate_proj", "up_proj", "down_proj"): SwiGLU
    windowed: bool                  # window attention except in config.vision_fullatt_block_indexes


FAMILIES = {
    "qwen2_vl": VisionFamily("qwen2_vl", ("visual.", "model.visual."), "layernorm", ("fc1", "fc2"), False),
    "qwen2_5_vl": VisionFamily("qwen2_5_vl", ("visual.", "model.visual."), "rmsnorm",
                               ("gate_proj", "up_proj", "down_proj"), True),
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
        if f"{prefix}patch_embed.proj.weight" in keys:
            return prefix
    raise ConfigError(f"the checkpoint has no {family.name} vision tower (no "
                      f"{' or '.join(p + 'patch_embed.proj.weight' for p in family.prefixes)})")
