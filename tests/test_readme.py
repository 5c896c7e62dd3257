"""The README's set-up commands are the ones CI runs and the ones that work."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set-up: the two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_two_setup_commands():
    chat, tests = readme_commands()
    assert "examples/chat.py" in chat
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command():
    _, tests = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    # CI activates the same fresh venv and then runs the command's install and test steps verbatim
    steps = tests.split(" && ", 2)[2]
    assert steps in ci
    assert "python3 -m venv .venv" in ci


def test_chat_command_targets_the_bundled_demo_model():
    chat, _ = readme_commands()
    assert chat.endswith("python examples/chat.py")          # no -m: the demo model
    assert (ROOT / "examples" / "demo_model" / "fp16" / "config.json").exists()
    assert (ROOT / "examples" / "demo_model" / "exl2" / "config.json").exists()


def test_every_supported_architecture_is_in_the_readme():
    """The README's architecture table lists every row of the table the loader accepts, and nothing else."""
    from exllamav2.architecture import ARCHITECTURES, MULTIMODAL

    text = (ROOT / "README.md").read_text()
    table = text.split("### Architectures", 1)[1].split("**Verified for every row**", 1)[0]
    listed = set(re.findall(r"`(\w+(?:ForCausalLM|ForConditionalGeneration|LMHeadModel))`", table))
    assert listed == set(ARCHITECTURES) | set(MULTIMODAL)
