"""convert.py killed at any write resumes from its job file and produces byte-identical output; a full disk
is one clear error and never leaves an output directory that looks like a finished model (issue 18).

Each conversion runs in a subprocess (as a user runs it) on the tiny Llama, with EXLLAMA_NOCOMPILE=1 so
every run takes the same PyTorch path. A small driver wraps exllamav2.conversion.files._write_atomically,
through which every file of the job is written, and at a chosen write either kills the process with
SIGKILL (half-way through the file, or just after it) or fails it as a full disk would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import build_tiny_model, write_tokenizer

REPO = Path(__file__).resolve().parents[1]
ARGS = ["-b", "4", "-r", "8", "-l", "64", "-mr", "4", "-ml", "64"]

DRIVER = r"""
import errno, os, signal, sys
sys.path.insert(0, sys.argv[1])
import convert
from exllamav2.conversion import files

target, nth, mode = sys.argv[2], int(sys.argv[3]), sys.argv[4]
seen = [0]
real = files._write_atomically

def write_half(path, write):
    tmp = path.with_name(path.name + files.TMP_SUFFIX)
    write(tmp)
    data = tmp.read_bytes()
    tmp.write_bytes(data[: len(data) // 2])

def dying(path, write):
    if target in path.name:
        seen[0] += 1
        if seen[0] == nth:
            if mode == "after":
                real(path, write)
            elif mode == "full":
                return real(path, lambda tmp: (write_half(path, write), _full()))
            else:
                write_half(path, write)
            os.kill(os.getpid(), signal.SIGKILL)
    return real(path, write)

def _full():
    raise OSError(errno.ENOSPC, "No space left on device")

files._write_atomically = dying
sys.exit(convert.main(sys.argv[5:]))
"""


def env() -> dict[str, str]:
    return dict(os.environ, EXLLAMA_NOCOMPILE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def convert(*args: str | Path, die: tuple[str, int, str] | None = None) -> subprocess.CompletedProcess:
    if die is None:
        cmd = [sys.executable, str(REPO / "convert.py"), *map(str, args)]
    else:
        cmd = [sys.executable, "-c", DRIVER, str(REPO), die[0], str(die[1]), die[2], *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def looks_finished(directory: Path) -> bool:
    """What a loader needs to take a directory for a model: config.json and safetensors weights."""
    return (directory / "config.json").exists() and any(directory.glob("*.safetensors"))


@pytest.fixture(scope="module")
def fp16(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("resume") / "fp16"
    d.mkdir()
    build_tiny_model("llama", d)
    write_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def fresh(fp16, tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("fresh")
    result = convert("-i", fp16, "-o", root / "work", "-cf", root / "out", *ARGS)
    assert result.returncode == 0, result.stderr
    return files_of(root / "out")


# (file name part, which write of it, how the process dies)
KILLS = [
    ("measure_states", 2, "during"),       # half a checkpoint of hidden states
    ("quant_states", 3, "after"),          # states written, the job file not yet updated
    ("job_new.json", 11, "during"),        # the job file itself (a checkpoint while quantizing)
    ("config.json", 1, "during"),          # the very last file of the model
]


@pytest.mark.parametrize("die", KILLS, ids=[f"{k[0]}#{k[1]}-{k[2]}" for k in KILLS])
def test_killed_conversion_resumes_to_identical_bytes(fp16, fresh, tmp_path, die):
    work, out = tmp_path / "work", tmp_path / "out"
    killed = convert("-i", fp16, "-o", work, "-cf", out, *ARGS, die=die)
    assert killed.returncode == -9, f"the driver never reached {die}:\n{killed.stderr[-2000:]}"
    assert not (out.exists() and looks_finished(out)), sorted(p.name for p in out.iterdir())
    resumed = convert("-o", work, "-res")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = files_of(out)
    assert got.keys() == fresh.keys()
    for name in fresh:
        assert got[name] == fresh[name], f"{name} differs after resuming"


def test_full_disk_is_one_line_and_no_finished_looking_output(fp16, fresh, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    full = convert("-i", fp16, "-o", work, "-cf", out, *ARGS, die=("output-00001.part", 1, "full"))
    assert full.returncode == 1, full.stderr[-2000:]
    errors = [line for line in full.stderr.splitlines() if line.startswith(" ## Error: ")]
    assert len(errors) == 1 and "Traceback" not in full.stderr, full.stderr[-2000:]
    assert f"disk full while writing {out / 'output-00001.part'}" in errors[0]
    assert "free" in errors[0] and "same -o to resume" in errors[0]
    assert not looks_finished(out)
    assert not [p.name for p in out.iterdir() if p.suffix in (".tmp", ".part", ".safetensors")]
    resumed = convert("-o", work, "-res")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert files_of(out) == fresh


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_real_full_disk_then_room_again(fp16, fresh, tmp_path):
    """A real file system that fills up (a 64 KiB tmpfs for -cf), then is given room: needs root to mount."""
    out = tmp_path / "out"
    if not _mount_tmpfs(out, "64k"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        full = convert("-i", fp16, "-o", tmp_path / "work", "-cf", out, *ARGS)
        assert full.returncode == 1, full.stderr[-2000:]
        assert " ## Error: disk full while writing" in full.stderr
        assert not looks_finished(out) and not list(out.iterdir()), sorted(p.name for p in out.iterdir())
    finally:
        subprocess.run(["umount", str(out)], check=True)
    resumed = convert("-o", tmp_path / "work", "-res")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert files_of(out) == fresh
