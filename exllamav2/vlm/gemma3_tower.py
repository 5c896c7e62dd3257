"""The Gemma 3 vision tower (SigLIP) and its projector.

SigLIP: the image's patches (gemma3_preprocess.py) embedded by one linear map (the checkpoint's Conv2d with stride
= kernel) plus a learned position embedding per patch, pre-norm encoder layers (LayerNorm with bias, attention
with biases, non-causal over the whole image through the attention plan, an MLP act(fc1) -> fc2), then a final
LayerNorm. The projector averages the patch grid down to mm_tokens_per_image (a square), RMS-norms each token
with Gemma's (1 + weight) and projects it to the text model's width with one matmul.

The image block the processor writes for one image is "\\n\\n<start_of_image>", mm_tokens_per_image image tokens,
"<end_of_image>\\n\\n"; its image tokens attend to each other both ways in the text model (the architecture row's
image_attention).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .gemma3_preprocess import Gemma3ImageSettings, preprocess_gemma3
from .tower import ACT, ExLlamaV2VisionTower, attend_blocks

_TOWER = "vision_tower."
_PROJECTOR = "multi_modal_projector."
_BLANK_LINES = "\n\n"       # the processor's text around the markers


class Tower(ExLlamaV2VisionTower):
    def _setup(self) -> None:
        if self.config.vision_use_head:
            raise ConfigError("config.json's vision_config has vision_use_head: true, but SigLIP's pooling head is "
                              "no part of Gemma 3's image path (its tensors would be left unread); a Gemma 3 "
                              "checkpoint has vision_use_head: false")
        self.settings = Gemma3ImageSettings.from_config(self.config)
        self.projector_prefix = self.prefix[: self.prefix.index(_TOWER)] + _PROJECTOR     # model. or not
        self.layers: list[dict[str, torch.Tensor]] = []
        self.w: dict[str, torch.Tensor] = {}

    def owned_prefixes(self) -> tuple[str, ...]:
        return (self.prefix, self.projector_prefix)

    # loading -------------------------------------------------------------------------------

    def _load_steps(self) -> list[Callable[[], None]]:
        self.layers = []
        return [self._load_embeddings, *[lambda i=i: self.layers.append(self._load_layer(i))
                                         for i in range(self.config.vision_num_layers)], self._load_head]

    def _load_embeddings(self) -> None:
        cfg, key = self.config, f"{self.prefix}embeddings."
        w, p = cfg.vision_hidden_size, cfg.vision_patch_size["height"]
        patches = (cfg.vision_image_size // p) ** 2
        self.w["patch_w"] = self._get(f"{key}patch_embedding.weight", (w, cfg.vision_in_channels, p, p)).reshape(w, -1)
        self.w["patch_b"] = self._get(f"{key}patch_embedding.bias", (w,))
        self.w["positions"] = self._get(f"{key}position_embedding.weight", (patches, w))

    def _load_layer(self, i: int) -> dict[str, torch.Tensor]:
        cfg, key = self.config, f"{self.prefix}encoder.layers.{i}."
        w, inter = cfg.vision_hidden_size, cfg.vision_intermediate_size
        shapes = {"layer_norm1": (w,), "layer_norm2": (w,), "mlp.fc2": (w, inter)}
        shapes |= {f"self_attn.{n}_proj": (w, w) for n in ("q", "k", "v", "out")} | {"mlp.fc1": (inter, w)}
        out = {}
        for name, shape in shapes.items():
            out[f"{name}.weight"] = self._get(f"{key}{name}.weight", shape)
            out[f"{name}.bias"] = self._get(f"{key}{name}.bias", shape[:1])
        return out

    def _load_head(self) -> None:
        """The final LayerNorm and the projector."""
        cfg, w = self.config, self.config.vision_hidden_size
        self.w["post_w"] = self._get(f"{self.prefix}post_layernorm.weight", (w,))
        self.w["post_b"] = self._get(f"{self.prefix}post_layernorm.bias", (w,))
        self.w["proj_norm"] = self._get(f"{self.projector_prefix}mm_soft_emb_norm.weight", (w,))
        self.w["proj"] = self._get(f"{self.projector_prefix}mm_input_projection_weight", (w, cfg.hidden_size))

    def _drop(self) -> None:
        self.layers, self.w = [], {}

    # forward -------------------------------------------------------------------------------

    def _layer(self, x: torch.Tensor, blk: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg, n = self.config, x.shape[0]
        heads, dim, eps = cfg.vision_num_attention_heads, cfg.vision_head_dim, cfg.vision_layer_norm_eps

        def lin(name: str, h: torch.Tensor) -> torch.Tensor:
            return F.linear(h, blk[f"{name}.weight"], blk[f"{name}.bias"])

        h = self.ops.layer_norm(x, blk["layer_norm1.weight"], blk["layer_norm1.bias"], eps)
        q, k, v = (lin(f"self_attn.{name}_proj", h).view(n, heads, dim) for name in ("q", "k", "v"))
        o = attend_blocks(self.backend, q, k, v, [n], dim ** -0.5).reshape(n, heads * dim)
        x = x + lin("self_attn.out_proj", o)
        h = self.ops.layer_norm(x, blk["layer_norm2.weight"], blk["layer_norm2.bias"], eps)
        return x + lin("mlp.fc2", ACT[cfg.vision_hidden_act](lin("mlp.fc1", h)))

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """Patch features (patches, width) -> (mm_tokens_per_image, text hidden size)."""
        cfg = self.config
        grid, side = cfg.vision_image_size // cfg.vision_patch_size["height"], round(cfg.vision_mm_tokens_per_image ** 0.5)
        pooled = F.avg_pool2d(x.t().reshape(1, -1, grid, grid), grid // side).flatten(2)[0].t()    # row-major tokens
        # Gemma's RMS norm, in fp32 with (1 + weight), as transformers computes it whatever the dtype
        xf = pooled.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + cfg.vision_layer_norm_eps)
        normed = (xf * (1.0 + self.w["proj_norm"].float())).to(x.dtype)
        return normed @ self.w["proj"]

    @torch.inference_mode()
    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """One image's patches (gemma3_preprocess.py) -> its embeddings (mm_tokens_per_image, text hidden size)."""
        self._check_loaded()
        x = F.linear(patches.to(self.device, self.dtype), self.w["patch_w"], self.w["patch_b"]) + self.w["positions"]
        for blk in self.layers:
            x = self._layer(x, blk)
        x = self.ops.layer_norm(x, self.w["post_w"], self.w["post_b"], self.config.vision_layer_norm_eps)
        return self._project(x)

    def _embed(self, image: Any, tokenizer: Any) -> dict[str, Any]:
        """The image block Gemma3Processor writes: a blank line, <start_of_image>, the image's tokens,
        <end_of_image>, a blank line; the blank lines as the tokenizer encodes them."""
        if tokenizer is None:
            raise ValueError("Gemma 3's image block holds text (blank lines around the image markers): pass the "
                             "model's tokenizer to get_image_embeddings")
        blank = tokenizer.encode_unspecial(_BLANK_LINES)
        cfg = self.config
        return {"embeddings": self.forward(preprocess_gemma3(image, self.settings)),
                "pre_ids": [*blank, cfg.vision_boi_token_id], "post_ids": [cfg.vision_eoi_token_id, *blank]}
