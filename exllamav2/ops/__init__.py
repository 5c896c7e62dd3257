"""Kernel or twin: the per-device ops table (`table.py`) and the PyTorch twins of the compiled kernels
(norms, RoPE, the KV-cache codecs). Depends only on the extension loader."""

from .table import DeviceOps, build_ops

__all__ = ["DeviceOps", "build_ops"]
