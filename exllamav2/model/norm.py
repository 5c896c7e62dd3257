"""RMSNorm and LayerNorm modules. They run through their device's ops table (ops/table.py): exllamav2_ext's
kernels on float16 CUDA activations where the extension is loaded, the twins (ops/norm.py) elsewhere."""

from __future__ import annotations

import torch

from .module import ExLlamaV2Module


class _Norm(ExLlamaV2Module):
    """A norm over the last `size` features (hidden_size unless given: q/k norms work per head)."""

    def __init__(self, model, key: str, size: int | None = None) -> None:
        super().__init__(model, key)
        self.size = size or model.config.hidden_size


class ExLlamaV2RMSNorm(_Norm):
    name = "RMSNorm"

    def load(self) -> None:
        w = self.load_tensor(f"{self.key}.weight", shape=(self.size,))
        # Gemma stores weight - 1; fold the offset in once, in fp32
        self.weight = (w.float() + self.model.config.arch.norm_weight_offset).to(self.device)

    def unload(self) -> None:
        self.weight = None

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.model.config.norm_eps)

    def weight_footprint(self) -> int:
        return self.tensor_bytes(f"{self.key}.weight") * 2


class ExLlamaV2LayerNorm(_Norm):
    name = "LayerNorm"

    def tensor_suffixes(self) -> tuple[str, ...]:
        return ("weight", "bias")

    def load(self) -> None:
        size = (self.size,)
        self.weight = self.load_tensor(f"{self.key}.weight", shape=size).float().to(self.device)
        bias_key = f"{self.key}.bias"
        self.bias = self.load_tensor(bias_key, shape=size).float().to(self.device) if self.has(bias_key) else None

    def unload(self) -> None:
        self.weight = self.bias = None

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.ops.layer_norm(x, self.weight, self.bias, self.model.config.norm_eps)

    def weight_footprint(self) -> int:
        return self.tensor_bytes(f"{self.key}.weight") * 4


def make_norm(model, key: str, size: int | None = None) -> ExLlamaV2Module:
    cls = ExLlamaV2LayerNorm if model.config.arch.norm == "layernorm" else ExLlamaV2RMSNorm
    return cls(model, key, size)


def optional_norm(model, prefix: str, name: str | None, size: int | None = None) -> ExLlamaV2Module | None:
    """The norm `<prefix>.<name>`, or None where the architecture has none there (`name` None)."""
    return make_norm(model, f"{prefix}.{name}", size) if name else None


def apply_norm(norm: ExLlamaV2Module | None, x: torch.Tensor) -> torch.Tensor:
    """x through `norm` over its last `norm.size` features (q/k norms act per head or on the whole
    projection), or x itself where there is no norm."""
    if norm is None:
        return x
    if norm.size == x.shape[-1]:        # a norm over the whole last dim (every hidden-state norm): no views
        return norm.forward(x)
    return norm.forward(x.view(*x.shape[:-1], -1, norm.size)).view(x.shape)
