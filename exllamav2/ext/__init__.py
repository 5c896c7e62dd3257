"""Finds the compiled CUDA extension: the prebuilt `exllamav2_ext` module, else (on a CUDA machine) a
just-in-time build with ninja, else none, in which case every op runs its PyTorch twin.

Importing this module does no work and never raises. The first call of `load_extension()` (or the first
access of upstream's `exllamav2.ext.exllamav2_ext` / `ext_c`) decides once per process and logs one line
saying which path is in use; a JIT build logs its progress and is cached by torch across processes.
A failed import or build is recorded as a reason (`unavailable_reason()`), never raised.

The CPU kernels (`cpu_kernels()`) are built once per key (sources, torch, Python ABI, compiler, flags) into
cache_root() (EXLLAMA_CACHE_DIR, default ~/.cache/exllamav2), shared by every venv and checkout, under a lock
that a killed builder cannot keep (see `cached_build`). EXLLAMA_CPU_ISA=avx2 forces the AVX2 kernels; a name
the CPU cannot run is refused.
"""

from __future__ import annotations

import fcntl
import importlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

from ..environment import BUILD_WAIT_VAR, CPU_ISA_VAR, CPU_ISAS, BuildSettings, build_settings, exported
from ..errors import ConfigError
from ..exllamav2_ext import build

log = logging.getLogger(__name__)

# Upstream's stand-in for "no tensor" in extension calls.
none_tensor = torch.empty((1, 1), device="meta")

ANNOUNCE_AFTER_S = 5.0
PROGRESS_INTERVAL_S = 30.0

_lock = threading.Lock()
_resolved = False
_module: ModuleType | None = None
_reason: str | None = None


class _Unavailable(Exception):
    """The extension cannot be used here; the message says why and what would fix it."""


def load_extension(settings: BuildSettings | None = None) -> ModuleType | None:
    """The extension module, or None (then `unavailable_reason()` says why). Decided once per process."""
    global _resolved, _module, _reason
    with _lock:
        if not _resolved:
            try:
                _module, how = _resolve(settings or build_settings())
                log.info("exllamav2_ext: %s", how)
            except _Unavailable as exc:
                _reason = str(exc)
                log.info("exllamav2_ext not in use, running the PyTorch kernels: %s", _reason)
            except Exception as exc:  # a broken build or import must never break exllamav2
                _reason = f"{type(exc).__name__}: {exc}"
                log.warning("exllamav2_ext failed to load, running the PyTorch kernels: %s", _reason)
            _resolved = True
    return _module


def unavailable_reason() -> str | None:
    """Why `load_extension()` returned None (None while undecided or when the extension is loaded)."""
    return _reason


def kernels_for(device: torch.device | str) -> ModuleType | None:
    """The extension when `device` is a CUDA device it was built for (build.MIN_CAPABILITY and newer) and the
    extension loads, else None."""
    device = torch.device(device)
    if device.type != "cuda" or not _capable(device):
        return None
    return load_extension()


_capability_ok: dict[int, bool] = {}


def _capable(device: torch.device) -> bool:
    """Whether `device` reaches build.MIN_CAPABILITY. The extension carries no machine code below it (nvcc 13
    cannot target sm_70, and PTX of a newer arch does not run on an older GPU), so launching a kernel on such a
    GPU fails with "no kernel image is available"; those GPUs run the PyTorch path instead. Decided once per
    GPU. Where the capability cannot be read (torch without CUDA) nothing is refused."""
    try:
        index = torch.cuda.current_device() if device.index is None else device.index
        if index not in _capability_ok:
            capability = tuple(torch.cuda.get_device_capability(index))
            _capability_ok[index] = capability >= build.MIN_CAPABILITY
            if not _capability_ok[index]:
                log.info("cuda:%d is sm_%d%d; exllamav2_ext needs sm_%d%d or newer, so the PyTorch kernels run there",
                         index, *capability, *build.MIN_CAPABILITY)
        return _capability_ok[index]
    except (AssertionError, RuntimeError):
        return True


_cpu_resolved = False
_cpu_module: ModuleType | None = None
COMPLETE_MARKER = "complete"


def cpu_kernels(settings: BuildSettings | None = None) -> ModuleType | None:
    """The CPU kernels (`linear_f16w`, `q_matmul`, `q_dequant`, `set_isa`), built just in time once per process
    where the CPU has AVX2 + F16C and a C++ compiler and ninja are present; else None, with one log line saying
    why. A build that fails never raises; an EXLLAMA_CPU_ISA that is not a known name, or that names instructions
    this CPU lacks, raises ConfigError (the first call comes from the model's build, before any loading).
    Lock-free once decided: this is on every decode step's path."""
    if _cpu_resolved:
        return _cpu_module
    return _resolve_cpu(settings or build_settings())


def _resolve_cpu(settings: BuildSettings) -> ModuleType | None:
    global _cpu_resolved, _cpu_module
    with _lock:
        if not _cpu_resolved:
            isa = _cpu_isa(settings)
            try:
                module = _build_cpu(settings)
            except _Unavailable as exc:
                log.info("%s not in use, FP16 and quantized weights run through PyTorch on the CPU: %s",
                         build.CPU_EXT_NAME, exc)
                module = None
            except Exception as exc:  # a broken build must never break exllamav2
                log.warning("%s failed to build, FP16 and quantized weights run through PyTorch on the CPU: %s: %s",
                            build.CPU_EXT_NAME, type(exc).__name__, exc)
                module = None
            if module is not None:
                log.info("%s: CPU kernels loaded (%s)", build.CPU_EXT_NAME, _set_isa(module, isa))
            _cpu_module, _cpu_resolved = module, True
    return _cpu_module


def _cpu_isa(settings: BuildSettings) -> str:
    if settings.cpu_isa not in CPU_ISAS:
        raise ConfigError(f"{CPU_ISA_VAR}={settings.cpu_isa!r} is not one of {', '.join(CPU_ISAS)}; unset it (or "
                          f"set auto) to let the CPU's flags choose")
    return settings.cpu_isa


def _set_isa(module: ModuleType, isa: str) -> str:
    """The kernels' instruction set, as forced or chosen; a forced one the CPU cannot run is refused (its
    instructions would fault), not replaced by another in silence."""
    try:
        return module.set_isa(isa)
    except RuntimeError as exc:
        raise ConfigError(f"{CPU_ISA_VAR}={isa}: {exc}") from exc


def _build_cpu(settings: BuildSettings) -> ModuleType:
    if settings.nocompile:
        raise _Unavailable(f"{build.NOCOMPILE_VAR} is set")
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        raise _Unavailable(f"the CPU lacks AVX2/F16C (torch reports {capability})")
    if shutil.which(settings.cxx) is None:
        raise _Unavailable(f"no C++ compiler ({settings.cxx}) on PATH")
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise _Unavailable("ninja is not installed (pip install ninja)")
    # the headers' hash in the flags too: torch's own check covers only the .cpp files
    flags = build.CPU_CXX_FLAGS + [f"-DEXL_CPU_SOURCES={build.cpu_source_hash()}"]
    return cached_build(build.CPU_EXT_NAME, build.cpu_sources(), flags, build.CPU_LD_FLAGS, settings)


def _compiler_id(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    return f"{cxx}: {out.splitlines()[0] if out else 'unknown'}"


def cached_build(name: str, sources: list[str], cflags: list[str], ldflags: list[str],
                 settings: BuildSettings | None = None) -> ModuleType:
    """Build (or load the finished build of) a CPU extension in settings.cache_dir/<name>-<key>, the key hashing what
    the build depends on, so every venv and checkout with the same inputs shares one build. One process builds
    at a time, under an flock the kernel drops when its holder dies; a build directory without the marker of a
    finished build (its builder was killed) is cleared and built again."""
    from torch.utils import cpp_extension

    python_tag = f"{sys.implementation.cache_tag}-{sys.abiflags}"
    settings = settings or build_settings()
    key = build.cpu_build_key(torch.__version__, python_tag, _compiler_id(settings.cxx), [*cflags, "|", *ldflags])
    directory = settings.cache_dir / f"{name}-{key}"
    with _build_lock(directory.with_name(directory.name + ".lock"), settings.build_wait_s, directory):
        finished = (directory / COMPLETE_MARKER).exists()
        if not finished:
            shutil.rmtree(directory, ignore_errors=True)       # a killed build's leftovers, torch's lock file included
            directory.mkdir(parents=True)
        (directory / "lock").unlink(missing_ok=True)   # torch's own build lock: stale if left, as we hold ours
        what = f"loading {name} from {directory}" if finished else f"building {name} (CPU kernels) in {directory}"
        with _progress(what):
            module = cpp_extension.load(name=name, sources=sources, extra_cflags=cflags, extra_ldflags=ldflags,
                                        build_directory=str(directory), verbose=log.isEnabledFor(logging.DEBUG))
        (directory / COMPLETE_MARKER).write_text(f"{torch.__version__}\n")
    return module


@contextmanager
def _build_lock(path: Path, wait_s: float, directory: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path`. A holder that dies releases it with its process, so a killed build
    cannot block later ones; a live holder is waited for at most `wait_s` seconds, then the error says whom and
    what to delete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start = time.monotonic()
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                holder = path.read_text().strip() or "another process"
                if waited > wait_s:
                    raise _Unavailable(
                        f"waited {waited:.0f} s for {holder} to finish building {directory}; if no such build is "
                        f"running, delete {path} and {directory} (or raise {BUILD_WAIT_VAR})"
                    ) from None
                if not announced:
                    log.warning("waiting for %s, which is building %s", holder, directory)
                    announced = True
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)      # releases the lock


def __getattr__(name: str):
    # upstream code does `from exllamav2.ext import exllamav2_ext as ext_c`
    if name in ("exllamav2_ext", "ext_c"):
        return load_extension()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _resolve(settings: BuildSettings) -> tuple[ModuleType, str]:
    prebuilt_problem = ""
    try:
        module = importlib.import_module(build.EXT_NAME)
        return module, f"prebuilt module loaded from {module.__file__}"
    except ModuleNotFoundError as exc:
        if exc.name != build.EXT_NAME:
            prebuilt_problem = f"the prebuilt module needs {exc.name}, which is missing; "
    except ImportError as exc:
        hint = " (built against another torch: reinstall exllamav2 for this torch)" if "undefined symbol" in str(exc) else ""
        prebuilt_problem = f"the prebuilt module does not import: {exc}{hint}; "

    if settings.nocompile:
        raise _Unavailable(f"{prebuilt_problem}{build.NOCOMPILE_VAR} is set, so no just-in-time build")
    if not torch.cuda.is_available():
        raise _Unavailable(f"{prebuilt_problem}no CUDA device (torch {torch.__version__})")
    if torch.version.hip:
        raise _Unavailable(f"{prebuilt_problem}ROCm is not supported by these kernels")
    return _jit_build(settings), f"{prebuilt_problem}built just in time"


def _jit_build(settings: BuildSettings | None = None) -> ModuleType:
    settings = settings or build_settings()
    cuda_home = build.find_cuda_home(settings.environ)
    if cuda_home is None:
        raise _Unavailable(
            f"nvcc not found: install the CUDA {torch.version.cuda} toolkit and set CUDA_HOME, or install a "
            f"prebuilt exllamav2 wheel"
        )
    with exported(CUDA_HOME=cuda_home):    # read by torch.utils.cpp_extension at import
        from torch.utils import cpp_extension

    # ...but only at its first import: if something imported it earlier, its guess (None, or the folder around
    # an nvcc wrapper script) would stand, so hand it the toolkit found here
    cpp_extension.CUDA_HOME = cuda_home

    if not cpp_extension.is_ninja_available():
        raise _Unavailable("ninja is not installed (pip install ninja)")
    arch = settings.cuda_arch_list or build.arch_list_for(
        [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())],
        torch.cuda.get_arch_list(),
    )
    with exported(CUDA_HOME=cuda_home, TORCH_CUDA_ARCH_LIST=arch), _progress(f"building exllamav2_ext for {arch} with {cuda_home}"):
        return cpp_extension.load(
            name=build.EXT_NAME,
            sources=build.sources(),
            extra_include_paths=[str(build.SOURCE_DIR)],
            extra_cflags=build.CXX_FLAGS,
            extra_cuda_cflags=build.NVCC_FLAGS,
            verbose=log.isEnabledFor(logging.DEBUG),
        )


@contextmanager
def _progress(what: str) -> Iterator[None]:
    """Explain a slow build: after ANNOUNCE_AFTER_S (a cached build loads faster) say what is happening, then
    log a heartbeat every PROGRESS_INTERVAL_S and the total time. Warnings, so that a minutes-long first model
    load is explained even where logging is not configured."""
    start = time.monotonic()
    done = threading.Event()
    announced = threading.Event()

    def beat() -> None:
        if done.wait(ANNOUNCE_AFTER_S):
            return
        announced.set()
        log.warning("%s (first use; cached afterwards, typically 1-3 minutes)", what)
        while not done.wait(PROGRESS_INTERVAL_S):
            log.warning("still %s: %.0f s", what, time.monotonic() - start)

    thread = threading.Thread(target=beat, name="exllamav2-ext-build", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        if announced.is_set():
            log.warning("%s: finished after %.0f s", what, time.monotonic() - start)
