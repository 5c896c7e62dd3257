"""The Gemma 3 side of config.json and preprocessor_config.json: the SigLIP tower's sizes as the config.vision_*
attributes, the image block's tokens and length, and the image processor's settings (a fixed square resize)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError

# preprocessor_config.json keys Gemma3ImageProcessor reads that we apply, or that change nothing we compute
_PREPROCESSOR_KEYS = {
    "do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
    "do_convert_rgb", "do_pan_and_scan", "image_seq_length",
    # pan and scan's settings: unused while it is off (it is refused when on)
    "pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops", "pan_and_scan_min_ratio_to_activate",
    # bookkeeping only
    "image_processor_type", "processor_class", "feature_extractor_type", "image_processor_class",
    "default_to_square", "data_format", "input_data_format", "device", "return_tensors", "disable_grouping",
}
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}   # PIL's codes
_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "quick_gelu", "silu")


def read_gemma3_vision(config: Any, raw: dict, family: str, model_dir: Path) -> None:
    """Set the vision_* attributes from config.json and preprocessor_config.json."""
    path = model_dir / "config.json"
    vc = raw.get("vision_config")
    if not isinstance(vc, dict):
        raise ConfigError(f"{path}: {config.architecture} needs a vision_config object")
    _read_tower(config, vc, path)
    config.vision_mm_tokens_per_image = int(raw.get("mm_tokens_per_image", 256))
    side = int(round(config.vision_mm_tokens_per_image ** 0.5))
    patches = config.vision_image_size // config.vision_patch_size["height"]
    if side * side != config.vision_mm_tokens_per_image or patches % side:
        raise ConfigError(f"{path}: mm_tokens_per_image {config.vision_mm_tokens_per_image} must be a square whose "
                          f"side divides the {patches} patches per image side")
    # transformers' attribute map: boi/eoi/image_token_id are the *_index keys
    config.vision_boi_token_id = int(raw.get("boi_token_index", raw.get("boi_token_id", 255_999)))
    config.vision_eoi_token_id = int(raw.get("eoi_token_index", raw.get("eoi_token_id", 256_000)))
    config.image_token_id = int(raw.get("image_token_index", raw.get("image_token_id", 262_144)))
    _read_preprocessor(config, model_dir / "preprocessor_config.json")


def _read_tower(config: Any, vc: dict, path: Path) -> None:
    def get(key: str, default: Any) -> Any:
        return vc[key] if vc.get(key) is not None else default

    width = int(get("hidden_size", 1152))
    config.vision_hidden_size = width
    config.vision_intermediate_size = int(get("intermediate_size", 4304))
    config.vision_num_layers = int(get("num_hidden_layers", 27))
    config.vision_num_attention_heads = int(get("num_attention_heads", 16))
    config.vision_head_dim = width // config.vision_num_attention_heads
    config.vision_hidden_act = str(get("hidden_act", "gelu_pytorch_tanh"))
    config.vision_layer_norm_eps = float(get("layer_norm_eps", 1e-6))
    config.vision_in_channels = int(get("num_channels", 3))
    # SigLIP's pooling head is no part of Gemma 3's image path (the tower refuses a checkpoint that has one)
    config.vision_use_head = bool(get("vision_use_head", True))
    size, patch = get("image_size", 224), get("patch_size", 16)
    if not isinstance(size, int) or not isinstance(patch, int):
        raise ConfigError(f"{path}: vision_config image_size and patch_size must be integers (a square image), got "
                          f"{size!r} and {patch!r}")
    config.vision_image_size = size
    config.vision_patch_size = {"height": patch, "width": patch}
    if size % patch or width % config.vision_num_attention_heads:
        raise ConfigError(f"{path}: vision_config image_size {size} must be a multiple of patch_size {patch}, and "
                          f"hidden_size {width} of num_attention_heads {config.vision_num_attention_heads}")
    if config.vision_hidden_act not in _ACTIVATIONS:
        raise ConfigError(f"{path}: vision_config.hidden_act {config.vision_hidden_act!r} is not supported "
                          f"({', '.join(_ACTIVATIONS)})")


def _read_preprocessor(config: Any, path: Path) -> None:
    """The image processor's settings: preprocessor_config.json where present, else Gemma3ImageProcessor's
    defaults (a resize to the tower's image size)."""
    pre: dict = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    unknown = sorted(set(pre) - _PREPROCESSOR_KEYS)
    if unknown:
        raise ConfigError(f"{path}: image processor settings {', '.join(map(repr, unknown))} are not supported "
                          f"(remove them, or use transformers' processor)")
    if pre.get("do_pan_and_scan"):
        raise ConfigError(f"{path}: do_pan_and_scan: true is not supported (one image block per image, the whole "
                          f"image resized); set it to false or null")
    for switch in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if pre.get(switch) is False:
            raise ConfigError(f"{path}: {switch}: false is not supported (set it to true or null)")
    resample = pre.get("resample", 2)
    if resample not in _RESAMPLE:
        raise ConfigError(f"{path}: resample {resample!r} is not one of PIL's filters ({_RESAMPLE})")
    config.vision_resample = int(resample)
    size = pre.get("size") or {}
    n = config.vision_image_size
    if size and (size.get("height"), size.get("width")) != (n, n):
        raise ConfigError(f"{path}: size {size} is not the tower's image size {n} x {n} (vision_config.image_size)")
    if int(pre.get("image_seq_length", config.vision_mm_tokens_per_image)) != config.vision_mm_tokens_per_image:
        raise ConfigError(f"{path}: image_seq_length {pre['image_seq_length']} disagrees with config.json's "
                          f"mm_tokens_per_image {config.vision_mm_tokens_per_image}")
    config.vision_rescale_factor = float(pre.get("rescale_factor", 1 / 255))
    config.vision_image_mean = _per_channel(pre.get("image_mean", 0.5), config.vision_in_channels)
    config.vision_image_std = _per_channel(pre.get("image_std", 0.5), config.vision_in_channels)


def _per_channel(value: Any, channels: int) -> list[float]:
    """A mean or std as the processor takes it: one number for every channel, or one per channel."""
    return [float(value)] * channels if isinstance(value, (int, float)) else [float(x) for x in value]
