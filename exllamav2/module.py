"""Upstream's module path for the module base class and `Intervention` (clients import from here); both
live in the model kit."""

from .model.module import ExLlamaV2Module, Intervention

__all__ = ["ExLlamaV2Module", "Intervention"]
