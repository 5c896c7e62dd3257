"""ExLlamaV2VisionTower: upstream's vision API (load / load_gen / unload, get_image_embeddings), one class for
every family. `ExLlamaV2VisionTower(config)` builds the family's own tower (families.py names the module), so
what a family does differently lives in its module; reading the tower's tensors (shape-checked, every one of
them used), placement, progress reporting and the image-to-embedding step are here, shared.

The tower runs in FP16 on the first GPU, as upstream, and in fp32 on the CPU, like the text model there.
"""

from __future__ import annotations

import importlib
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
from .families import VisionFamily, family_of, find_prefix

log = logging.getLogger(__name__)

ACT = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "silu": F.silu, "gelu": F.gelu,
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


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The towers' 2-D RoPE applied in fp32 (cos/sin hold each patch's row and column angles, halves repeated)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class ExLlamaV2VisionTower:
    """Subclasses (one per family module) implement _setup, _load_steps, _drop, forward and _embed."""

    family: VisionFamily

    def __new__(cls, config: Any) -> "ExLlamaV2VisionTower":
        if cls is ExLlamaV2VisionTower:
            family = family_of(config)
            cls = importlib.import_module(f"{__package__}.{family.module}").Tower
        return super().__new__(cls)

    def __init__(self, config: Any) -> None:
        """The vision tower of a prepared vision model's config (config.vision_model_type set); a ValueError
        naming the model for any other."""
        self.config = config
        self.family = family_of(config)
        if config.index is None:
            raise ValueError("ExLlamaV2VisionTower needs a config prepared with its tensors (not no_tensors=True)")
        self.prefix = find_prefix(self.family, config.index.keys())
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.backend = self.ops = None
        self.loaded = False
        self._read: set[str] = set()
        self._setup()

    # what a family module provides -----------------------------------------------------------

    def _setup(self) -> None:
        """Family state made at construction (projector, image settings)."""
        raise NotImplementedError

    def _load_steps(self) -> list[Callable[[], None]]:
        """The load, as steps reported one by one to the progress callbacks; each reads tensors with _get."""
        raise NotImplementedError

    def _drop(self) -> None:
        """Release the loaded weights."""
        raise NotImplementedError

    def _embed(self, image: Any, tokenizer: Any) -> dict[str, Any]:
        """One image -> ExLlamaV2MMEmbedding's keyword arguments (embeddings, pre_ids, post_ids, ...); `tokenizer`
        (the caller's, possibly None) encodes any plain text of the family's image block."""
        raise NotImplementedError

    def owned_prefixes(self) -> tuple[str, ...]:
        """Checkpoint name prefixes of the tensors the tower (and its projector) must use, every one of them."""
        return (self.prefix,)

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
        self._read = set()
        self.ops = build_ops(self.device, self.dtype)
        self.backend = resolve_attention(_VisionNeeds(self.config), [self.device],
                                         dtype=self.dtype).backend_for(self.device)
        steps = self._load_steps()
        for i, step in enumerate(steps):
            yield from _report(callback, callback_gen, i, len(steps))
            step()
        self._check_all_read()
        self.loaded = True
        log.info("loaded the %s vision tower on %s", self.family.name, self.device)
        yield from _report(callback, callback_gen, len(steps), len(steps))

    def _check_all_read(self) -> None:
        owned = self.owned_prefixes()
        unread = sorted(k for k in self.config.index.keys() if k.startswith(owned) and k not in self._read)
        if unread:
            self.unload()
            raise CheckpointError(f"the {self.family.name} vision tower does not use the tensors "
                                  f"{', '.join(unread[:5])}{' ...' if len(unread) > 5 else ''}: the checkpoint is not "
                                  f"the tower config.json describes")

    def unload(self) -> None:
        self._drop()
        self.backend = None
        self.loaded = False

    # images --------------------------------------------------------------------------------

    def _check_loaded(self) -> None:
        if not self.loaded:
            raise RuntimeError("the vision tower is not loaded: call vision_tower.load() first")

    def get_image_embeddings(self, model: Any, tokenizer: Any, image: Any, text_alias: str | None = None,
                             embeddings_cpu: bool = True):
        """An ExLlamaV2MMEmbedding of `image` (a PIL image, a path or encoded bytes) for `model`: its text alias
        stands for the whole image block the family's HF processor writes (markers included)."""
        from ..model.mm_embedding import ExLlamaV2MMEmbedding

        mc = model.config
        if getattr(mc, "vision_model_type", None) != self.family.name or mc.hidden_size != self.config.hidden_size:
            raise ValueError(f"the model ({mc.architecture}, vision_model_type {getattr(mc, 'vision_model_type', None)!r}) "
                             f"is not the text model of this {self.family.name} vision tower")
        self._check_loaded()
        kwargs = self._embed(image, tokenizer)
        emb = kwargs.pop("embeddings")
        return ExLlamaV2MMEmbedding(model, emb.cpu() if embeddings_cpu else emb, text_alias, **kwargs)


def _report(callback: Callable | None, callback_gen: Callable | None, i: int, total: int) -> Generator:
    if callback is not None:
        callback(i, total)
    if callback_gen is not None:
        yield from callback_gen(i, total)
