"""Vision (multimodal) models: not implemented in this fork.

`ExLlamaV2VisionTower` and `ExLlamaV2MultimodalProjector` exist so that clients importing them (TabbyAPI
imports the vision tower unconditionally) keep working for text models; constructing either raises
NotImplementedError. Text-only use is unaffected: `config.vision_model_type` is None for every model
this fork loads, which is how clients decide not to use vision.
"""

from __future__ import annotations

from typing import Any

VISION_MISSING = (
    "vision models are not implemented in this fork: only the text model of a checkpoint can be loaded; "
    "load it without vision (clients: leave vision disabled; config.vision_model_type is None)"
)


class ExLlamaV2VisionTower:
    def __init__(self, config: Any) -> None:
        raise NotImplementedError(f"ExLlamaV2VisionTower: {VISION_MISSING}")


class ExLlamaV2MultimodalProjector:
    def __init__(self, config: Any) -> None:
        raise NotImplementedError(f"ExLlamaV2MultimodalProjector: {VISION_MISSING}")


__all__ = ["ExLlamaV2MultimodalProjector", "ExLlamaV2VisionTower"]
