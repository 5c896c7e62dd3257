"""Vision (multimodal) models, through upstream's API: `ExLlamaV2VisionTower(config)` (load / load_gen / unload,
get_image_embeddings) and `ExLlamaV2MultimodalProjector`.

Runs the towers families.py lists (`config.vision_model_type`). For every other model `config.vision_model_type`
is None, which is how clients decide not to offer images, and constructing the tower raises a ValueError naming
the model. Shared parts: tower (the API, loading, image -> embedding), image (reading with Pillow), families (a
row per family: its module, where its tensors sit). Per family: qwen_tower, qwen_preprocess, projector (Qwen's
merger), mrope (the text model's 3-D positions); pixtral_tower (Mistral 3, Pixtral-12B: tower and projectors),
pixtral_preprocess; gemma3_tower (SigLIP and Gemma 3's projector), gemma3_preprocess.
"""

from __future__ import annotations

from .projector import ExLlamaV2MultimodalProjector
from .tower import ExLlamaV2VisionTower

__all__ = ["ExLlamaV2MultimodalProjector", "ExLlamaV2VisionTower"]
