"""`python -m exllamav2.attn`: the plan as a table or JSON, assumed rigs, flags mirroring the config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exllamav2.attn.__main__ import main
from tests.fakes import FAKES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in [n for n in os.environ if n.startswith("EXLLAMA_")]:
        monkeypatch.delenv(name)


def run_json(capsys, *args):
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_turing_with_flash_installed_is_not_flash(fakes, capsys):
    fakes("ampere_only")
    plan = run_json(capsys, "--assume-capability", "7.5")
    assert plan["installed"]["flash_attn"] == "2.8.3"
    (device,) = plan["devices"]
    assert device["device"] == "cuda:0" and device["capability"] == "7.5"
    assert device["backend"] == "sdpa" and device["sdpa_kernels"] == ["efficient", "math"]
    assert device["paged"] is True
    assert device["rejected"]["flash_attn"] == "needs sm_80+, cuda:0 is sm_75"
    assert set(plan["environment"]) == {"EXLLAMA_ATTN_BACKEND", "EXLLAMA_NO_FLASH_ATTN", "EXLLAMA_NO_XFORMERS", "EXLLAMA_NO_SDPA"}
    assert "flash_attn" not in sys.modules


def test_mixed_rig_gets_a_plan_per_device(fakes, capsys):
    fakes("ampere_only")
    plan = run_json(capsys, "--assume-capability", "8.6,7.5")
    assert [(d["device"], d["backend"]) for d in plan["devices"]] == [("cuda:0", "flash_attn"), ("cuda:1", "sdpa")]
    assert plan["devices"][0]["sdpa_kernels"] == ["flash", "efficient", "math"]   # flash's fallback for masks
    assert "flash_attn" not in sys.modules   # planning an assumed rig imports nothing


def test_flags_mirror_the_config(capsys):
    plan = run_json(capsys, "--assume-capability", "7.5", "--no-sdpa", "--no-flash-attention")
    assert plan["flags"] == {"no_flash_attn": True, "no_xformers": False, "no_sdpa": True, "backend": None}
    assert plan["devices"][0]["backend"] == "matmul"
    assert plan["devices"][0]["rejected"]["sdpa"] == "disabled by config no_sdpa"


def test_model_needs_options(capsys):
    plan = run_json(capsys, "--assume-capability", "cpu", "--softcap", "30", "--dtype", "bfloat16")
    assert plan["model_needs"]["softcap"] == 30.0 and plan["dtype"] == "bfloat16"
    assert plan["devices"][0]["backend"] == "matmul"


def test_backend_option_overrides_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("EXLLAMA_ATTN_BACKEND", "matmul")
    assert run_json(capsys, "--assume-capability", "7.5")["devices"][0]["backend"] == "matmul"
    plan = run_json(capsys, "--assume-capability", "7.5", "--backend", "auto")
    assert plan["devices"][0]["backend"] == "sdpa" and plan["environment"]["EXLLAMA_ATTN_BACKEND"] == "auto"


@pytest.mark.parametrize(
    "args,env,message",
    [
        (["--assume-capability", "7.5", "--backend", "flash_attn"], {},
         "EXLLAMA_ATTN_BACKEND=flash_attn cannot run on cuda:0 (assumed sm_75, sm_75): needs sm_80+"),
        (["--assume-capability", "7"], {}, "capability '7' is not MAJOR.MINOR"),
        (["--assume-capability", "7.5"], {"EXLLAMA_NO_SDPA": "maybe"}, "EXLLAMA_NO_SDPA='maybe' is not a boolean"),
        (["--assume-capability", "7.5", "--dtype", "int4"], {}, "torch_dtype 'int4' is not supported"),
    ],
)
def test_errors_exit_2_with_the_reason(monkeypatch, capsys, args, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err


def test_this_machine(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("attention plan") and "chosen " in out


def test_module_answers_not_flash_on_turing_without_importing_it(tmp_path):
    """The issue's acceptance check, as a user runs it."""
    log = tmp_path / "imports.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXLLAMA_")}
    env.update(PYTHONPATH=os.pathsep.join([str(FAKES / "ampere_only"), str(REPO)]), FAKE_IMPORT_LOG=str(log))
    result = subprocess.run(
        [sys.executable, "-m", "exllamav2.attn", "--assume-capability", "7.5"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("cuda:0")]
    assert rows and rows[0][4] == "sdpa"    # device, "assumed", "sm_75", capability, backend
    assert "flash_attn 2.8.3" in result.stdout
    assert "rejected flash_attn: needs sm_80+, cuda:0 is sm_75" in result.stdout
    assert not log.exists()
