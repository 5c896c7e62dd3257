"""Shared fixtures: tiny random HuggingFace models saved as safetensors directories.

The reference for every model-level test is transformers itself (fp32, eager attention) running the
same weights. Weights are rounded to fp16 before saving, so both sides see identical values.
"""

from __future__ import annotations

import os
import shutil
import types

import pytest
import torch

import exllamav2.ext as ext
from tests.fakes import forget_fake_modules, use_fakes
from tests.cpu_fixtures import isa, layer_path, threads  # noqa: F401  (fixtures of the CPU kernel tests)
from tests.tiny_models import ARCH_SPECS, build_tiny_model, write_tokenizer


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one")
    # The test tensors are tiny: extra threads only add synchronisation, which on a loaded machine
    # made small ops ~200x slower. Subprocesses (chat.py tests) inherit the variable.
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # float32 on every CPU, so the tolerances against transformers hold whatever the machine (the bf16 default
    # of CPUs with bf16 units has its own tests, test_cpu_bf16.py)
    os.environ["EXLLAMA_CPU_DTYPE"] = "float32"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """tiny_model_factory(arch) -> (model_dir, hf_model); built once per architecture per session."""
    built: dict[str, tuple] = {}

    def make(arch: str):
        if arch not in built:
            built[arch] = build_tiny_model(arch, tmp_path_factory.mktemp(arch))
        return built[arch]

    return make


@pytest.fixture
def model_copy(tiny_model_factory, tmp_path):
    """A writable copy of the tiny Llama's directory, for tests that damage it."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_factory("llama")[0], dst)
    return dst


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(model_dir, hf_model): the tiny Llama with a 250-id BPE tokenizer, for tests that encode text."""
    model_dir = tmp_path_factory.mktemp("tiny_llama_tok")
    _, hf = build_tiny_model("llama", model_dir)
    write_tokenizer(model_dir)
    return model_dir, hf


@pytest.fixture(scope="session")
def emulated_extension():
    """exllamav2_ext built for the CPU on the CUDA emulator (tests/cuda_emu): the kernels run on CPU tensors."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler to build the emulated extension")
    from tests import cuda_emu

    return cuda_emu.load()


@pytest.fixture(scope="session", params=[pytest.param("cuda", marks=pytest.mark.cuda), "emulated"])
def real_extension(request) -> tuple[types.ModuleType, str]:
    """(module, device): exllamav2_ext on a GPU, or the same sources on the CUDA emulator taking CPU tensors."""
    if request.param == "emulated":
        return request.getfixturevalue("emulated_extension"), "cpu"
    module = ext.load_extension()
    assert module is not None, f"the extension must load on a CUDA machine: {ext.unavailable_reason()}"
    return module, "cuda"


@pytest.fixture
def fakes(monkeypatch):
    """fakes(folder): put the fake packages of tests/fakes/<folder> (flash_attn, xformers) on sys.path."""
    yield lambda folder: use_fakes(monkeypatch, folder)
    forget_fake_modules()


@pytest.fixture(params=sorted(ARCH_SPECS))
def arch(request) -> str:
    return request.param
