"""Vision (multimodal) models, through upstream's API: `ExLlamaV2VisionTower(config)` (load / load_gen / unload,
get_image_embeddings) and `ExLlamaV2MultimodalProjector`.

Runs the Qwen2-VL and Qwen2.5-VL towers (`config.vision_model_type` 'qwen2_vl' / 'qwen2_5_vl'). For every other
model `config.vision_model_type` is None, which is how clients decide not to offer images, and constructing the
tower raises a ValueError naming the model. One part per module: preprocess (Pillow), tower, projector (merger),
mrope (the text model's 3-D positions), families (what differs between families, as data).
"""

from __future__ import annotations

from .projector import ExLlamaV2MultimodalProjector
from .tower import ExLlamaV2VisionTower

__all__ = ["ExLlamaV2MultimodalProjector", "ExLlamaV2VisionTower"]
