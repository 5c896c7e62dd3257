"""ExLlamaV2MultimodalProjector: the Qwen2-VL patch merger, which joins each merge_size x merge_size block of the
tower's patch features (normed) into one text-model embedding through a two-layer GELU MLP."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from .families import VisionFamily

NORM_EPS = 1e-6       # the towers' norms (transformers hard-codes it)


class ExLlamaV2MultimodalProjector:
    def __init__(self, config: Any, family: VisionFamily | None = None, prefix: str = "visual.") -> None:
        from .families import family_of

        self.config = config
        self.family = family or family_of(config)
        if self.family.module != "qwen_tower":     # the Pixtral tower's projectors are part of its Tower
            raise ValueError(f"ExLlamaV2MultimodalProjector is Qwen2-VL's merger; the {self.family.name} projector "
                             f"runs inside ExLlamaV2VisionTower(config)")
        self.key = f"{prefix}merger"
        self.norm_w = self.norm_b = self.w1 = self.b1 = self.w2 = self.b2 = None

    def tensor_names(self) -> list[str]:
        names = [f"{self.key}.ln_q.weight", f"{self.key}.mlp.0.weight", f"{self.key}.mlp.0.bias",
                 f"{self.key}.mlp.2.weight", f"{self.key}.mlp.2.bias"]
        return names + ([f"{self.key}.ln_q.bias"] if self.family.norm == "layernorm" else [])

    def load(self, get: Callable[[str, tuple], torch.Tensor]) -> None:
        """`get(name, shape)` reads one checkpoint tensor onto the tower's device, in its dtype."""
        cfg = self.config
        width, merged = cfg.vision_hidden_size, cfg.vision_hidden_size * cfg.vision_spatial_merge_size ** 2
        self.norm_w = get(f"{self.key}.ln_q.weight", (width,))
        if self.family.norm == "layernorm":
            self.norm_b = get(f"{self.key}.ln_q.bias", (width,))
        self.w1, self.b1 = get(f"{self.key}.mlp.0.weight", (merged, merged)), get(f"{self.key}.mlp.0.bias", (merged,))
        self.w2 = get(f"{self.key}.mlp.2.weight", (cfg.vision_out_size, merged))
        self.b2 = get(f"{self.key}.mlp.2.bias", (cfg.vision_out_size,))

    def unload(self) -> None:
        self.norm_w = self.norm_b = self.w1 = self.b1 = self.w2 = self.b2 = None

    def forward(self, x: torch.Tensor, ops: Any) -> torch.Tensor:
        """Patch features (N, width), merge blocks adjacent -> (N / merge^2, out_size)."""
        if self.family.norm == "layernorm":
            x = ops.layer_norm(x, self.norm_w, self.norm_b, NORM_EPS)
        else:
            x = ops.rms_norm(x, self.norm_w, NORM_EPS)
        x = x.reshape(-1, self.w1.shape[1])
        return F.linear(F.gelu(F.linear(x, self.w1, self.b1)), self.w2, self.b2)
