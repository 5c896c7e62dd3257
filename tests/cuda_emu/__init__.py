"""The exllamav2_ext extension built for the CPU on top of a CUDA emulator, for tests on machines without a GPU.

The kernel sources and the binding layer are compiled unchanged except for two mechanical rewrites of the
.cu files that a C++ compiler needs: `kernel<<<grid, block, smem, stream>>>(args)` becomes a call to the
emulator's launcher, and `extern __shared__` arrays become the launch's dynamic shared memory. Headers in
include/ stand in for cuda_runtime.h, cuda_fp16.h and the two c10/cuda headers the bindings use; emu.h says
what is and is not modelled. The result is a module with the extension's functions taking CPU tensors.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import ModuleType

from exllamav2.exllamav2_ext import build

HERE = Path(__file__).resolve().parent
INCLUDE = HERE / "include"
NAME = "exllamav2_ext_emulated"
CXX_FLAGS = ["-O2", "-std=c++17", "-ffp-contract=off", "-fno-strict-aliasing", "-Wno-unknown-pragmas"]

_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]\s*;")
_LAUNCH = re.compile(r"<<<")


def _balanced(text: str, start: int, open_ch: str, close_ch: str) -> int:
    """Index just past the bracket that closes text[start] (an open_ch)."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_ch:
            depth += 1
        elif text[i] == close_ch:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {open_ch}{close_ch} from offset {start}")


def _kernel_start(text: str, end: int) -> int:
    """Start of the kernel expression `name` or `name<T, ...>` that ends at text[end]."""
    i = end
    if text[i - 1] == ">":                                  # template arguments: walk back to their '<'
        depth = 0
        while True:
            i -= 1
            depth += {">": 1, "<": -1}.get(text[i], 0)
            if depth == 0:
                break
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_:"):
        i -= 1
    return i


def rewrite_cuda(text: str) -> str:
    """A .cu file as C++ for the emulator."""
    text = _EXTERN_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(emu::dynamic_smem());", text)
    while (m := _LAUNCH.search(text)) is not None:
        k0 = _kernel_start(text, m.start())
        cfg_end = text.index(">>>", m.end())
        args_start = cfg_end + 3
        args_end = _balanced(text, args_start, "(", ")")
        kernel, cfg, args = text[k0 : m.start()], text[m.end() : cfg_end], text[args_start + 1 : args_end - 1]
        text = text[:k0] + f"emu::launch([&] {{ {kernel}({args}); }}, {cfg})" + text[args_end:]
    return text


def _write_if_changed(path: Path, content: str) -> None:
    # unchanged files keep their timestamps, so ninja rebuilds only what changed
    if not path.exists() or path.read_text() != content:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)


def mirror(dest: Path) -> list[str]:
    """Copy the extension's sources into dest, .cu files rewritten to .cu.cpp; returns the sources to compile."""
    sources = []
    for src in sorted(build.SOURCE_DIR.glob("*.[ch]*")) + sorted((build.SOURCE_DIR / "cuda").iterdir()):
        rel = src.relative_to(build.SOURCE_DIR)
        text = src.read_text()
        if src.suffix == ".cu":
            out = dest / rel.with_suffix(".cu.cpp")
            _write_if_changed(out, rewrite_cuda(text))
            sources.append(str(out))
        else:
            out = dest / rel
            _write_if_changed(out, text)
            if src.suffix == ".cpp":
                sources.append(str(out))
    return sources


def load(build_root: Path | None = None, verbose: bool = False) -> ModuleType:
    """Build (once, then cached) and import the emulated extension. Raises when there is no C++ compiler."""
    from torch.utils import cpp_extension

    root = build_root or Path(os.environ.get("EXLLAMA_EMU_BUILD_DIR", Path.home() / ".cache" / "exllamav2_cuda_emu"))
    sources = mirror(root / "src")
    out = root / "build"
    out.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=NAME,
        sources=sources,
        extra_include_paths=[str(INCLUDE), str(root / "src")],
        extra_cflags=CXX_FLAGS,
        build_directory=str(out),
        verbose=verbose,
    )
