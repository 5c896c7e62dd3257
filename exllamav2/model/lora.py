"""LoRA adapters (PEFT format), applied at forward time on top of any linear layer's output.

y = base(x) + scaling * (x @ A^T) @ B^T, with scaling = alpha / r (alpha / sqrt(r) for rsLoRA) times the
user's lora_scaling. Adapters are read from safetensors only; a pickle `.bin` is refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from .linear import ExLlamaV2Linear

if TYPE_CHECKING:
    from .model import ExLlamaV2


class ExLlamaV2Lora:
    @staticmethod
    def from_directory(model: "ExLlamaV2", directory: str, lora_scaling: float = 1.0) -> "ExLlamaV2Lora":
        d = Path(directory)
        weights = d / "adapter_model.safetensors"
        if not weights.exists() and (d / "adapter_model.bin").exists():
            raise ValueError(
                f"{d / 'adapter_model.bin'} is a pickle file, which is never loaded; convert it to "
                f"adapter_model.safetensors (e.g. with safetensors.torch.save_file)"
            )
        return ExLlamaV2Lora(model, str(d / "adapter_config.json"), str(weights), lora_scaling)

    def __init__(self, model: "ExLlamaV2", lora_config_path: str, lora_path: str, lora_scaling: float = 1.0) -> None:
        self.model = model
        self.unloaded = False
        self.lora_config_path, self.lora_path = lora_config_path, lora_path
        cfg = json.loads(Path(lora_config_path).read_text())
        if cfg.get("fan_in_fan_out"):
            raise ValueError(f"{lora_config_path}: fan_in_fan_out adapters are not supported")
        r = int(cfg["r"])
        alpha = float(cfg.get("lora_alpha", r))
        self.lora_r = r
        self.lora_scaling = lora_scaling * (alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r)
        linears = self._linears()
        tensors = load_file(lora_path)
        self.weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, a in tensors.items():
            if ".lora_A." not in name:
                continue
            key = name.split(".lora_A.")[0].removeprefix("base_model.model.")
            if key not in linears:
                raise ValueError(f"{lora_path}: adapter tensor {name!r} targets {key!r}, which the model does not have")
            b = tensors[name.replace(".lora_A.", ".lora_B.")]
            self.weights[key] = (a.T.to(model.dtype).contiguous(),
                                 (b.T.float() * self.lora_scaling).to(model.dtype).contiguous())
        self.update_devices(linears)
        model.loras.add(self)

    def update_devices(self, linears: dict[str, ExLlamaV2Linear] | None = None) -> None:
        """Put each adapter pair on its layer's current device (the CPU while the layer is unplaced)."""
        linears = linears or self._linears()
        for key, (a, b) in self.weights.items():
            dev = linears[key].device or torch.device("cpu")
            self.weights[key] = (a.to(dev), b.to(dev))

    def _linears(self) -> dict[str, ExLlamaV2Linear]:
        found = {}
        for m in self.model.modules:
            for sub in getattr(m, "submodules", lambda: [m])():
                if isinstance(sub, ExLlamaV2Linear):
                    found[sub.key] = sub
        return found

    def apply(self, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if key not in self.weights:
            return y
        a, b = self.weights[key]
        return y + (x.to(a.dtype) @ a) @ b

    def unload(self) -> None:
        self.unloaded = True
        self.weights = {}
        self.model.loras.discard(self)


def as_lora_list(loras: Any, model: "ExLlamaV2 | None" = None) -> list[ExLlamaV2Lora] | None:
    """`loras=` as upstream takes it: None, one ExLlamaV2Lora, or a list/tuple of them; returned as a
    list (None for none). Refuses anything else, an unloaded adapter and one made for another model,
    which would otherwise be applied to layers it was not trained for (or silently not at all)."""
    if loras is None:
        return None
    items = [loras] if isinstance(loras, ExLlamaV2Lora) else loras
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"loras must be an ExLlamaV2Lora or a list of them, got {type(loras).__name__}")
    for lora in items:
        if not isinstance(lora, ExLlamaV2Lora):
            raise TypeError(f"loras must contain ExLlamaV2Lora objects, got {type(lora).__name__}")
        if lora.unloaded:
            raise ValueError(f"the LoRA {lora.lora_path} was unloaded; load it again or leave it out of loras")
        if model is not None and lora.model is not model:
            raise ValueError(f"the LoRA {lora.lora_path} was loaded for another model; load it with "
                             f"ExLlamaV2Lora.from_directory(model, ...) for the model it is used with")
    return list(items) or None
