"""The Pixtral-tower side of config.json, preprocessor_config.json, processor_config.json and the tokenizer:
Mistral 3 (`Mistral3ForConditionalGeneration`: Pixtral tower, RMSNorm + patch merger + MLP projector) and
Pixtral-12B's HF layout (`LlavaForConditionalGeneration` with a Pixtral vision_config: Llava's MLP projector).

A Llava checkpoint with any other tower (CLIP: the llava-1.5 family) stays a text model: its vision_model_type is
set back to None, so clients do not offer images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .processor_files import read_preprocessor

# preprocessor_config.json keys PixtralImageProcessor reads that we apply
_PREPROCESSOR_KEYS = {"do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "size",
                      "patch_size", "resample", "do_convert_rgb"}
# processor_config.json keys PixtralProcessor reads (the chat template changes nothing we compute)
_PROCESSOR_KEYS = {"image_token", "image_break_token", "image_end_token", "patch_size", "spatial_merge_size",
                   "processor_class", "chat_template"}
# the HF config classes' defaults where config.json leaves a key out
_DEFAULTS = {
    "mistral3": {"tower": "pixtral", "spatial_merge_size": 2, "multimodal_projector_bias": False, "vision_feature_layer": -1,
                 "vision_feature_select_strategy": "full", "projector_hidden_act": "gelu", "image_token_index": 10},
    "pixtral": {"tower": "clip_vision_model", "spatial_merge_size": 1, "multimodal_projector_bias": True, "vision_feature_layer": -2,
                "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
                "image_token_index": 32000},
}
_ACTS = ("quick_gelu", "silu", "gelu", "gelu_pytorch_tanh")


def read_pixtral_vision(config: Any, raw: dict, family: str, model_dir: Path) -> None:
    """Set the vision_* attributes (family "mistral3" or "pixtral"); a Llava whose tower is not Pixtral's gets
    vision_model_type None."""
    vc = raw.get("vision_config")
    cfg_path = model_dir / "config.json"
    if not isinstance(vc, dict):
        raise ConfigError(f"{cfg_path}: {config.architecture} needs a vision_config object")
    tower = vc.get("model_type", _DEFAULTS[family]["tower"])
    if tower != "pixtral" and family == "pixtral":        # Llava with CLIP: a text model here
        config.vision_model_type = None
        return
    if tower != "pixtral":
        raise ConfigError(f"{cfg_path}: {config.architecture} with a {tower!r} vision tower is not supported "
                          f"(only 'pixtral')")
    _read_tower(config, vc, cfg_path)
    _read_projector(config, raw, family, cfg_path)
    _read_preprocessor(config, model_dir / "preprocessor_config.json")
    _read_image_tokens(config, model_dir)


def _read_tower(config: Any, vc: dict, path: Path) -> None:
    def get(key: str, default: Any) -> Any:
        return vc[key] if vc.get(key) is not None else default

    config.vision_hidden_size = int(get("hidden_size", 1024))
    config.vision_intermediate_size = int(get("intermediate_size", 4096))
    config.vision_num_layers = int(get("num_hidden_layers", 24))
    config.vision_num_attention_heads = int(get("num_attention_heads", 16))
    config.vision_in_channels = int(get("num_channels", 3))
    config.vision_hidden_act = str(get("hidden_act", "gelu"))
    patch = get("patch_size", 16)
    if not isinstance(patch, int):
        raise ConfigError(f"{path}: vision_config.patch_size {patch!r} is not supported (only square patches)")
    config.vision_patch_size = {"height": patch, "width": patch}
    # transformers' PixtralVisionConfig always takes hidden_size / num_attention_heads as the head size
    config.vision_head_dim = config.vision_hidden_size // config.vision_num_attention_heads
    if get("head_dim", config.vision_head_dim) != config.vision_head_dim or \
            config.vision_head_dim * config.vision_num_attention_heads != config.vision_hidden_size:
        raise ConfigError(f"{path}: vision_config.head_dim {vc.get('head_dim')} is not hidden_size / "
                          f"num_attention_heads ({config.vision_hidden_size} / {config.vision_num_attention_heads})")
    if config.vision_head_dim % 4:
        raise ConfigError(f"{path}: the vision head size {config.vision_head_dim} is not a multiple of 4 (Pixtral's "
                          f"2-D RoPE gives a quarter of it to each of rows and columns, twice)")
    rope = vc.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") != "axial":
        raise ConfigError(f"{path}: vision_config.rope_parameters.rope_type {rope['rope_type']!r} is not supported "
                          f"(only Pixtral's axial 2-D RoPE)")
    config.vision_rope_theta = float(rope.get("rope_theta", vc.get("rope_theta", 10000.0)))
    if config.vision_hidden_act not in _ACTS:
        raise ConfigError(f"{path}: vision_config.hidden_act {config.vision_hidden_act!r} is not supported")


def _read_projector(config: Any, raw: dict, family: str, path: Path) -> None:
    def get(key: str) -> Any:
        return raw[key] if raw.get(key) is not None else _DEFAULTS[family][key]

    layer = get("vision_feature_layer")
    if layer not in (-1, config.vision_num_layers):
        raise ConfigError(f"{path}: vision_feature_layer {layer!r} is not supported (only the tower's last layer, "
                          f"-1, as Pixtral-12B and Mistral 3 use)")
    if get("vision_feature_select_strategy") != "full":
        raise ConfigError(f"{path}: vision_feature_select_strategy {get('vision_feature_select_strategy')!r} is not "
                          f"supported with a Pixtral tower (only 'full': every patch, no CLS token to drop)")
    config.vision_spatial_merge_size = int(get("spatial_merge_size"))
    config.vision_projector_bias = bool(get("multimodal_projector_bias"))
    config.vision_projector_act = str(get("projector_hidden_act"))
    config.vision_out_size = config.hidden_size
    config.image_token_id = int(raw.get("image_token_id", get("image_token_index")))
    if config.vision_projector_act not in _ACTS:
        raise ConfigError(f"{path}: projector_hidden_act {config.vision_projector_act!r} is not supported")
    if config.vision_spatial_merge_size < 1:
        raise ConfigError(f"{path}: spatial_merge_size {config.vision_spatial_merge_size} must be at least 1")


def _read_preprocessor(config: Any, path: Path) -> None:
    """PixtralImageProcessor's settings: preprocessor_config.json where present, else its defaults."""
    pre = read_preprocessor(path, _PREPROCESSOR_KEYS)
    size = pre.get("size") or {"longest_edge": 1024}
    if "longest_edge" in size:
        config.vision_size = {"longest_edge": int(size["longest_edge"])}
    elif "height" in size and "width" in size:
        config.vision_size = {"height": int(size["height"]), "width": int(size["width"])}
    else:
        raise ConfigError(f"{path}: size {size!r} is not supported (longest_edge, or height and width)")
    config.vision_resample = int(pre.get("resample", 3))
    config.vision_rescale_factor = float(pre.get("rescale_factor", 1 / 255))
    config.vision_image_mean = [float(x) for x in pre.get("image_mean", (0.48145466, 0.4578275, 0.40821073))]
    config.vision_image_std = [float(x) for x in pre.get("image_std", (0.26862954, 0.26130258, 0.27577711))]
    # the processor resizes to multiples of patch * merge whatever this says; another value is another model's
    patch = pre.get("patch_size", config.vision_patch_size)
    patch = patch["height"] if isinstance(patch, dict) else patch
    allowed = {config.vision_patch_size["height"], config.vision_patch_size["height"] * config.vision_spatial_merge_size}
    if patch not in allowed:
        raise ConfigError(f"{path}: patch_size {patch} disagrees with config.json's vision_config "
                          f"({' or '.join(map(str, sorted(allowed)))})")


def _read_image_tokens(config: Any, model_dir: Path) -> None:
    """The ids of [IMG_BREAK] and [IMG_END] (by the names processor_config.json gives) from the tokenizer files;
    None where the tokenizer lacks them: the text model still loads, the tower refuses to run."""
    path = model_dir / "processor_config.json"
    proc: dict = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    unknown = sorted(set(proc) - _PROCESSOR_KEYS)
    if unknown:
        raise ConfigError(f"{path}: processor settings {', '.join(map(repr, unknown))} are not supported")
    for key, mine in (("patch_size", config.vision_patch_size["height"]),
                      ("spatial_merge_size", config.vision_spatial_merge_size)):
        if key in proc and int(proc[key]) != mine:
            raise ConfigError(f"{path}: {key} {proc[key]} disagrees with config.json ({mine})")
    pieces = _added_tokens(model_dir)
    config.vision_image_break_token = proc.get("image_break_token", "[IMG_BREAK]")
    config.vision_image_end_token = proc.get("image_end_token", "[IMG_END]")
    config.vision_image_break_token_id = pieces.get(config.vision_image_break_token)
    config.vision_image_end_token_id = pieces.get(config.vision_image_end_token)


def _added_tokens(model_dir: Path) -> dict[str, int]:
    """piece -> id of the tokenizer's added (special) tokens, from tokenizer.json and tokenizer_config.json."""
    pieces: dict[str, int] = {}
    tok = model_dir / "tokenizer.json"
    if tok.is_file():
        for t in json.loads(tok.read_text(encoding="utf-8")).get("added_tokens") or ():
            pieces[t["content"]] = int(t["id"])
    tok_cfg = model_dir / "tokenizer_config.json"
    if tok_cfg.is_file():
        for i, t in (json.loads(tok_cfg.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}).items():
            pieces.setdefault(t["content"], int(i))
    return pieces
