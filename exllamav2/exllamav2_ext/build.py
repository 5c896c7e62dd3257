"""How the exllamav2_ext CUDA extension is built: shared by setup.py (ahead of time) and exllamav2.ext
(just in time), so both compile the same sources with the same flags.

Standard library only: setup.py loads this file by path, possibly where torch is not installed.
Kernels live in plain-CUDA cuda/*.cu files; only the ext_*.cpp binding layer includes PyTorch headers,
which keeps each .cu compile at seconds instead of minutes per architecture.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

EXT_NAME = "exllamav2_ext"
SOURCE_DIR = Path(__file__).resolve().parent
NOCOMPILE_VAR = "EXLLAMA_NOCOMPILE"
# Ahead-of-time default when TORCH_CUDA_ARCH_LIST is unset: Turing to Hopper, PTX for newer GPUs.
DEFAULT_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0+PTX"
# nvcc 13 cannot target compute capability 7.0 or lower.
MIN_CAPABILITY = (7, 5)
CXX_FLAGS = ["-O3"]
# The CPU kernels (fp16-weight and quantized matrix products): built just in time where the CPU has AVX2 and
# F16C. The AVX2 baseline is the command-line target; kernels_avx512.cpp raises its own target by pragma and
# runs only where the CPU has AVX-512F. -fopenmp makes at::parallel_for parallel (torch's ATen backend is
# OpenMP; the extension binds to the libgomp torch has already loaded, by soname).
CPU_EXT_NAME = "exllamav2_cpu"
CPU_CXX_FLAGS = ["-O3", "-mavx2", "-mf16c", "-mfma", "-fopenmp"]
CPU_LD_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-lineinfo"]

_FALSE = {"", "0", "false", "no", "off"}


def sources(root: Path | None = None) -> list[str]:
    """The binding .cpp files and the kernel .cu files, relative to `root` when given (setuptools wants that)."""
    files = sorted(SOURCE_DIR.glob("*.cpp")) + sorted((SOURCE_DIR / "cuda").glob("*.cu"))
    return [str(f.relative_to(root) if root else f) for f in files]


def cpu_sources() -> list[str]:
    return [str(f) for f in sorted((SOURCE_DIR / "cpu").glob("*.cpp"))]


def cpu_source_hash() -> str:
    """Hash of every file of the CPU kernels, headers included (torch's JIT cache hashes only the .cpp files
    it compiles, so a header edit alone would load a stale build)."""
    h = hashlib.sha256()
    for f in sorted((SOURCE_DIR / "cpu").iterdir()):
        if f.suffix in (".cpp", ".h"):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def cpu_build_key(torch_version: str, python_tag: str, compiler: str, flags: Iterable[str]) -> str:
    """What a CPU kernel build depends on, hashed: the sources (headers included), torch, the Python ABI, the
    compiler and its flags. Builds with the same key are interchangeable, across venvs and checkouts."""
    h = hashlib.sha256()
    for part in (cpu_source_hash(), torch_version, python_tag, compiler, *flags):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def nocompile(environ: Mapping[str, str]) -> bool:
    """EXLLAMA_NOCOMPILE read by value: unset, empty, 0/false/no/off mean compile; anything else means don't."""
    return environ.get(NOCOMPILE_VAR, "").strip().lower() not in _FALSE


def find_cuda_home(environ: Mapping[str, str], which: Callable[[str], str | None] = shutil.which) -> str | None:
    """The CUDA toolkit root: CUDA_HOME or CUDA_PATH, else the toolkit around `nvcc` on PATH, else
    /usr/local/cuda. A candidate counts only if it has bin/nvcc and include/cuda_runtime.h (an nvcc wrapper
    script in /usr/local/bin would otherwise make /usr/local look like a toolkit, and linking fails)."""
    explicit = environ.get("CUDA_HOME") or environ.get("CUDA_PATH")
    if explicit:
        return explicit
    candidates = []
    nvcc = which("nvcc")
    if nvcc:
        candidates += [Path(nvcc).parent.parent, Path(os.path.realpath(nvcc)).parent.parent]
    candidates.append(Path("/usr/local/cuda"))
    for root in candidates:
        if (root / "bin" / "nvcc").exists() and (root / "include" / "cuda_runtime.h").exists():
            return str(root)
    return None


def arch_list_for(capabilities: Iterable[tuple[int, int]], supported: Iterable[str]) -> str:
    """TORCH_CUDA_ARCH_LIST for a just-in-time build on these GPUs: each capability torch supports, newer ones
    lowered to torch's newest architecture, PTX on the last. `supported` is torch.cuda.get_arch_list().
    Raises ValueError when no GPU reaches MIN_CAPABILITY."""
    capabilities = [tuple(c) for c in capabilities]
    sms = [s.removeprefix("sm_") for s in supported if s.startswith("sm_")]
    newest = max((int(s[:-1]), int(s[-1])) for s in sms if s.isdigit()) if sms else None
    caps = set()
    for cap in capabilities:
        if cap < MIN_CAPABILITY:
            continue
        caps.add(min(cap, newest) if newest else cap)
    if not caps:
        raise ValueError(
            f"no GPU with compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
            f"(found {sorted(capabilities)}); the kernels need Turing or newer"
        )
    archs = [f"{major}.{minor}" for major, minor in sorted(caps)]
    archs[-1] += "+PTX"
    return ";".join(archs)
