"""The MLP: gated, down(act(gate(x)) * up(x)), or plain, down(act(up(x))), with the layer's optional pre- and
post-norms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import decode_blocks
from .linear import ExLlamaV2Linear, forward_many
from .module import ExLlamaV2CompositeModule, ExLlamaV2Module
from .norm import apply_norm, optional_norm

# by the names config.ACTIVATIONS maps config.json's activation names to
ACTIVATION_FUNCTIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


class ExLlamaV2MLP(ExLlamaV2CompositeModule):
    name = "MLP"
    decode_block: decode_blocks.MlpBlock | None = None      # built at load where the layer allows

    def __init__(self, model, layer_key: str, layer_idx: int) -> None:
        super().__init__(model, f"{layer_key}.mlp")            # upstream's module key
        key = layer_key
        cfg, arch = model.config, model.config.arch
        self.layer_idx = layer_idx
        h, i = cfg.hidden_size, cfg.intermediate_size
        fused = f"{key}.{arch.mlp_key}.{arch.fused_gate_up}" if arch.fused_gate_up else None
        self.pre_norm = optional_norm(model, key, arch.mlp_norm)
        self.post_norm = optional_norm(model, key, arch.post_mlp_norm)
        *gate_up, down = arch.mlp_keys
        # a plain MLP (Starcoder 2, Phi-2) has no gate: its input projection is up_proj
        t = arch.transposed_weights
        self.gate_proj = (ExLlamaV2Linear(model, f"{key}.{arch.mlp_key}.{gate_up[0]}", h, i, fused=fused and (fused, 0, i),
                                          transposed=t) if len(gate_up) == 2 else None)
        self.up_proj = ExLlamaV2Linear(model, f"{key}.{arch.mlp_key}.{gate_up[-1]}", h, i, fused=fused and (fused, i, 2 * i),
                                       transposed=t)
        self.down_proj = ExLlamaV2Linear(model, f"{key}.{arch.mlp_key}.{down}", i, h, transposed=t)
        self.act = ACTIVATION_FUNCTIONS[cfg.activation]
        self.residual_scale = cfg.residual_multiplier

    def load(self) -> None:
        super().load()
        self.decode_block = decode_blocks.mlp_block(self)

    def unload(self) -> None:
        super().unload()
        self.decode_block = None

    def submodules(self) -> list[ExLlamaV2Module]:
        return [m for m in (self.pre_norm, self.post_norm, self.gate_proj, self.up_proj, self.down_proj) if m]

    def forward(self, hidden_states: torch.Tensor, loras: list | None = None, **kwargs) -> torch.Tensor:
        block = self.decode_block
        if block is not None and block.takes(hidden_states, loras):
            return block.forward(hidden_states)
        h = apply_norm(self.post_norm, self.project(apply_norm(self.pre_norm, hidden_states), loras))
        return torch.add(hidden_states, h, alpha=self.residual_scale)

    def project(self, h: torch.Tensor, loras: list | None = None) -> torch.Tensor:
        """The MLP of the normed input `h` (no residual)."""
        if self.gate_proj is None:
            return self.down_proj.forward(self.act(self.up_proj.forward(h, loras)), loras)
        gate, up = forward_many((self.gate_proj, self.up_proj), h, loras)
        return self.down_proj.forward(self.act(gate) * up, loras)
