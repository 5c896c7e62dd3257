"""Upstream's module path for the per-GPU device context (clients import from here); it lives in the model kit."""

from .model.device import ExLlamaV2DeviceContext

__all__ = ["ExLlamaV2DeviceContext"]
