"""The ops table: for one device and activation dtype, which implementation runs each op that has a compiled
kernel, chosen once (when the model loads) instead of on every call.

exllamav2_ext's kernels take float16 CUDA tensors; the CPU kernels take float32 or bfloat16 activations (and
return them in that dtype) with 16-bit or quantized weights. Where a kernel does not serve (no GPU, no extension, another dtype) the op is its PyTorch
twin, which the tests hold the kernel to. The model kit, the caches and the attention layer call through
this table and never ask the extension loader themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

from .. import ext
from . import kv_cache, norm, rope


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (AVX512-BF16 or AMX-BF16), which oneDNN uses for bf16 GEMMs."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def activation_dtype(device: torch.device, cpu_dtype: str = "auto") -> torch.dtype:
    """The dtype a model's activations, KV cache and attention use on `device`: float16 on a GPU (the kernels and
    Turing are fp16-only); on the CPU `cpu_dtype`, where 'auto' is bfloat16 if the CPU multiplies it natively
    (prefill then runs on oneDNN's bf16 GEMMs), else float32 (exact and, without those units, faster)."""
    if device.type == "cuda":
        return torch.float16
    if cpu_dtype == "auto":
        return torch.bfloat16 if cpu_multiplies_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cpu_dtype]


@dataclass(frozen=True)
class DeviceOps:
    device: torch.device
    dtype: torch.dtype
    cuda: ModuleType | None            # exllamav2_ext on this GPU (quantized matmuls build their QMatrix on it)
    cpu: ModuleType | None             # the CPU kernels (quantized and fp16-weight matmuls from packed weights)
    weight_dtype: torch.dtype          # the dtype FP16 checkpoint weights are kept in here (one copy)
    matvec: Callable | None            # y = x @ w.T for a few rows of x in `dtype` and weights in weight_dtype
    matvec_many: Callable | None       # [x @ w.T for w in ws]: matvec for several weights in one call
    rms_norm: Callable
    layer_norm: Callable
    rotate_qk: rope.RotateQK
    paged_attention: Callable | None   # the fused paged-attention kernel; None: the backend's gather path
    # the CPU's decode attention (one query position, per-row key counts; attn/backends/backend.py says which
    # calls it takes); None: the backend's own path
    decode_attention: Callable | None
    # its paged form (writes the new token into the pages, reads them in place; run_paged_decode_kernel says which
    # calls it takes); None: the backend writes and gathers the pages
    paged_decode_attention: Callable | None
    fp8_to_fp16: Callable
    fp16_to_fp8: Callable
    q_to_fp16: Callable
    fp16_to_q: Callable

    def describe(self) -> str:
        if self.cuda is not None:
            return "exllamav2_ext kernels"
        return ("CPU kernels for matmuls, decode attention, RMS norm and NeoX RoPE, PyTorch for the rest"
                if self.cpu is not None else "PyTorch only")


# CPU activation dtype -> (weight dtype, the CPU kernel multiplying few rows by such weights)
_CPU_MATVEC = {torch.float32: (torch.float16, "linear_f16w"), torch.bfloat16: (torch.bfloat16, "linear_bf16w")}


def build_ops(device: torch.device | str, dtype: torch.dtype) -> DeviceOps:
    """The ops for activations of `dtype` on `device`; may build or load a kernel library (once per process)."""
    device = torch.device(device)
    cuda = ext.kernels_for(device) if dtype == torch.float16 else None
    cpu = ext.cpu_kernels() if device.type == "cpu" and dtype in _CPU_MATVEC else None
    # float32 activations read fp16 weights (half the bytes per decoded token), bfloat16 ones bf16 weights (what
    # the bf16 GEMM takes, so prefill converts nothing); without the CPU kernels weights are kept in `dtype`
    weight_dtype, matvec = (_CPU_MATVEC[dtype][0], getattr(cpu, _CPU_MATVEC[dtype][1])) if cpu else (dtype, None)
    return DeviceOps(
        device=device, dtype=dtype, cuda=cuda, cpu=cpu, weight_dtype=weight_dtype, matvec=matvec,
        matvec_many=cpu.linear_w16_many if cpu else None,
        rms_norm=cuda.rms_norm if cuda else norm.cpu_rms_norm(cpu) if cpu else norm.rms_norm,
        layer_norm=cuda.layer_norm if cuda else norm.layer_norm,
        rotate_qk=rope.kernel_rotate_qk(cuda) if cuda else rope.cpu_rotate_qk(cpu) if cpu else rope.rotate_qk,
        paged_attention=cuda.paged_attention if cuda else None,
        decode_attention=cpu.attn_decode if cpu else None,
        paged_decode_attention=cpu.attn_decode_paged if cpu else None,
        fp8_to_fp16=cuda.fp8_to_fp16 if cuda else kv_cache.fp8_to_fp16,
        fp16_to_fp8=cuda.fp16_to_fp8 if cuda else kv_cache.fp16_to_fp8,
        q_to_fp16=cuda.q_to_fp16 if cuda else kv_cache.q_to_fp16,
        fp16_to_q=cuda.fp16_to_q if cuda else kv_cache.fp16_to_q,
    )
