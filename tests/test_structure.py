"""House rules that the import contracts (pyproject.toml, [tool.importlinter]) cannot state on their own: which
modules read the process environment, and which one decides between a compiled kernel and its twin."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import exllamav2

PACKAGE = Path(exllamav2.__file__).parent

# config and planner modules: the attention planner's variables, the config's, the extension loader's settings
ENVIRONMENT_READERS = {"config.py", "attn/env.py", "environment.py"}
# the ops table asks the extension loader for kernels; nothing else does
KERNEL_CHOOSERS = {"ops/table.py", "ext/__init__.py"}


def sources() -> dict[str, str]:
    return {p.relative_to(PACKAGE).as_posix(): p.read_text() for p in PACKAGE.rglob("*.py")}


def test_only_config_and_planner_modules_read_the_environment():
    readers = {name for name, text in sources().items() if re.search(r"\bos\.(environ|getenv)\b|\bgetenv\(", text)}
    assert readers == ENVIRONMENT_READERS


def test_only_the_ops_table_chooses_between_kernel_and_twin():
    callers = {name for name, text in sources().items()
               if re.search(r"\b(kernels_for|cpu_kernels|load_extension)\(", text)}
    assert callers == KERNEL_CHOOSERS


def test_import_contracts_hold():
    # in a child process: import-linter reconfigures logging, which later tests that capture logs rely on
    cli = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    result = subprocess.run([sys.executable, "-c", cli, "--no-cache"], cwd=PACKAGE.parent,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def built_section() -> list[str]:
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## How it is built", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and "`" in line]


def test_readme_map_names_real_files_and_every_folder():
    named_folders = set()
    for row in built_section():
        folder = ""
        for name in re.findall(r"`([^`]+)`", row.split(" | ")[1]):
            if name.endswith("/"):
                folder = name
                named_folders.add(name.rstrip("/"))
            elif name.endswith(".py"):
                where = (PACKAGE / folder / name, PACKAGE / name, PACKAGE.parent / name)   # convert.py: the repo root
                assert any(p.exists() for p in where), f"README names {name}, which does not exist"
    folders = {p.parent.relative_to(PACKAGE).as_posix() for p in PACKAGE.glob("*/__init__.py")}
    assert folders - {"exllamav2_ext"} <= named_folders and all((PACKAGE / f).is_dir() for f in named_folders)


def test_no_function_over_60_lines():
    import ast

    long = [f"{name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for name, text in sources().items() for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert long == []
