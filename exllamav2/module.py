"""Base of every model module: a checkpoint key, a device, load/unload, forward, footprint."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model import ExLlamaV2


class TensorShapeError(ValueError):
    """A checkpoint tensor disagrees with config.json."""


class ExLlamaV2Module:
    name = "Module"

    def __init__(self, model: "ExLlamaV2", key: str) -> None:
        self.model = model
        self.key = key
        self.device: torch.device | None = None

    # checkpoint access -------------------------------------------------------------------

    @property
    def index(self):
        return self.model.config.index

    def has(self, name: str) -> bool:
        return self.index.has(name)

    def tensor_bytes(self, name: str) -> int:
        return self.index.nbytes(name) if self.has(name) else 0

    def load_tensor(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if not self.has(name):
            raise KeyError(
                f"tensor {name!r} is missing from {', '.join(self.index.files)}: the checkpoint does "
                f"not match architecture {self.model.config.architecture}"
            )
        found = self.index.shape(name)
        if shape is not None and tuple(found) != tuple(shape):
            raise TensorShapeError(
                f"tensor {name!r} in {self.index.file_of(name)} has shape {tuple(found)}, but config.json "
                f"implies {tuple(shape)}: config.json and the weights disagree (wrong config or corrupt file)"
            )
        return self.index.get(name)

    # lifecycle ---------------------------------------------------------------------------

    def set_device(self, device: torch.device) -> None:
        self.device = device

    def load(self) -> None:
        raise NotImplementedError

    def unload(self) -> None:
        raise NotImplementedError

    def weight_footprint(self) -> int:
        """Bytes this module's weights occupy once loaded (for device placement)."""
        raise NotImplementedError

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        raise NotImplementedError
