"""Rotary embedding of queries and keys: the PyTorch twin (`apply_rope`, `rotate_qk`), the form that runs
exllamav2_ext's in-place `rope_` kernel (`kernel_rotate_qk`) and the one running the CPU kernels' `rope_neox`
(`cpu_rotate_qk`). Both take the batch's attention params and one
device's RoPE tables (model/rope.py) and return the rotated q and k."""

from __future__ import annotations

from types import ModuleType
from typing import Callable

import torch

from ..architecture import RopeStyle
from .norm import CPU_KERNEL_DTYPES

RotateQK = Callable[[torch.Tensor, torch.Tensor, object, object, RopeStyle], tuple[torch.Tensor, torch.Tensor]]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: RopeStyle) -> torch.Tensor:
    """Rotate x (B, L, H, D) by cos/sin (B, L, 1, R), R <= D (partial rotary leaves the rest)."""
    if style == RopeStyle.NONE:
        return x
    rot = cos.shape[-1]
    xr, rest = x[..., :rot].float(), x[..., rot:]
    if style == RopeStyle.NEOX:
        x1, x2 = xr.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        out = xr * cos + rotated * sin
    else:  # GPT-J: pairs (x0, x1) share frequency i; tables are laid out as halves, so interleave them
        half = rot // 2
        c = cos[..., :half].repeat_interleave(2, dim=-1)
        s = sin[..., :half].repeat_interleave(2, dim=-1)
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
        out = xr * c + rotated * s
    out = out.to(x.dtype)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def rotate_qk(q: torch.Tensor, k: torch.Tensor, attn_params, tables, style: RopeStyle
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k (B, L, H, D) rotated by the twin; cos/sin are gathered once per forward and shared by the layers."""
    if style == RopeStyle.NONE:
        return q, k
    cos, sin = attn_params.rope(tables)
    return apply_rope(q, cos, sin, style), apply_rope(k, cos, sin, style)


def kernel_rotate_qk(kernels: ModuleType) -> RotateQK:
    """`rotate_qk` through the extension's `rope_`, which rotates contiguous tensors in place and reads whole
    table rows by position (no gather)."""

    def rotate(q: torch.Tensor, k: torch.Tensor, attn_params, tables, style: RopeStyle
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if style == RopeStyle.NONE:
            return q, k
        if attn_params.mrope_positions is not None:      # the kernel reads one table row per token: 1-D only
            return rotate_qk(q, k, attn_params, tables, style)
        tables.reserve(attn_params.positions())
        positions = attn_params.positions_on(q.device)
        q, k = q.contiguous(), k.contiguous()
        neox = style == RopeStyle.NEOX
        kernels.rope_(q, tables.cos, tables.sin, positions, neox)
        kernels.rope_(k, tables.cos, tables.sin, positions, neox)
        return q, k

    return rotate


def cpu_rotate_qk(kernels: ModuleType) -> RotateQK:
    """`rotate_qk` through the CPU kernels' `rope_neox` (one call per tensor instead of about ten small ops) for
    NeoX-style rotation of float32/bf16 q and k with the forward's float32 cos/sin; GPT-J style and other dtypes
    through the twin."""
    kernel = kernels.rope_neox

    def rotate(q: torch.Tensor, k: torch.Tensor, attn_params, tables, style: RopeStyle
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if style != RopeStyle.NEOX or q.dtype not in CPU_KERNEL_DTYPES or k.dtype != q.dtype:
            return rotate_qk(q, k, attn_params, tables, style)
        cos, sin = attn_params.rope(tables)
        if cos.dtype != torch.float32:
            return rotate_qk(q, k, attn_params, tables, style)
        return kernel(q, cos, sin), kernel(k, cos, sin)

    return rotate

