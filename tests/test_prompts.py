"""Each chat prompt format renders a known conversation exactly as its model family documents it.

The expected strings are written out by hand from each family's published chat template (model
cards, official chat_template / formatting docs), not produced by the code under test.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "examples" / "chat_prompts.py"
_spec = importlib.util.spec_from_file_location("chat_prompts", _PATH)
chat_prompts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(chat_prompts)

SYS = "You are terse."
U1 = "Hi there."
A1 = "Hello! How can I help?"
U2 = "Name a prime."

# system + user + assistant + user, ending with the generation prompt for the next reply.
EXPECTED = {
    # Llama-2-chat (Meta's reference chat_completion / HF chat template): system block inside the
    # first [INST]; each exchange is "<s>[INST] user [/INST] reply </s>".
    "llama": (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there. [/INST] "
        "Hello! How can I help? </s><s>[INST] Name a prime. [/INST]"
    ),
    # CodeLlama-Instruct uses the Llama-2-chat template.
    "codellama": (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there. [/INST] "
        "Hello! How can I help? </s><s>[INST] Name a prime. [/INST]"
    ),
    # Mistral-Instruct model card: "<s>[INST] q [/INST]" "answer</s> " "[INST] q2 [/INST]";
    # no system role, the system text leads the first user message.
    "mistral": (
        "<s>[INST] You are terse.\n\nHi there. [/INST]Hello! How can I help?</s> "
        "[INST] Name a prime. [/INST]"
    ),
    # Llama-3 instruct: <|begin_of_text|>, role headers, <|eot_id|> after each message.
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nName a prime.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    # ChatML.
    "chatml": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi there.<|im_end|>\n"
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
        "<|im_start|>user\nName a prime.<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    # Gemma (ai.google.dev formatting guide): user/model turns; system text goes in the first user
    # turn followed by a blank line; the HF template starts with <bos>.
    "gemma": (
        "<bos><start_of_turn>user\nYou are terse.\n\nHi there.<end_of_turn>\n"
        "<start_of_turn>model\nHello! How can I help?<end_of_turn>\n"
        "<start_of_turn>user\nName a prime.<end_of_turn>\n"
        "<start_of_turn>model\n"
    ),
    # Phi-3 model card chat format.
    "phi3": (
        "<|system|>\nYou are terse.<|end|>\n"
        "<|user|>\nHi there.<|end|>\n"
        "<|assistant|>\nHello! How can I help?<|end|>\n"
        "<|user|>\nName a prime.<|end|>\n"
        "<|assistant|>\n"
    ),
    # raw: this project's own chat-log format, as its docstring describes it.
    "raw": "You are terse.\nUser: Hi there.\nChatbort: Hello! How can I help?\nUser: Name a prime.\nChatbort:",
}


def test_every_required_format_is_registered():
    required = {"raw", "llama", "llama3", "chatml", "mistral", "gemma", "phi3", "codellama"}
    assert required <= set(chat_prompts.prompt_formats)


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_two_turn_conversation_matches_documented_template(mode):
    fmt = chat_prompts.prompt_formats[mode]()
    text = chat_prompts.render_conversation(fmt, [U1, U2], [A1], system_prompt=SYS)
    assert text == EXPECTED[mode]


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("llama", "<s>[INST] Hi there. [/INST]"),
        ("mistral", "<s>[INST] Hi there. [/INST]"),
        ("chatml", "<|im_start|>user\nHi there.<|im_end|>\n<|im_start|>assistant\n"),
        ("gemma", "<bos><start_of_turn>user\nHi there.<end_of_turn>\n<start_of_turn>model\n"),
        ("phi3", "<|user|>\nHi there.<|end|>\n<|assistant|>\n"),
        (
            "llama3",
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there.<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        ("raw", "User: Hi there.\nChatbort:"),
    ],
)
def test_first_turn_without_system_prompt(mode, expected):
    fmt = chat_prompts.prompt_formats[mode]()
    assert chat_prompts.render_conversation(fmt, [U1], [], system_prompt=None) == expected


def test_placeholders_inside_prompts_are_not_substituted_again():
    fmt = chat_prompts.prompt_formats["chatml"]()
    text = chat_prompts.render_conversation(fmt, ["say <|system_prompt|>"], [], system_prompt="S <|user_prompt|>")
    assert text == (
        "<|im_start|>system\nS <|user_prompt|><|im_end|>\n"
        "<|im_start|>user\nsay <|system_prompt|><|im_end|>\n<|im_start|>assistant\n"
    )


def test_raw_names_follow_username_and_botname():
    fmt = chat_prompts.prompt_formats["raw"]()
    fmt.username, fmt.botname = "Ann", "Bob"
    assert chat_prompts.render_conversation(fmt, ["a", "b"], ["c"]) == "Ann: a\nBob: c\nAnn: b\nBob:"


class _FakeTokenizer:
    """Knows a few special pieces, like a real vocabulary would; unknown pieces raise KeyError."""

    eos_token_id = 2

    def __init__(self, pieces):
        self.pieces = pieces

    def single_id(self, piece):
        return self.pieces[piece]


def test_stop_conditions_use_end_of_turn_tokens_and_eos():
    tok = _FakeTokenizer({"<|eot_id|>": 128009, "<|im_end|>": 7, "<end_of_turn>": 107, "<|end|>": 32007})
    assert chat_prompts.prompt_formats["llama3"]().stop_conditions(tok) == [128009, 2]
    assert chat_prompts.prompt_formats["chatml"]().stop_conditions(tok) == [7, 2]
    assert chat_prompts.prompt_formats["gemma"]().stop_conditions(tok) == [107, 2]
    assert chat_prompts.prompt_formats["phi3"]().stop_conditions(tok) == [32007, 2]
    assert chat_prompts.prompt_formats["llama"]().stop_conditions(tok) == [2]
    # A tokenizer from another family has none of the pieces: EOS still stops the reply.
    assert chat_prompts.prompt_formats["chatml"]().stop_conditions(_FakeTokenizer({})) == [2]


def test_raw_stops_when_the_model_starts_the_users_line():
    stops = chat_prompts.prompt_formats["raw"]().stop_conditions(_FakeTokenizer({}))
    assert stops == ["User:", "U:", "USER:", "user:", 2]


def test_special_token_formats_encode_specials_and_raw_adds_bos():
    for mode, cls in chat_prompts.prompt_formats.items():
        add_bos, add_eos, special = cls().encoding_options()
        assert not add_eos
        if mode == "raw":
            assert (add_bos, special) == (True, False)
        else:
            # BOS, where the family uses one, is written in the template itself.
            assert (add_bos, special) == (False, True)


def test_more_replies_than_prompts_is_an_error():
    fmt = chat_prompts.prompt_formats["raw"]()
    with pytest.raises(ValueError, match="each reply must answer"):
        chat_prompts.render_conversation(fmt, ["a"], ["b", "c"])
