"""The parallel decoder block (Cohere, Cohere 2, Phi-2): x + attn(norm(x)) + mlp(norm(x)), one norm shared.

Its attention and MLP are the sequential blocks' parts, called without their residual adds; the shared
norm is the attention's pre-norm (the architecture row names it as attn_norm and gives the MLP none).
"""

from __future__ import annotations

import torch

from .attention import ExLlamaV2Attention
from .mlp import ExLlamaV2MLP
from .module import ExLlamaV2CompositeModule, ExLlamaV2Module
from .norm import apply_norm


class ExLlamaV2ParallelDecoder(ExLlamaV2CompositeModule):
    name = "ParallelDecoder"

    def __init__(self, model, layer_key: str, layer_idx: int) -> None:
        super().__init__(model, f"{layer_key}.parallel_decoder")
        self.layer_idx = layer_idx
        self.attn = ExLlamaV2Attention(model, layer_key, layer_idx)
        self.mlp = ExLlamaV2MLP(model, layer_key, layer_idx)

    def submodules(self) -> list[ExLlamaV2Module]:
        return [*self.attn.submodules(), *self.mlp.submodules()]

    def set_device(self, device: torch.device) -> None:
        super().set_device(device)
        self.attn.device = self.mlp.device = device

    def load(self) -> None:
        self.attn.load()
        self.mlp.load()

    def unload(self) -> None:
        self.attn.unload()
        self.mlp.unload()

    def forward(self, hidden_states: torch.Tensor, cache=None, attn_params=None, loras: list | None = None,
                **kwargs) -> torch.Tensor:
        h = apply_norm(self.attn.pre_norm, hidden_states)
        return hidden_states + self.attn.attend(h, cache, attn_params, loras) + self.mlp.project(h, loras)
