"""Upstream's module path for the LoRA adapter (clients import from here); it lives in the model kit."""

from .model.lora import ExLlamaV2Lora

__all__ = ["ExLlamaV2Lora"]
