"""ExLlamaV2VisionTower: the Qwen2-VL / Qwen2.5-VL vision transformer, kept in FP16 (fp32 on the CPU) as upstream.

Patches (see preprocess.py) are embedded by one linear map (the checkpoint's Conv3d with stride = kernel), rotated
by a 2-D RoPE (half the rotary frequencies follow the patch's row, half its column), and run through pre-norm
blocks whose attention is non-causal and block-diagonal: over the whole image, or (Qwen2.5-VL, outside
fullatt_block_indexes) over windows of window_size pixels. Attention goes through the attention plan, like the
text model's, one unmasked batch per block length (attend_blocks). The merger (projector.py) then gives one text-model embedding per merge_size x merge_size patches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from typing import Any

import torch
import torch.nn.functional as F

from ..attn import resolve_attention
from ..attn.backends.metadata import AttnMetadata
from ..errors import CheckpointError
from ..model.module import TensorShapeError
from ..ops import build_ops
from .families import family_of, find_prefix
from .preprocess import QwenImageSettings, preprocess_qwen
from .projector import NORM_EPS, ExLlamaV2MultimodalProjector

log = logging.getLogger(__name__)

_ACT = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "silu": F.silu, "gelu": F.gelu,
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class _VisionNeeds:
    """The config the attention planner reads, for the tower: its head size, no softcap, no window; the
    model's flags (no_flash_attn, attn_backend, ...) pass through."""

    def __init__(self, config: Any) -> None:
        self._config = config
        self.head_dim = config.vision_head_dim
        self.attn_logit_softcapping = None
        self.sliding_window = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


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


def attend_blocks(backend: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int],
                  scale: float) -> torch.Tensor:
    """Block-diagonal non-causal attention of q, k, v (N, heads, dim): each block of consecutive tokens (an image,
    a window) attends within itself. Blocks of one length go through the backend as one batch with no mask, so no
    N x N mask or score matrix is built for a large image."""
    out = torch.empty_like(q)
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0).tolist()
    by_length: dict[int, list[int]] = {}
    for start, length in zip(starts, lengths):
        by_length.setdefault(length, []).append(start)
    for length, first in by_length.items():
        rows = (torch.tensor(first).view(-1, 1) + torch.arange(length)).view(-1).to(q.device)
        qb, kb, vb = (t[rows].view(len(first), length, *t.shape[1:]) for t in (q, k, v))
        meta = AttnMetadata(batch_size=len(first), q_len=length, k_len=length, causal=False)
        out[rows] = backend.attend(qb, kb, vb, meta, scale=scale).reshape(-1, *q.shape[1:])
    return out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class ExLlamaV2VisionTower:
    def __init__(self, config: Any) -> None:
        """The vision tower of a prepared vision model's config (config.vision_model_type set); a ValueError
        naming the model for any other."""
        self.config = config
        self.family = family_of(config)
        if config.index is None:
            raise ValueError("ExLlamaV2VisionTower needs a config prepared with its tensors (not no_tensors=True)")
        self.prefix = find_prefix(self.family, config.index.keys())
        self.projector = ExLlamaV2MultimodalProjector(config, self.family, self.prefix)
        self.settings = QwenImageSettings.from_config(config)
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        # FP16 on a GPU as upstream; on the CPU fp32, like the text model there
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.blocks: list[dict[str, torch.Tensor]] = []
        self.patch_w: torch.Tensor | None = None
        self.backend = self.ops = None
        self.loaded = False

    # loading -------------------------------------------------------------------------------

    def _get(self, name: str, shape: tuple) -> torch.Tensor:
        index = self.config.index
        if not index.has(name):
            raise CheckpointError(f"vision tensor {name!r} is missing from {', '.join(index.files)}")
        if tuple(index.shape(name)) != tuple(shape):
            raise TensorShapeError(f"vision tensor {name!r} has shape {tuple(index.shape(name))}, but config.json's "
                                   f"vision_config implies {tuple(shape)}")
        self._read.add(name)
        return index.get(name).to(self.device, self.dtype)

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

    def load(self, gpu_split: list[float] | None = None, lazy: bool = False, stats: bool = False,
             callback: Callable | None = None, callback_gen: Callable | None = None, progress: bool = False) -> None:
        for _ in self.load_gen(gpu_split, lazy, stats, callback, callback_gen, progress):
            pass

    def load_gen(self, gpu_split: list[float] | None = None, lazy: bool = False, stats: bool = False,
                 callback: Callable | None = None, callback_gen: Callable | None = None,
                 progress: bool = False) -> Generator:
        """Load the tower (ExLlamaV2.load_gen's parameters, as upstream's tower is a model) onto the first GPU, or
        the CPU; reports progress as the model's load does: (i, total) before each part, then (total, total)."""
        if lazy:
            raise ValueError("the vision tower has no lazy (placement-only) load; call load() without lazy")
        cfg = self.config
        total = cfg.vision_num_layers + 2
        self._read: set[str] = set()
        self.ops = build_ops(self.device, self.dtype)
        self.backend = resolve_attention(_VisionNeeds(cfg), [self.device], dtype=self.dtype).backend_for(self.device)
        steps = [self._load_patch_embed, *[lambda i=i: self.blocks.append(self._load_block(i))
                                           for i in range(cfg.vision_num_layers)],
                 lambda: self.projector.load(self._get)]
        self.blocks = []
        for i, step in enumerate(steps):
            if callback is not None:
                callback(i, total)
            if callback_gen is not None:
                yield from callback_gen(i, total)
            step()
        self._check_all_read()
        self.loaded = True
        log.info("loaded the %s vision tower (%d blocks) on %s", self.family.name, cfg.vision_num_layers, self.device)
        if callback is not None:
            callback(total, total)
        if callback_gen is not None:
            yield from callback_gen(total, total)

    def _load_patch_embed(self) -> None:
        cfg = self.config
        p = cfg.vision_patch_size["height"]
        shape = (cfg.vision_hidden_size, cfg.vision_in_channels, cfg.vision_temporal_patch_size, p, p)
        self.patch_w = self._get(f"{self.prefix}patch_embed.proj.weight", shape).reshape(shape[0], -1)

    def _load_block(self, i: int) -> dict[str, torch.Tensor]:
        key = f"{self.prefix}blocks.{i}."
        return {name.removeprefix(key): self._get(name, shape) for name, shape in self._block_shapes(i).items()}

    def _check_all_read(self) -> None:
        unread = sorted(k for k in self.config.index.keys() if k.startswith(self.prefix) and k not in self._read)
        if unread:
            self.unload()
            raise CheckpointError(f"the {self.family.name} vision tower does not use the tensors "
                                  f"{', '.join(unread[:5])}{' ...' if len(unread) > 5 else ''}: the checkpoint is not "
                                  f"the tower config.json describes")

    def unload(self) -> None:
        self.blocks, self.patch_w, self.backend = [], None, None
        self.projector.unload()
        self.loaded = False

    # forward -------------------------------------------------------------------------------

    def _norm(self, x: torch.Tensor, blk: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        if self.family.norm == "layernorm":
            return self.ops.layer_norm(x, blk[f"{name}.weight"], blk[f"{name}.bias"], NORM_EPS)
        return self.ops.rms_norm(x, blk[f"{name}.weight"], NORM_EPS)

    def _mlp(self, x: torch.Tensor, blk: dict[str, torch.Tensor]) -> torch.Tensor:
        act = _ACT[self.config.vision_hidden_act]
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
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        o = attend_blocks(self.backend, q, k, v, lengths, dim ** -0.5).reshape(n, heads * dim)
        x = x + F.linear(o, blk["attn.proj.weight"], blk["attn.proj.bias"])
        return x + self._mlp(self._norm(x, blk, "norm2"), blk)

    @torch.inference_mode()
    def forward(self, patches: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """One image's patches (preprocess.py) -> its embeddings (grid_h * grid_w / merge^2, text hidden size)."""
        if not self.loaded:
            raise RuntimeError("the vision tower is not loaded: call vision_tower.load() first")
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

    def get_image_embeddings(self, model: Any, tokenizer: Any, image: Any, text_alias: str | None = None,
                             embeddings_cpu: bool = True):
        """An ExLlamaV2MMEmbedding of `image` (a PIL image, a path or encoded bytes) for `model`: its text alias
        stands for the whole image block the HF processor writes (<|vision_start|>, one id per merged patch,
        <|vision_end|>), and carries the image's grid for the text model's MRoPE positions."""
        from ..model.mm_embedding import ExLlamaV2MMEmbedding

        mc = model.config
        if getattr(mc, "vision_model_type", None) != self.family.name or mc.hidden_size != self.config.hidden_size:
            raise ValueError(f"the model ({mc.architecture}, vision_model_type {getattr(mc, 'vision_model_type', None)!r}) "
                             f"is not the text model of this {self.family.name} vision tower")
        patches, (t, gh, gw) = preprocess_qwen(image, self.settings)
        emb = self.forward(patches, (t, gh, gw))
        m = self.config.vision_spatial_merge_size
        return ExLlamaV2MMEmbedding(model, emb.cpu() if embeddings_cpu else emb, text_alias,
                                    pre_ids=[self.config.vision_start_token_id],
                                    post_ids=[self.config.vision_end_token_id], mrope_grid=(t, gh // m, gw // m))
