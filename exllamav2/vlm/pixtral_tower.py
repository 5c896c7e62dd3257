"""The Pixtral vision transformer and its projectors: Mistral 3 (RMSNorm, patch merger, MLP) and Pixtral-12B's HF
layout (Llava's MLP).

Pixels (pixtral_preprocess.py) are cut into patch x patch squares, embedded by one linear map (the checkpoint's
bias-free Conv2d with stride = kernel), RMS-normed (ln_pre), rotated by Pixtral's 2-D RoPE (rows turn with the
even-indexed rotary frequencies, columns with the odd-indexed ones) and run through pre-norm blocks (RMSNorm,
bias-free attention, SwiGLU-style gated MLP) whose attention is non-causal over the whole image, through the
attention plan (tower.attend_blocks). The projector then gives the text model one embedding per patch (Llava) or
per spatial_merge_size^2 patches (Mistral 3's merger, which concatenates each block's patches channel-major, as
torch's unfold does, before its linear map).

In the prompt an image is a grid: each row of (merged) patches is followed by [IMG_BREAK], except the last, which
ends with [IMG_END] instead; the embedding's template writes exactly that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..model.mm_embedding import SLOT
from .pixtral_preprocess import PixtralImageSettings, preprocess_pixtral
from .tower import ACT, ExLlamaV2VisionTower, attend_blocks, rotate_half

NORM_EPS = 1e-5     # the tower's norms (transformers hard-codes it); Mistral 3's projector norm uses the text model's


def pixtral_rope(head_dim: int, theta: float, rows: int, cols: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (rows * cols, head_dim) of each patch, row-major: of the head_dim / 2 frequencies theta^(-2i/dim),
    the even-indexed ones turn with the patch's row, the odd-indexed ones with its column; the two halves of the
    head (rotate-half pairs) repeat them."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    r = torch.arange(rows).repeat_interleave(cols).float()
    c = torch.arange(cols).repeat(rows).float()
    freqs = torch.cat((r[:, None] * inv[0::2], c[:, None] * inv[1::2]), dim=-1)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def image_template(rows: int, cols: int, break_id: int, end_id: int) -> list[int]:
    """PixtralProcessor's image block with a SLOT per embedding: cols slots and [IMG_BREAK] per row, the last row
    ending with [IMG_END]."""
    block = ([SLOT] * cols + [break_id]) * rows
    block[-1] = end_id
    return block


class Tower(ExLlamaV2VisionTower):
    def _setup(self) -> None:
        cfg = self.config
        self.proj_prefix = self.prefix.replace("vision_tower.", "multi_modal_projector.")
        self.settings = PixtralImageSettings.from_config(cfg)
        for name in ("break", "end"):
            if getattr(cfg, f"vision_image_{name}_token_id") is None:
                raise ConfigError(f"{cfg.model_dir}: the tokenizer has no {getattr(cfg, f'vision_image_{name}_token')} "
                                  f"token, which {cfg.architecture}'s image prompts need: put the checkpoint's "
                                  f"tokenizer.json (or tokenizer_config.json) in the model directory")
        self.layers: list[dict[str, torch.Tensor]] = []
        self.w: dict[str, torch.Tensor] = {}          # patch embedding, ln_pre and the projector

    def owned_prefixes(self) -> tuple[str, ...]:
        return (self.prefix, self.proj_prefix)

    # loading -------------------------------------------------------------------------------

    def _layer_shapes(self, i: int) -> dict[str, tuple]:
        cfg, key = self.config, f"{self.prefix}transformer.layers.{i}"
        w, inter = cfg.vision_hidden_size, cfg.vision_intermediate_size
        shapes = {f"{key}.attention.{p}_proj.weight": (w, w) for p in "qkvo"}
        shapes.update({f"{key}.feed_forward.gate_proj.weight": (inter, w),
                       f"{key}.feed_forward.up_proj.weight": (inter, w),
                       f"{key}.feed_forward.down_proj.weight": (w, inter),
                       f"{key}.attention_norm.weight": (w,), f"{key}.ffn_norm.weight": (w,)})
        return shapes

    def _projector_shapes(self) -> dict[str, tuple]:
        cfg, key = self.config, self.proj_prefix
        w, m, out = cfg.vision_hidden_size, cfg.vision_spatial_merge_size, cfg.vision_out_size
        shapes = {}
        if self.family.patch_merger:
            shapes = {f"{key}norm.weight": (w,), f"{key}patch_merger.merging_layer.weight": (w, w * m * m)}
        shapes.update({f"{key}linear_1.weight": (out, w), f"{key}linear_2.weight": (out, out)})
        if cfg.vision_projector_bias:
            shapes.update({f"{key}linear_1.bias": (out,), f"{key}linear_2.bias": (out,)})
        return shapes

    def _load_steps(self) -> list[Callable[[], None]]:
        self.layers = []
        return [self._load_embed, *[lambda i=i: self.layers.append(self._named(self._layer_shapes(i), i))
                                    for i in range(self.config.vision_num_layers)],
                lambda: self.w.update(self._named(self._projector_shapes()))]

    def _named(self, shapes: dict[str, tuple], layer: int | None = None) -> dict[str, torch.Tensor]:
        """Tensors by their names after the layer's (or the projector's) prefix."""
        key = self.proj_prefix if layer is None else f"{self.prefix}transformer.layers.{layer}."
        return {name.removeprefix(key): self._get(name, shape) for name, shape in shapes.items()}

    def _load_embed(self) -> None:
        cfg = self.config
        p, w = cfg.vision_patch_size["height"], cfg.vision_hidden_size
        shape = (w, cfg.vision_in_channels, p, p)
        self.w["patch"] = self._get(f"{self.prefix}patch_conv.weight", shape).reshape(w, -1)
        self.w["ln_pre"] = self._get(f"{self.prefix}ln_pre.weight", (w,))

    def _drop(self) -> None:
        self.layers, self.w = [], {}

    # forward -------------------------------------------------------------------------------

    def _layer(self, x: torch.Tensor, lw: dict[str, torch.Tensor], cos: torch.Tensor,
               sin: torch.Tensor) -> torch.Tensor:
        n, heads, dim = x.shape[0], self.config.vision_num_attention_heads, self.config.vision_head_dim
        h = self.ops.rms_norm(x, lw["attention_norm.weight"], NORM_EPS)
        q, k, v = (F.linear(h, lw[f"attention.{p}_proj.weight"]).view(n, heads, dim) for p in "qkv")
        q, k = rotate_half(q, cos, sin), rotate_half(k, cos, sin)
        o = attend_blocks(self.backend, q, k, v, [n], dim ** -0.5).reshape(n, heads * dim)
        x = x + F.linear(o, lw["attention.o_proj.weight"])
        h = self.ops.rms_norm(x, lw["ffn_norm.weight"], NORM_EPS)
        act = ACT[self.config.vision_hidden_act]
        gated = act(F.linear(h, lw["feed_forward.gate_proj.weight"])) * F.linear(h, lw["feed_forward.up_proj.weight"])
        return x + F.linear(gated, lw["feed_forward.down_proj.weight"])

    def _merge(self, x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """Mistral 3's patch merger: (rows * cols, width) -> (rows * cols / m^2, width), each m x m block's patches
        concatenated channel-major (channel, then row, then column in the block, as torch's unfold)."""
        m, d = self.config.vision_spatial_merge_size, x.shape[-1]
        x = self.ops.rms_norm(x, self.w["norm.weight"], self.config.norm_eps)
        x = x.view(rows // m, m, cols // m, m, d).permute(0, 2, 4, 1, 3).reshape(-1, d * m * m)
        return F.linear(x, self.w["patch_merger.merging_layer.weight"])

    def _project(self, x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        if self.family.patch_merger:
            x = self._merge(x, rows, cols)
        x = ACT[self.config.vision_projector_act](F.linear(x, self.w["linear_1.weight"], self.w.get("linear_1.bias")))
        return F.linear(x, self.w["linear_2.weight"], self.w.get("linear_2.bias"))

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """One image's pixel values (channels, height, width; pixtral_preprocess.py) -> its embeddings, one per
        (merged) patch, row-major: (height * width / (patch * merge)^2, text hidden size)."""
        self._check_loaded()
        cfg = self.config
        p, m = cfg.vision_patch_size["height"], cfg.vision_spatial_merge_size
        c, height, width = pixels.shape
        if height % (p * m) or width % (p * m):
            raise ValueError(f"the image's size {width}x{height} is not a multiple of patch_size * merge ({p * m})")
        rows, cols = height // p, width // p
        patches = pixels.to(self.device, self.dtype).reshape(c, rows, p, cols, p).permute(1, 3, 0, 2, 4)
        x = F.linear(patches.reshape(rows * cols, -1), self.w["patch"])
        x = self.ops.rms_norm(x, self.w["ln_pre"], NORM_EPS)
        cos, sin = (t.unsqueeze(1) for t in pixtral_rope(cfg.vision_head_dim, cfg.vision_rope_theta, rows, cols,
                                                         self.device))      # (N, 1, head_dim)
        for lw in self.layers:
            x = self._layer(x, lw, cos, sin)
        return self._project(x, rows, cols)

    def _embed(self, image: Any, tokenizer: Any) -> dict[str, Any]:
        """The image block PixtralProcessor writes: per row of (merged) patches, one embedding per patch, then
        [IMG_BREAK], the last row ending with [IMG_END]."""
        pixels = preprocess_pixtral(image, self.settings)
        unit = self.settings.unit
        rows, cols = pixels.shape[1] // unit, pixels.shape[2] // unit
        cfg = self.config
        return {"embeddings": self.forward(pixels),
                "template": image_template(rows, cols, cfg.vision_image_break_token_id, cfg.vision_image_end_token_id)}
