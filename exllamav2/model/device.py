"""Per-GPU context, as upstream's `model.get_device_context(idx)` returns it.

Upstream kept preallocated scratch buffers here; this fork allocates temporaries per call, so a context
holds what is shared by every layer on one GPU: the RoPE tables and the attention backend planned for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model import ExLlamaV2


class ExLlamaV2DeviceContext:
    def __init__(self, model: "ExLlamaV2", device_idx: int) -> None:
        self.model = model
        self.device_idx = device_idx
        self.device = torch.device("cuda", device_idx)
        self.ready = False
        self.sin: torch.Tensor | None = None
        self.cos: torch.Tensor | None = None
        self.backend = None

    def prepare(self, scratch: bool = True) -> None:
        """Build the device's RoPE tables and look up its attention backend. `scratch` is accepted for
        upstream compatibility; there are no scratch buffers to allocate."""
        tables = self.model.rope_tables(self.device)
        self.sin, self.cos = tables.sin, tables.cos
        self.backend = self.model.attn_plan.backend_for(self.device)
        self.ready = True
