"""The Qwen2-VL / Qwen2.5-VL side of config.json and preprocessor_config.json: the tower's sizes as the
config.vision_* attributes, the image tokens, the image processor's settings, and the text model's MRoPE
sections."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .processor_files import read_preprocessor

log = logging.getLogger(__name__)

# preprocessor_config.json keys the Qwen2-VL processor reads that we apply, or that change nothing we compute
_PREPROCESSOR_KEYS = {
    "do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "min_pixels",
    "max_pixels", "size", "patch_size", "temporal_patch_size", "merge_size", "resample", "do_convert_rgb",
    "crop_size", "do_center_crop",
}


def read_mrope_section(params: dict, rope_type: str, head_dim: int, cfg_path: Path) -> tuple[str, list[int] | None]:
    """(rope type, mrope_section): Qwen2-VL writes its MRoPE as type 'mrope' (older configs) or as 'default' with
    an mrope_section; both are default RoPE frequencies split into temporal/height/width sections."""
    section = params.get("mrope_section")
    if rope_type == "mrope":
        rope_type = "default"
    if section is None:
        return rope_type, None
    if rope_type != "default":
        raise ConfigError(f"{cfg_path}: mrope_section with rope type {rope_type!r} is not supported (only default "
                          f"frequencies)")
    if (not isinstance(section, list) or len(section) != 3 or not all(isinstance(x, int) and x > 0 for x in section)
            or sum(section) != head_dim // 2):
        raise ConfigError(f"{cfg_path}: mrope_section must be three positive integers summing to head_dim / 2 "
                          f"({head_dim // 2}), got {section!r}")
    return rope_type, list(section)


def read_qwen_vision(config: Any, raw: dict, family: str, model_dir: Path) -> None:
    """Set the vision_* attributes from config.json and preprocessor_config.json."""
    vc = raw.get("vision_config")
    if not isinstance(vc, dict):
        raise ConfigError(f"{model_dir / 'config.json'}: {config.architecture} needs a vision_config object")
    if config.mrope_section is None:
        raise ConfigError(f"{model_dir / 'config.json'}: {config.architecture} needs rope_scaling.mrope_section")
    _read_tower(config, vc, family, model_dir / "config.json")
    text = raw.get("text_config") or {}

    def token(name: str, default: int) -> int:
        return int(raw.get(name, text.get(name, default)))

    config.vision_start_token_id = token("vision_start_token_id", 151652)
    config.vision_end_token_id = token("vision_end_token_id", 151653)
    config.image_token_id = token("image_token_id", 151655)
    _read_preprocessor(config, model_dir / "preprocessor_config.json")


def _read_tower(config: Any, vc: dict, family: str, path: Path) -> None:
    def get(key: str, default: Any = None, *alt: str) -> Any:
        for k in (key, *alt):
            if vc.get(k) is not None:
                return vc[k]
        if default is None:
            raise ConfigError(f"{path}: vision_config needs {key!r}")
        return default

    if family == "qwen2_vl":
        width = int(get("embed_dim", 1280))
        config.vision_intermediate_size = int(width * float(get("mlp_ratio", 4)))
        config.vision_out_size = int(get("hidden_size", 3584))
        config.vision_window_size = 0
        config.vision_fullatt_block_indexes = []
    else:
        width = int(get("hidden_size", 1280))
        config.vision_intermediate_size = int(get("intermediate_size", 3420))
        config.vision_out_size = int(get("out_hidden_size", 3584))
        config.vision_window_size = int(get("window_size", 112))
        config.vision_fullatt_block_indexes = list(get("fullatt_block_indexes", [7, 15, 23, 31]))
    config.vision_hidden_size = width
    config.vision_num_layers = int(get("depth", 32))
    config.vision_num_attention_heads = int(get("num_heads", 16))
    config.vision_head_dim = width // config.vision_num_attention_heads
    config.vision_hidden_act = str(get("hidden_act", "quick_gelu" if family == "qwen2_vl" else "silu"))
    config.vision_in_channels = int(get("in_channels", 3, "in_chans"))
    patch = int(get("patch_size", 14, "spatial_patch_size"))
    config.vision_patch_size = {"height": patch, "width": patch}
    config.vision_spatial_merge_size = int(get("spatial_merge_size", 2))
    config.vision_temporal_patch_size = int(get("temporal_patch_size", 2))
    rope = vc.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") not in ("axial", "default"):
        raise ConfigError(f"{path}: vision_config.rope_parameters.rope_type {rope['rope_type']!r} is not supported "
                          f"(only the towers' axial 2-D RoPE)")
    config.vision_rope_theta = float(rope.get("rope_theta", 10000.0))
    if family == "qwen2_5_vl" and config.vision_window_size < patch * config.vision_spatial_merge_size:
        raise ConfigError(f"{path}: vision_config.window_size {config.vision_window_size} is smaller than one merged "
                          f"patch ({patch * config.vision_spatial_merge_size} pixels)")
    if config.vision_out_size != config.hidden_size:
        raise ConfigError(f"{path}: the vision merger's output width {config.vision_out_size} is not the text "
                          f"model's hidden_size {config.hidden_size}")
    if config.vision_hidden_act not in ("quick_gelu", "silu", "gelu", "gelu_pytorch_tanh"):
        raise ConfigError(f"{path}: vision_config.hidden_act {config.vision_hidden_act!r} is not supported")


def _read_preprocessor(config: Any, path: Path) -> None:
    """The image processor's settings: preprocessor_config.json where present, else the HF processor's defaults."""
    pre = read_preprocessor(path, _PREPROCESSOR_KEYS)
    size = pre.get("size") or {}
    config.vision_min_pixels = int(pre.get("min_pixels") or size.get("shortest_edge") or 56 * 56)
    config.vision_max_pixels = int(pre.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280)
    config.vision_rescale_factor = float(pre.get("rescale_factor", 1 / 255))
    config.vision_image_mean = [float(x) for x in pre.get("image_mean", (0.48145466, 0.4578275, 0.40821073))]
    config.vision_image_std = [float(x) for x in pre.get("image_std", (0.26862954, 0.26130258, 0.27577711))]
    for key, attr in (("patch_size", "vision_patch_size"), ("merge_size", "vision_spatial_merge_size"),
                      ("temporal_patch_size", "vision_temporal_patch_size")):
        mine = getattr(config, attr)
        mine = mine["height"] if isinstance(mine, dict) else mine
        if key in pre and int(pre[key]) != mine:
            raise ConfigError(f"{path}: {key} {pre[key]} disagrees with config.json's vision_config ({mine})")
