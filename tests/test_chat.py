"""examples/chat.py end to end: a subprocess, non-interactive, on the bundled demo model (FP16, EXL2).

The FP16 reply is checked against transformers: with greedy sampling, chat.py's reply must be the
start of what LlamaForCausalLM generates greedily from the same context, cut at the raw format's
stop strings.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CHAT = REPO / "examples" / "chat.py"
DEMO_FP16 = REPO / "examples" / "demo_model" / "fp16"
DEMO_EXL2 = REPO / "examples" / "demo_model" / "exl2"
PROMPT = "What does json.dumps do?"
GREEDY = ["-topk", "1", "-temp", "1.0", "-repp", "1.0"]

sys.path.insert(0, str(REPO / "examples"))
import chat_prompts  # noqa: E402


def run_chat(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    # One thread: this suite shares small machines, and oversubscribed OpenMP threads crawl.
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(CHAT), *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=env,
    )


class _NoTokenizer:
    """Enough of a tokenizer for the raw format's stop strings (EOS already ends HF generation)."""

    eos_token_id = -1


def transformers_greedy_reply(model_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """The raw-format reply transformers generates greedily, cut where chat.py would stop."""
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    fmt = chat_prompts.prompt_formats["raw"]()
    text = chat_prompts.render_conversation(fmt, [prompt], [], fmt.default_system_prompt())
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    bos = tok.token_to_id("<s>")
    ids = torch.tensor([[bos] + tok.encode(text, add_special_tokens=False).ids])
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.0)
    reply = tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    stops = [s for s in fmt.stop_conditions(_NoTokenizer()) if isinstance(s, str)]
    reply = reply[: min((reply.index(s) for s in stops if s in reply), default=len(reply))]
    return reply.strip()


def test_fp16_demo_reply_matches_transformers_greedy():
    result = run_chat("--prompt", PROMPT, "--max-new-tokens", "24", *GREEDY)
    assert result.returncode == 0, result.stderr
    ours = result.stdout.strip()
    assert ours, f"no reply on stdout; stderr:\n{result.stderr}"
    expected = transformers_greedy_reply(DEMO_FP16, PROMPT, 24)
    # At the token limit the generator may hold back a few characters that could begin a stop
    # string, so ours may be shorter; it must never differ.
    assert expected.startswith(ours), f"chat.py: {ours!r}\ntransformers: {expected!r}"
    assert len(ours) >= len(expected) // 2


def test_stdin_prompt_forced_backend_and_plan_on_stderr():
    result = run_chat("--max-new-tokens", "8", "--attn-backend", "matmul", stdin=PROMPT + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    # The attention plan is printed once, to stderr in non-interactive mode, and shows the
    # backend --attn-backend forced through the config (config.attn_backend, not the environment).
    assert result.stderr.lower().count("attention plan") == 1, result.stderr
    assert "config.attn_backend=matmul" in result.stderr
    assert re.search(r"^cpu\s.*\bmatmul\b", result.stderr, re.MULTILINE), result.stderr
    if "\rLoading:" in result.stderr:    # shown only when loading takes a while: it must end at 100%
        final = result.stderr.split("\rLoading:")[-1].split("\n")[0]
        assert "100%" in final and re.search(r"(\d+)/\1 \[", final), repr(final)


def test_exl2_demo_replies():
    assert (DEMO_EXL2 / "config.json").exists(), "EXL2 demo model missing: see examples/demo_model/README.md"
    result = run_chat("-m", str(DEMO_EXL2), "-mode", "raw", "--prompt", PROMPT, "--max-new-tokens", "16")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_modes_lists_every_format():
    result = run_chat("-modes")
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines()[1:] if line.strip()}
    assert listed == set(chat_prompts.prompt_formats)


def test_other_model_without_mode_is_refused(tmp_path):
    import shutil

    shutil.copytree(DEMO_FP16, tmp_path / "model")
    result = run_chat("-m", str(tmp_path / "model"), "--prompt", "hi")
    assert result.returncode == 2
    assert result.stderr.strip("\n").splitlines() == [
        " ## Error: -mode is required for a model other than the demo model; -modes lists the formats"]


def test_missing_model_dir_comes_before_mode():
    # not a usage dump demanding -mode: the directory is the mistake
    result = run_chat("-m", "/nonexistent/model", "--prompt", "hi")
    assert result.returncode == 1
    assert result.stderr.strip("\n").splitlines() == [" ## Error: model directory /nonexistent/model does not exist"]
    assert not result.stdout


def _model_args(*argv: str):
    import argparse

    from exllamav2 import model_init

    parser = argparse.ArgumentParser()
    model_init.add_args(parser)
    return model_init, parser.parse_args(list(argv))


def test_check_args_names_what_is_missing(tmp_path):
    model_init, args = _model_args("-m", str(tmp_path))
    try:
        model_init.check_args(args)
    except SystemExit as e:
        message = str(e.code)
    else:
        raise AssertionError("check_args accepted an empty directory")
    assert "config.json" in message and "tokenizer.json" in message and "safetensors" in message


def test_check_args_rejects_unknown_backend_and_bad_split(capsys):
    for argv, expected in (
        (["--attn-backend", "flash"], "not an attention backend (did you mean flash_attn?)"),
        (["-gs", "12,x"], "comma-separated numbers"),
    ):
        model_init, args = _model_args("-m", str(DEMO_FP16), *argv)
        try:
            model_init.check_args(args)
        except SystemExit as e:
            assert e.code == 1
            err = capsys.readouterr().err
            assert err.startswith(" ## Error: ") and expected in err and err.count("\n") == 1
        else:
            raise AssertionError(f"check_args accepted {argv}")


def test_attn_backend_flag_reaches_the_plan_through_the_config(monkeypatch):
    from types import SimpleNamespace

    from exllamav2.attn.selector import AttnFlags

    monkeypatch.setenv("EXLLAMA_ATTN_BACKEND", "matmul")
    model_init, _ = _model_args()
    config = SimpleNamespace(attn_backend=None)
    model_init.apply_attn_backend(config, "SDPA")
    assert config.attn_backend == "sdpa" and os.environ["EXLLAMA_ATTN_BACKEND"] == "matmul"   # env untouched
    assert AttnFlags.from_config(config).forced(os.environ) == ("sdpa", "config.attn_backend=sdpa")
    model_init.apply_attn_backend(config, "auto")
    assert AttnFlags.from_config(config).forced(os.environ) == (None, "config.attn_backend=None")
    assert AttnFlags().forced(os.environ) == ("matmul", "EXLLAMA_ATTN_BACKEND=matmul")


# one line per mistake, in process (a subprocess per case costs seconds of imports) ------------------------


def _chat_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("chat_example", CHAT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture
def chat_error(monkeypatch, capsys):
    """chat_error(*argv, env={...}) -> (exit status, stderr lines) of chat.py's main, run in this process."""
    main = _chat_main()
    for name in [n for n in os.environ if n.startswith("EXLLAMA_")]:
        monkeypatch.delenv(name)

    def run(*argv: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("EXLLAMA_ATTN_BACKEND", os.environ.get("EXLLAMA_ATTN_BACKEND", ""))  # restored after
        if not (env or {}).get("EXLLAMA_ATTN_BACKEND"):
            monkeypatch.delenv("EXLLAMA_ATTN_BACKEND")
        with pytest.raises(SystemExit) as e:
            main(["--prompt", "hi", "--max-new-tokens", "2", *argv])
        return e.value.code, capsys.readouterr().err.strip("\n").splitlines()

    return run


@pytest.fixture
def broken_model(tmp_path):
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(DEMO_FP16, dst)
    return dst


def _only_error_line(lines: list[str]) -> str:
    errors = [line for line in lines if line.startswith(" ## Error: ")]
    assert len(errors) == 1, lines
    assert not any("Traceback" in line for line in lines), lines
    return errors[0]


def test_config_syntax_error_is_one_line(chat_error, broken_model):
    text = (broken_model / "config.json").read_text().replace('"hidden_size": 256,', '"hidden_size": ,')
    (broken_model / "config.json").write_text(text)
    code, lines = chat_error("-m", str(broken_model), "-mode", "raw")
    assert code == 1
    assert re.search(r"config\.json: invalid JSON at line \d+ column \d+", _only_error_line(lines))


def test_bad_config_value_is_one_line(chat_error, broken_model):
    text = (broken_model / "config.json").read_text().replace('"hidden_size": 256,', '"hidden_size": 128.5,')
    (broken_model / "config.json").write_text(text)
    code, lines = chat_error("-m", str(broken_model), "-mode", "raw")
    assert code == 1
    assert "config.json: hidden_size is 128.5, but must be a positive integer" in _only_error_line(lines)


def test_truncated_safetensors_is_one_line(chat_error, broken_model):
    f = broken_model / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    code, lines = chat_error("-m", str(broken_model), "-mode", "raw")
    assert code == 1
    assert re.search(r"model\.safetensors.*truncated; re-download it", _only_error_line(lines))


@pytest.mark.parametrize("argv,env,expected", [
    ([], {"EXLLAMA_ATTN_BACKEND": "flash"},
     "EXLLAMA_ATTN_BACKEND='flash' is not an attention backend (did you mean flash_attn?)"),
    (["--attn-backend", "flash"], {}, "--attn-backend flash is not an attention backend (did you mean flash_attn?)"),
    (["--attn-backend", "flash"], {"EXLLAMA_ATTN_BACKEND": "sdpa"}, "--attn-backend flash is not"),
    ([], {"EXLLAMA_NO_SDPA": "ture"}, "EXLLAMA_NO_SDPA='ture' is not a boolean (did you mean true?)"),
    (["-nsdpa", "--attn-backend", "sdpa"], {}, "--attn-backend sdpa forces sdpa, but -nsdpa disables it"),
    (["--attn-backend", "sdpa"], {"EXLLAMA_NO_SDPA": "1"},
     "--attn-backend sdpa forces sdpa, but EXLLAMA_NO_SDPA=1 disables it"),
    (["-nsdpa"], {"EXLLAMA_ATTN_BACKEND": "sdpa"}, "EXLLAMA_ATTN_BACKEND=sdpa forces sdpa, but -nsdpa disables it"),
    (["-tp"], {}, "-tp: tensor parallelism is not implemented"),
    (["-l", "-5"], {}, "-l -5: must be a positive number"),
    (["-rs", "-1"], {}, "-rs -1.0: must be a positive number"),
    (["-chunk", "0"], {}, "-chunk 0: must be a positive number"),
])
def test_attention_mistakes_in_the_users_words(chat_error, argv, env, expected):
    code, lines = chat_error(*argv, env=env)
    assert code == 1
    assert expected in _only_error_line(lines)


@pytest.mark.skipif(torch.cuda.is_available(), reason="flash_attn may run here")
def test_forced_backend_that_cannot_run_names_the_flag(chat_error):
    code, lines = chat_error("--attn-backend", "flash_attn")
    assert code == 1
    line = _only_error_line(lines)
    assert line.startswith(" ## Error: --attn-backend flash_attn cannot run on cpu")
    assert "EXLLAMA_ATTN_BACKEND" not in line and "drop --attn-backend" in line


@pytest.mark.parametrize("argv,expected", [
    (["-temp", "-1"], "-temp -1.0 is out of range: it must be at least 0"),
    (["-topp", "1.5"], "-topp 1.5 is out of range: it must be between 0 and 1"),
    (["-topk", "-3"], "-topk -3 is negative"),
    (["-mode", "lama3"], "-mode lama3 is not a prompt format (did you mean llama3?)"),
    (["-maxr", "0"], "-maxr 0: must be at least 1"),
])
def test_chat_flag_mistakes_are_one_line(chat_error, argv, expected):
    code, lines = chat_error(*argv)
    assert code == 2
    assert lines == [f" ## Error: {expected}"] or expected in _only_error_line(lines)


def test_debug_flag_shows_the_traceback(broken_model, monkeypatch):
    from exllamav2.errors import ConfigError

    (broken_model / "config.json").write_text("[]")
    main = _chat_main()
    with pytest.raises(ConfigError, match="top level is a JSON list"):
        main(["-m", str(broken_model), "-mode", "raw", "--prompt", "hi", "-v"])


def test_loading_bar_completes_and_ends_its_line(tiny_model_factory, capsys):
    from exllamav2 import ExLlamaV2, ExLlamaV2Config

    model_dir, _ = tiny_model_factory("llama")
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    model.load(progress=True)
    err = capsys.readouterr().err
    assert err.endswith("\n"), repr(err[-80:])       # the next output starts on its own line
    final = err.rstrip("\n").split("\r")[-1]
    total = len(model.modules)
    assert final.startswith("Loading: 100%") and f"{total}/{total} [" in final, repr(final)
