"""Base of every model module: a checkpoint key, a device, load/unload, forward, footprint."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import MissingTensorError, TensorShapeError  # noqa: F401  (re-exported for linear.py)

if TYPE_CHECKING:
    from ..ops import DeviceOps
    from .model import ExLlamaV2


class ExLlamaV2Module:
    name = "Module"

    def __init__(self, model: "ExLlamaV2", key: str) -> None:
        self.model = model
        self.key = key
        self.device: torch.device | None = None

    @property
    def ops(self) -> "DeviceOps":
        """This module's device's ops table (kernel or twin per op)."""
        return self.model.ops(self.device)

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
            raise MissingTensorError(
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

    def tensor_suffixes(self) -> tuple[str, ...]:
        """The tensor names this module reads under its key (`<key>.<suffix>`)."""
        return ("weight",)

    def checkpoint_keys(self) -> dict[str, tuple[str, ...]]:
        """Checkpoint key -> the suffixes read under it: what this module accounts for at load."""
        return {self.key: self.tensor_suffixes()}

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


def checkpoint_keys_of(modules: list[ExLlamaV2Module]) -> dict[str, tuple[str, ...]]:
    """The union of the modules' checkpoint keys and suffixes."""
    keys: dict[str, tuple[str, ...]] = {}
    for m in modules:
        for key, suffixes in m.checkpoint_keys().items():
            keys[key] = tuple(dict.fromkeys(keys.get(key, ()) + suffixes))
    return keys


class ExLlamaV2CompositeModule(ExLlamaV2Module):
    """A decoder sub-layer (attention, MLP) made of norms and linears that share its device."""

    def submodules(self) -> list[ExLlamaV2Module]:
        raise NotImplementedError

    def set_device(self, device: torch.device) -> None:
        super().set_device(device)
        for m in self.submodules():
            m.set_device(device)

    def checkpoint_keys(self) -> dict[str, tuple[str, ...]]:
        return checkpoint_keys_of(self.submodules())

    def load(self) -> None:
        for m in self.submodules():
            m.load()

    def unload(self) -> None:
        for m in self.submodules():
            m.unload()

    def weight_footprint(self) -> int:
        return sum(m.weight_footprint() for m in self.submodules())


class Intervention(ExLlamaV2Module):
    """Wraps a module of `model.modules` with hooks around its forward, e.g. to read or steer activations:
    `model.modules[i] = Intervention(model.modules[i], post_forward=fn)`.

    Each hook is called as `hook(hidden_states, *args, **kwargs)` with the arguments the wrapped module
    receives and returns the hidden states to use instead; its result is moved back to the input's device.
    Everything else (device, loading, attributes such as `layer_idx`) is the wrapped module's.
    """

    def __init__(self, inner: ExLlamaV2Module, pre_forward=None, post_forward=None) -> None:
        # no super().__init__: `device` and the other state belong to the wrapped module
        self.inner = inner
        self.model = inner.model
        self.key = inner.key
        self.name = inner.name
        self.pre_forward = pre_forward
        self.post_forward = post_forward

    def __getattr__(self, name: str):
        # only called for names not found on the wrapper itself
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def device(self) -> torch.device | None:
        return self.inner.device

    def set_device(self, device: torch.device) -> None:
        self.inner.set_device(device)

    def load(self) -> None:
        self.inner.load()

    def unload(self) -> None:
        self.inner.unload()

    def weight_footprint(self) -> int:
        return self.inner.weight_footprint()

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.pre_forward is not None:
            dev = hidden_states.device
            hidden_states = self.pre_forward(hidden_states, *args, **kwargs).to(dev)
        hidden_states = self.inner.forward(hidden_states, *args, **kwargs)
        if self.post_forward is not None:
            dev = hidden_states.device
            hidden_states = self.post_forward(hidden_states, *args, **kwargs).to(dev)
        return hidden_states
