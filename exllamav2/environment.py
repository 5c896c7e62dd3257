"""Process settings from the environment, read in one place and handed to the extension loader as arguments.

The attention planner reads its own variables (attn/env.py) and the config EXLLAMA_ALLOW_UNKNOWN_ARCH; nothing
else in the package reads the environment. `exported` is the one place it is written: torch's extension
builder reads CUDA_HOME and TORCH_CUDA_ARCH_LIST from it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .exllamav2_ext import build

CPU_ISA_VAR = "EXLLAMA_CPU_ISA"          # auto (default), avx2, avx512 or avx512bf16: which CPU kernels run
CACHE_VAR = "EXLLAMA_CACHE_DIR"          # where CPU kernel builds are kept (default ~/.cache/exllamav2)
BUILD_WAIT_VAR = "EXLLAMA_BUILD_WAIT_S"  # longest wait for another process's build of the same key
DEFAULT_BUILD_WAIT_S = 900.0
CPU_ISAS = ("auto", "avx2", "avx512", "avx512bf16")


@dataclass(frozen=True)
class BuildSettings:
    nocompile: bool              # EXLLAMA_NOCOMPILE: never build just in time
    cxx: str                     # CXX
    cpu_isa: str                 # EXLLAMA_CPU_ISA, lower-cased ('' counts as auto); checked by the loader
    cache_dir: Path              # EXLLAMA_CACHE_DIR, else $XDG_CACHE_HOME/exllamav2, else ~/.cache/exllamav2
    build_wait_s: float          # EXLLAMA_BUILD_WAIT_S
    cuda_arch_list: str | None   # TORCH_CUDA_ARCH_LIST, when the user set it
    environ: Mapping[str, str]   # the mapping read, for build.find_cuda_home's CUDA_HOME / CUDA_PATH / PATH


def build_settings(environ: Mapping[str, str] | None = None) -> BuildSettings:
    """The extension loader's settings from `environ` (default: the process environment, read now)."""
    env = dict(os.environ if environ is None else environ)
    explicit = env.get(CACHE_VAR)
    cache_dir = Path(explicit) if explicit else Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "exllamav2"
    return BuildSettings(
        nocompile=build.nocompile(env),
        cxx=env.get("CXX", "c++"),
        cpu_isa=env.get(CPU_ISA_VAR, "").strip().lower() or "auto",
        cache_dir=cache_dir,
        build_wait_s=float(env.get(BUILD_WAIT_VAR) or DEFAULT_BUILD_WAIT_S),
        cuda_arch_list=env.get("TORCH_CUDA_ARCH_LIST"),
        environ=env,
    )


@contextmanager
def exported(**values: str) -> Iterator[None]:
    """The variables set in the process environment for the duration, then restored."""
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
