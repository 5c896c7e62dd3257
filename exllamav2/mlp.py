"""Gated MLP: down(act(gate(x)) * up(x)), with the pre-norm and optional post-norm of the layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear import ExLlamaV2Linear
from .module import ExLlamaV2CompositeModule, ExLlamaV2Module
from .norm import make_norm

# by the names config.ACTIVATIONS maps config.json's activation names to
ACTIVATION_FUNCTIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


class ExLlamaV2MLP(ExLlamaV2CompositeModule):
    name = "MLP"

    def __init__(self, model, layer_key: str, layer_idx: int) -> None:
        super().__init__(model, f"{layer_key}.mlp")            # upstream's module key
        key = layer_key
        cfg, arch = model.config, model.config.arch
        self.layer_idx = layer_idx
        h, i = cfg.hidden_size, cfg.intermediate_size
        fused = f"{key}.mlp.{arch.fused_gate_up}" if arch.fused_gate_up else None
        self.pre_norm = make_norm(model, f"{key}.{arch.mlp_norm}")
        self.post_norm = make_norm(model, f"{key}.{arch.post_mlp_norm}") if arch.post_mlp_norm else None
        self.gate_proj = ExLlamaV2Linear(model, f"{key}.mlp.gate_proj", h, i, fused=fused and (fused, 0, i))
        self.up_proj = ExLlamaV2Linear(model, f"{key}.mlp.up_proj", h, i, fused=fused and (fused, i, 2 * i))
        self.down_proj = ExLlamaV2Linear(model, f"{key}.mlp.down_proj", i, h)
        self.act = ACTIVATION_FUNCTIONS[cfg.activation]
        self.residual_scale = cfg.residual_multiplier

    def submodules(self) -> list[ExLlamaV2Module]:
        return [m for m in (self.pre_norm, self.post_norm, self.gate_proj, self.up_proj, self.down_proj) if m]

    def forward(self, hidden_states: torch.Tensor, loras: list | None = None, **kwargs) -> torch.Tensor:
        h = self.pre_norm.forward(hidden_states)
        gate, up = self.gate_proj.forward(h, loras), self.up_proj.forward(h, loras)
        h = self.down_proj.forward(self.act(gate) * up, loras)
        if self.post_norm is not None:
            h = self.post_norm.forward(h)
        return torch.add(hidden_states, h, alpha=self.residual_scale)
