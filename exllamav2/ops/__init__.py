"""Kernel or twin: the per-device ops table (`table.py`) and the PyTorch twins of the compiled kernels
(norms, RoPE, the KV-cache codecs). Depends only on the extension loader."""

from .table import DeviceOps, activation_dtype, build_ops, cpu_multiplies_bf16

__all__ = ["DeviceOps", "activation_dtype", "build_ops", "cpu_multiplies_bf16"]
