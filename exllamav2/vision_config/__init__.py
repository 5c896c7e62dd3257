"""The vision side of a multimodal config.json: which vision family vlm/ runs (`config.vision_model_type`), and
the tower's sizes, image tokens and image processor settings as the `config.vision_*` attributes clients and vlm/
read, each family by its own reader (one module per family).

For a multimodal checkpoint of a family not listed here the text model loads and `vision_model_type` stays None,
which is how clients know not to offer images. So does `LlavaForConditionalGeneration` with a CLIP tower (the
llava-1.5 family): only a Pixtral vision_config (Pixtral-12B's HF layout) makes it the "pixtral" family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .gemma3 import read_gemma3_vision
from .pixtral import read_pixtral_vision
from .qwen import read_mrope_section, read_qwen_vision

# architecture -> (vision_model_type, the key vlm/families.py rows are found by; the family's reader)
VISION_FAMILIES: dict[str, tuple[str, Callable[[Any, dict, str, Path], None]]] = {
    "Qwen2VLForConditionalGeneration": ("qwen2_vl", read_qwen_vision),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_5_vl", read_qwen_vision),
    "Mistral3ForConditionalGeneration": ("mistral3", read_pixtral_vision),
    # Pixtral-12B's HF layout; a Llava with a CLIP tower stays text-only (the reader sets the type back to None)
    "LlavaForConditionalGeneration": ("pixtral", read_pixtral_vision),
    "Gemma3ForConditionalGeneration": ("gemma3", read_gemma3_vision),
}

__all__ = ["VISION_FAMILIES", "read_mrope_section", "read_vision_config"]


def read_vision_config(config: Any, raw: dict, model_dir: Path) -> None:
    """Set config.vision_model_type and, for a family vlm/ runs, the vision_* attributes."""
    family, reader = VISION_FAMILIES.get(config.architecture, (None, None))
    config.vision_model_type = family
    if reader is not None:
        reader(config, raw, family, model_dir)
