"""The norms in PyTorch: the twins of exllamav2_ext's rms_norm and layer_norm kernels (same signatures), and the
form that runs the CPU kernels' rms_norm (`cpu_rms_norm`)."""

from __future__ import annotations

from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, accumulated in fp32, returned in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.layer_norm(
        x.float(), (x.shape[-1],), weight.float(), None if bias is None else bias.float(), eps
    ).to(x.dtype)


CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16)     # the activations the CPU kernels take


def cpu_rms_norm(kernels: ModuleType) -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]:
    """`rms_norm` through the CPU kernels (one pass instead of about seven small ops: decode runs ~25 norms per
    token) for float32/bf16 x and a float32 weight (the model's norms), else through the twin."""
    kernel = kernels.rms_norm

    def run(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if weight.dtype == torch.float32 and x.dtype in CPU_KERNEL_DTYPES:
            return kernel(x, weight, eps)
        return rms_norm(x, weight, eps)

    return run
