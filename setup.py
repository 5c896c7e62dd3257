"""Adds the exllamav2_ext CUDA extension to the build when it can be compiled here; the project metadata is
in pyproject.toml.

The extension is built ahead of time only when torch is importable with CUDA, nvcc is found and
EXLLAMA_NOCOMPILE is unset (or 0). Otherwise (a CPU torch, no toolkit, or pip's build isolation, where torch
is absent) this is a pure-Python install and exllamav2.ext builds the extension just in time on the first
CUDA machine that uses it. TORCH_CUDA_ARCH_LIST is respected; unset, it defaults to build.DEFAULT_ARCH_LIST.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import MutableMapping
from pathlib import Path
from types import ModuleType

from setuptools import setup

ROOT = Path(__file__).resolve().parent
log = logging.getLogger("exllamav2.setup")


def load_build_config() -> ModuleType:
    """exllamav2/exllamav2_ext/build.py, loaded by path: importing the package would need torch."""
    path = ROOT / "exllamav2" / "exllamav2_ext" / "build.py"
    spec = importlib.util.spec_from_file_location("exllamav2_ext_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_args(environ: MutableMapping[str, str]) -> tuple[dict, str]:
    """(keyword arguments for setup(), what was decided and why). Empty arguments: pure-Python install.
    Sets CUDA_HOME and TORCH_CUDA_ARCH_LIST in `environ` when unset and the extension is built."""
    cfg = load_build_config()
    if cfg.nocompile(environ):
        return {}, f"{cfg.NOCOMPILE_VAR} is set: not building {cfg.EXT_NAME}"
    try:
        import torch
    except ImportError:
        return {}, (
            f"torch is not importable (pip's build isolation hides it): not building {cfg.EXT_NAME}; "
            f"it is built just in time on first use, or install with --no-build-isolation to build it now"
        )
    if torch.version.cuda is None:
        return {}, f"torch {torch.__version__} has no CUDA support: not building {cfg.EXT_NAME}"
    cuda_home = cfg.find_cuda_home(environ)
    if cuda_home is None:
        return {}, f"nvcc not found (set CUDA_HOME): not building {cfg.EXT_NAME}"
    environ.setdefault("CUDA_HOME", cuda_home)
    environ.setdefault("TORCH_CUDA_ARCH_LIST", cfg.DEFAULT_ARCH_LIST)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    extension = CUDAExtension(
        cfg.EXT_NAME,
        cfg.sources(ROOT),
        include_dirs=[str(cfg.SOURCE_DIR)],
        extra_compile_args={"cxx": cfg.CXX_FLAGS, "nvcc": cfg.NVCC_FLAGS},
    )
    return (
        {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}},
        f"building {cfg.EXT_NAME} for {environ['TORCH_CUDA_ARCH_LIST']} with {cuda_home}",
    )


if __name__ == "__main__":
    kwargs, decision = extension_args(os.environ)
    log.warning("exllamav2 setup: %s", decision)
    setup(**kwargs)
