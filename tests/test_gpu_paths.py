"""Python paths that only run on a CUDA machine, checked on the CPU with torch.cuda faked where needed."""

from __future__ import annotations

import types

import pytest
import torch

from exllamav2 import ext
from exllamav2.exllamav2_ext import build


@pytest.fixture
def fake_extension(monkeypatch):
    """ext.load_extension() returns a stand-in module; per-GPU capability decisions start afresh."""
    module = types.ModuleType(build.EXT_NAME)
    monkeypatch.setattr(ext, "load_extension", lambda: module)
    monkeypatch.setattr(ext, "_capability_ok", {})
    return module


def test_extension_is_not_used_on_gpus_it_has_no_machine_code_for(fake_extension, monkeypatch):
    # a mixed rig: cuda:0 an Ampere card, cuda:1 a Volta card (nvcc 13 cannot target sm_70; the README
    # promises that older GPUs run the PyTorch path instead of failing with "no kernel image")
    capabilities = {0: (8, 6), 1: (7, 0), 2: (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capabilities[index])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert ext.kernels_for("cuda:0") is fake_extension
    assert ext.kernels_for(torch.device("cuda", 2)) is fake_extension
    assert ext.kernels_for("cuda:1") is None
    assert ext.kernels_for("cuda") is None                     # the current device, cuda:1
    assert ext.kernels_for("cpu") is None
    assert build.MIN_CAPABILITY == (7, 5)


def test_capability_is_read_once_per_gpu(fake_extension, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: calls.append(index) or (6, 1))
    for _ in range(3):
        assert ext.kernels_for("cuda:0") is None
    assert calls == [0]


def test_unreadable_capability_refuses_nothing(fake_extension):
    # torch without CUDA (as on this machine) cannot report a capability: the loader decides alone
    if torch.cuda.is_available():
        pytest.skip("needs a torch that cannot query CUDA devices")
    assert ext.kernels_for("cuda:0") is fake_extension
