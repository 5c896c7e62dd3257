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
    # backend --attn-backend forced through EXLLAMA_ATTN_BACKEND.
    assert result.stderr.lower().count("attention plan") == 1, result.stderr
    assert "EXLLAMA_ATTN_BACKEND=matmul" in result.stderr
    assert re.search(r"^cpu\s.*\bmatmul\b", result.stderr, re.MULTILINE), result.stderr


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
    result = run_chat("-m", str(tmp_path), "--prompt", "hi")
    assert result.returncode == 2
    assert "-mode is required" in result.stderr


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


def test_check_args_rejects_unknown_backend_and_bad_split():
    for argv, expected in (
        (["--attn-backend", "flash"], "not an attention backend"),
        (["-gs", "12,x"], "comma-separated numbers"),
    ):
        model_init, args = _model_args("-m", str(DEMO_FP16), *argv)
        try:
            model_init.check_args(args)
        except SystemExit as e:
            assert expected in str(e.code)
        else:
            raise AssertionError(f"check_args accepted {argv}")


def test_attn_backend_flag_sets_the_variable(monkeypatch):
    # setenv first, so monkeypatch restores the variable after the test
    monkeypatch.setenv("EXLLAMA_ATTN_BACKEND", "auto")
    model_init, _ = _model_args()
    model_init.apply_attn_backend("SDPA")
    assert os.environ["EXLLAMA_ATTN_BACKEND"] == "sdpa"
