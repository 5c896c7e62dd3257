"""The Qwen2-VL / Qwen2.5-VL vision transformer.

Patches (qwen_preprocess.py) are embedded by one linear map (the checkpoint's Conv3d with stride = kernel), rotated
by a 2-D RoPE (half the rotary frequencies follow the patch's row, half its column), and run through pre-norm
blocks whose attention is non-causal and block-diagonal: over the whole image, or (Qwen2.5-VL, outside
fullatt_block_indexes) over windows of window_size pixels. Attention goes through the attention plan, like the
text model's (tower.attend_blocks). The merger (projector.py) then gives one text-model embedding per
merge_size x merge_size patches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .projector import NORM_EPS, ExLlamaV2MultimodalProjector
from .qwen_preprocess import QwenImageSettings, preprocess_qwen
from .tower import ACT, ExLlamaV2VisionTower, attend_blocks, rotate_half


def window_partition(grid_h: int, grid_w: int, merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """(order of the merged units, window by window; patches per window) for one image of grid_h x grid_w patches:
    windows of `window` x `window` merged units tile the grid row-major, units inside a window row-major."""
    gh, gw = grid_h // merge, grid_w // merge
    units = torch.arange(gh * gw).view(gh, gw)
    order, lengths = [], []
    for r in range(0, gh, window):
        for c in range(0, gw, window):
            block = units[r:r + window, c:c + window].reshape(-1)
            order.append(block)
            lengths.append(block.numel() * merge * merge)
    return torch.cat(order), lengths


def vision_rope(config: Any, grid_h: int, grid_w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (N, head_dim) of each patch in the processor's order (merge blocks adjacent)."""
    m, dim = config.vision_spatial_merge_size, config.vision_head_dim
    rows = torch.arange(grid_h).view(-1, 1).expand(grid_h, grid_w)
    cols = torch.arange(grid_w).view(1, -1).expand(grid_h, grid_w)

    def block_major(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(grid_h // m, m, grid_w // m, m).transpose(1, 2).reshape(-1)

    half = dim // 2
    inv = 1.0 / config.vision_rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half)
    freqs = torch.cat((block_major(rows)[:, None] * inv, block_major(cols)[:, None] * inv), dim=-1)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


class Tower(ExLlamaV2VisionTower):
    def _setup(self) -> None:
        self.projector = ExLlamaV2MultimodalProjector(self.config, self.family, self.prefix)
        self.settings = QwenImageSettings.from_config(self.config)
        self.blocks: list[dict[str, torch.Tensor]] = []
        self.patch_w: torch.Tensor | None = None

    # loading -------------------------------------------------------------------------------

    def _block_shapes(self, i: int) -> dict[str, tuple]:
        cfg, key = self.config, f"{self.prefix}blocks.{i}"
        w, inter = cfg.vision_hidden_size, cfg.vision_intermediate_size
        shapes = {f"{key}.attn.qkv.weight": (3 * w, w), f"{key}.attn.qkv.bias": (3 * w,),
                  f"{key}.attn.proj.weight": (w, w), f"{key}.attn.proj.bias": (w,)}
        for norm in ("norm1", "norm2"):
            shapes[f"{key}.{norm}.weight"] = (w,)
            if self.family.norm == "layernorm":
                shapes[f"{key}.{norm}.bias"] = (w,)
        *ins, out = self.family.mlp
        for name in ins:
            shapes[f"{key}.mlp.{name}.weight"], shapes[f"{key}.mlp.{name}.bias"] = (inter, w), (inter,)
        shapes[f"{key}.mlp.{out}.weight"], shapes[f"{key}.mlp.{out}.bias"] = (w, inter), (w,)
        return shapes

    def _load_steps(self) -> list[Callable[[], None]]:
        self.blocks = []
        return [self._load_patch_embed, *[lambda i=i: self.blocks.append(self._load_block(i))
                                          for i in range(self.config.vision_num_layers)],
                lambda: self.projector.load(self._get)]

    def _load_patch_embed(self) -> None:
        cfg = self.config
        p = cfg.vision_patch_size["height"]
        shape = (cfg.vision_hidden_size, cfg.vision_in_channels, cfg.vision_temporal_patch_size, p, p)
        self.patch_w = self._get(f"{self.prefix}patch_embed.proj.weight", shape).reshape(shape[0], -1)

    def _load_block(self, i: int) -> dict[str, torch.Tensor]:
        key = f"{self.prefix}blocks.{i}."
        return {name.removeprefix(key): self._get(name, shape) for name, shape in self._block_shapes(i).items()}

    def _drop(self) -> None:
        self.blocks, self.patch_w = [], None
        self.projector.unload()

    # forward -------------------------------------------------------------------------------

    def _norm(self, x: torch.Tensor, blk: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        if self.family.norm == "layernorm":
            return self.ops.layer_norm(x, blk[f"{name}.weight"], blk[f"{name}.bias"], NORM_EPS)
        return self.ops.rms_norm(x, blk[f"{name}.weight"], NORM_EPS)

    def _mlp(self, x: torch.Tensor, blk: dict[str, torch.Tensor]) -> torch.Tensor:
        act = ACT[self.config.vision_hidden_act]
        *ins, out = self.family.mlp

        def lin(name: str, h: torch.Tensor) -> torch.Tensor:
            return F.linear(h, blk[f"mlp.{name}.weight"], blk[f"mlp.{name}.bias"])

        h = act(lin(ins[0], x)) if len(ins) == 1 else act(lin(ins[0], x)) * lin(ins[1], x)
        return lin(out, h)

    def _block(self, x: torch.Tensor, blk: dict[str, torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
               lengths: list[int]) -> torch.Tensor:
        n, heads, dim = x.shape[0], self.config.vision_num_attention_heads, self.config.vision_head_dim
        h = self._norm(x, blk, "norm1")
        q, k, v = F.linear(h, blk["attn.qkv.weight"], blk["attn.qkv.bias"]).view(n, 3, heads, dim).unbind(1)
        q, k = rotate_half(q, cos, sin), rotate_half(k, cos, sin)
        o = attend_blocks(self.backend, q, k, v, lengths, dim ** -0.5).reshape(n, heads * dim)
        x = x + F.linear(o, blk["attn.proj.weight"], blk["attn.proj.bias"])
        return x + self._mlp(self._norm(x, blk, "norm2"), blk)

    @torch.inference_mode()
    def forward(self, patches: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """One image's patches (qwen_preprocess.py) -> its embeddings (grid_h * grid_w / merge^2, text hidden size)."""
        self._check_loaded()
        cfg, (t, gh, gw) = self.config, grid
        if t != 1:
            raise ValueError(f"only still images (one temporal patch) are supported, got a grid of {t} frames")
        m = cfg.vision_spatial_merge_size
        x = F.linear(patches.to(self.device, self.dtype), self.patch_w)
        cos, sin = (c.unsqueeze(1) for c in vision_rope(cfg, gh, gw, self.device))     # (N, 1, head_dim)
        full, windows = [gh * gw], []
        order = None
        if self.family.windowed:
            order, lengths = window_partition(gh, gw, m, cfg.vision_window_size // m // cfg.vision_patch_size["height"])
            patch_order = (order.view(-1, 1) * m * m + torch.arange(m * m)).view(-1).to(self.device)
            x, cos, sin = x[patch_order], cos[patch_order], sin[patch_order]
            windows = lengths
        for i, blk in enumerate(self.blocks):
            windowed = order is not None and i not in cfg.vision_fullatt_block_indexes
            x = self._block(x, blk, cos, sin, windows if windowed else full)
        y = self.projector.forward(x, self.ops)
        return y if order is None else y[torch.argsort(order).to(self.device)]

    def _embed(self, image: Any, tokenizer: Any) -> dict[str, Any]:
        """The image block the HF processor writes: <|vision_start|>, one id per merged patch, <|vision_end|>;
        the image's grid goes with it for the text model's MRoPE positions."""
        patches, (t, gh, gw) = preprocess_qwen(image, self.settings)
        m = self.config.vision_spatial_merge_size
        return {"embeddings": self.forward(patches, (t, gh, gw)), "pre_ids": [self.config.vision_start_token_id],
                "post_ids": [self.config.vision_end_token_id], "mrope_grid": (t, gh // m, gw // m)}
