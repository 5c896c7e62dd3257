"""The CPU kernels' build cache (ext.cached_build): keyed by what the build depends on, built under a lock a dead
builder cannot hold, a killed build's leftovers rebuilt. A tiny pybind11 module stands in for the kernels."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from exllamav2 import ext
from exllamav2.exllamav2_ext import build

REPO = Path(__file__).resolve().parent.parent
needs_compiler = pytest.mark.skipif(shutil.which("c++") is None or shutil.which("ninja") is None,
                                    reason="no C++ compiler or ninja")

TINY = """
#include <pybind11/pybind11.h>
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", [] { return 42; }); }
"""

BUILD = """
import sys
from exllamav2 import ext
module = ext.cached_build("exl_tiny_cache_test", [sys.argv[1]], ["-O0"], [])
print("answer", module.answer())
"""


def test_the_key_follows_every_input():
    base = build.cpu_build_key("2.13.0", "cpython-311-", "c++: gcc 12", ["-O3"])
    assert base == build.cpu_build_key("2.13.0", "cpython-311-", "c++: gcc 12", ["-O3"])   # any venv, checkout
    assert len({base, build.cpu_build_key("2.14.0", "cpython-311-", "c++: gcc 12", ["-O3"]),
                build.cpu_build_key("2.13.0", "cpython-312-", "c++: gcc 12", ["-O3"]),
                build.cpu_build_key("2.13.0", "cpython-311-", "c++: gcc 13", ["-O3"]),
                build.cpu_build_key("2.13.0", "cpython-311-", "c++: gcc 12", ["-O2"])}) == 5


def test_a_live_holder_is_waited_for_with_a_limit(tmp_path):
    lock, directory = tmp_path / "x.lock", tmp_path / "x"
    with ext._build_lock(lock, 5, directory):
        assert lock.read_text().startswith(f"pid {os.getpid()} ")
        with pytest.raises(ext._Unavailable, match=r"waited .* delete .*x\.lock"):
            with ext._build_lock(lock, 0.3, directory):
                pass
    with ext._build_lock(lock, 0.3, directory):       # released on exit
        pass


@needs_compiler
def test_a_build_killed_midway_then_a_load(tmp_path):
    """The first builder is killed (SIGKILL, whole process group) while compiling; the next load takes the lock
    over, clears the half-built directory and builds."""
    src = tmp_path / "tiny.cpp"
    src.write_text(TINY)
    slow = tmp_path / "bin"
    slow.mkdir()
    real = shutil.which("c++")
    # same `c++ --version` (so the same key); compiles wait long enough to be killed
    (slow / "c++").write_text(textwrap.dedent(f"""\
        #!/bin/sh
        case " $* " in *" -c "*) sleep 300;; esac
        exec {real} "$@"
        """))
    (slow / "c++").chmod(0o755)
    env = dict(os.environ, PYTHONPATH=str(REPO), EXLLAMA_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("CXX", None)
    first = subprocess.Popen([sys.executable, "-c", BUILD, str(src)], env=dict(env, PATH=f"{slow}:{env['PATH']}"),
                             start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cache = tmp_path / "cache"
    deadline = time.monotonic() + 120
    while not any(cache.glob("*/build.ninja")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)                                       # ninja is running the (sleeping) compile
    assert first.poll() is None, first.communicate()
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    (directory,) = [d for d in cache.iterdir() if d.is_dir()]
    assert not (directory / ext.COMPLETE_MARKER).exists()

    second = subprocess.run([sys.executable, "-c", BUILD, str(src)], env=dict(env, EXLLAMA_BUILD_WAIT_S="60"),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "answer 42" in second.stdout
    assert (directory / ext.COMPLETE_MARKER).exists()
    again = subprocess.run([sys.executable, "-c", BUILD, str(src)], env=env, capture_output=True, text=True,
                           timeout=300)
    assert "answer 42" in again.stdout and "building" not in again.stderr     # reused, not rebuilt


@needs_compiler
def test_two_environments_and_checkouts_share_one_build(tmp_path):
    """A second virtual environment (its own sys.prefix; torch reached through a .pth file) running a second
    checkout (a copy of the package elsewhere) finds the first one's build: the key holds no path."""
    import venv

    src = tmp_path / "tiny.cpp"
    src.write_text(TINY)
    env = dict(os.environ, EXLLAMA_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("CXX", None)
    first = subprocess.run([sys.executable, "-c", BUILD, str(src)], env=dict(env, PYTHONPATH=str(REPO)),
                           capture_output=True, text=True, timeout=300)
    assert "answer 42" in first.stdout, first.stderr[-3000:]
    (built,) = (tmp_path / "cache").glob("*/*.so")
    stamp = built.stat().st_mtime_ns

    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "exllamav2", checkout / "exllamav2", ignore=shutil.ignore_patterns("__pycache__"))
    other = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(other)
    python = other / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    import torch

    (Path(purelib) / "parent_env.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
    second = subprocess.run([str(python), "-c", BUILD, str(src)], env=dict(env, PYTHONPATH=str(checkout)),
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert "answer 42" in second.stdout, second.stderr[-3000:]
    assert list((tmp_path / "cache").glob("*/*.so")) == [built]     # the same build directory
    assert built.stat().st_mtime_ns == stamp                       # reused, not rebuilt
