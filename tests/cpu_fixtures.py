"""Fixtures shared by the CPU kernel tests: each instruction-set path the CPU can run (AVX2 is forced on AVX-512
CPUs through set_isa), 1 or 2 torch threads, each restored afterwards, and models loaded without their fused
decode blocks (`layer_path`). Import the fixtures into a test module."""

from __future__ import annotations

import pytest
import torch

from exllamav2 import ext
from exllamav2.model import decode_blocks

kernels = ext.cpu_kernels()


def cpu_isas() -> list[str]:
    """The kernel paths this CPU runs: AVX2 always, AVX-512 and AVX512-BF16 where the CPU has them; none without
    the kernels."""
    if kernels is None:
        return []
    previous, out = kernels.isa(), ["avx2"]
    for name in ("avx512", "avx512bf16"):
        try:
            kernels.set_isa(name)
        except RuntimeError:        # the CPU lacks it: that path cannot run here
            break
        out.append(name)
    kernels.set_isa(previous)
    return out


@pytest.fixture(params=cpu_isas())
def isa(request):
    previous = kernels.isa()
    kernels.set_isa(request.param)
    yield request.param
    kernels.set_isa(previous)


@pytest.fixture(params=[1, 2])
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.fixture
def layer_path(monkeypatch):
    """Models loaded in the test run their layers' own decode path, which calls the single-op kernels: the fused
    decode blocks (model/decode_blocks.py; tests/test_decode_blocks.py holds them to this path) are not built."""
    monkeypatch.setattr(decode_blocks, "attention_block", lambda attn: None)
    monkeypatch.setattr(decode_blocks, "mlp_block", lambda mlp: None)
