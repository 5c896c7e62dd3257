"""Prompt formats for examples/chat.py.

A format turns a conversation into the text a model family was tuned on. Templates hold two
placeholders, ``<|system_prompt|>`` and ``<|user_prompt|>``:

- ``first_prompt(has_sys)`` is the first user turn (with the system prompt when ``has_sys``),
  ending where the model starts its reply;
- ``subs_prompt()`` is every later user turn. It begins with whatever closes the previous reply
  (an end-of-turn token, say), because replies are stored without the stop token that ended them;
- ``response_prefix`` goes before each stored reply. Llama-2-style ``[/INST]`` templates put a
  space there, which the model produces itself as part of its first token, so it stays out of the
  prompt and is added back only to finished replies.

Special tokens are written literally in the templates (``encode_special_tokens`` is on for those
formats), so the whole conversation is one string that can be compared with the model family's
documented template. ``encoding_options()`` returns (add_bos, add_eos, encode_special_tokens);
chat.py applies add_bos once, at the start of the context.
"""

from __future__ import annotations

import re
from typing import Protocol, Sequence

SYSTEM_PLACEHOLDER = "<|system_prompt|>"
USER_PLACEHOLDER = "<|user_prompt|>"
_PLACEHOLDER_RE = re.compile(r"<\|(system_prompt|user_prompt)\|>")


class _Tokenizer(Protocol):
    eos_token_id: int

    def single_id(self, piece: str) -> int: ...


class PromptFormat:
    description: str = ""
    botname: str = "Chatbort"
    username: str = "User"
    response_prefix: str = ""

    def default_system_prompt(self) -> str:
        return f"You are {self.botname}, a helpful and honest AI assistant."

    def first_prompt(self, has_sys: bool) -> str:
        raise NotImplementedError

    def subs_prompt(self) -> str:
        raise NotImplementedError

    def stop_conditions(self, tokenizer: _Tokenizer) -> list[int | str]:
        return [tokenizer.eos_token_id]

    def encoding_options(self) -> tuple[bool, bool, bool]:
        return False, False, True

    def print_bot_name(self) -> bool:
        return True

    def print_extra_newline(self) -> bool:
        return True


def _special_ids(tokenizer: _Tokenizer, pieces: Sequence[str]) -> list[int]:
    """Ids of the end-of-turn pieces this tokenizer has; a mode used on a model from another
    family still stops on EOS instead of failing."""
    ids = []
    for piece in pieces:
        try:
            token_id = tokenizer.single_id(piece)
        except (KeyError, ValueError, TypeError):
            continue
        if token_id is not None and token_id >= 0:
            ids.append(token_id)
    return ids


class PromptFormat_raw(PromptFormat):
    """A plain chat log ("User: ...\\nChatbort: ..."), no special tokens; for base models."""

    description = "Model-agnostic chat log, no special tokens (base models, the bundled demo model)"
    response_prefix = " "

    def default_system_prompt(self) -> str:
        return (
            f"This is a conversation between a helpful AI assistant named {self.botname} "
            f"and a user named {self.username}."
        )

    def first_prompt(self, has_sys: bool) -> str:
        sys_part = f"{SYSTEM_PLACEHOLDER}\n" if has_sys else ""
        return f"{sys_part}{self.username}: {USER_PLACEHOLDER}\n{self.botname}:"

    def subs_prompt(self) -> str:
        return f"\n{self.username}: {USER_PLACEHOLDER}\n{self.botname}:"

    def stop_conditions(self, tokenizer: _Tokenizer) -> list[int | str]:
        # The model ends its turn by starting the user's next line.
        name = self.username
        stops: list[int | str] = []
        for s in (f"{name}:", f"{name[:1]}:", f"{name.upper()}:", f"{name.lower()}:"):
            if s not in stops:
                stops.append(s)
        return stops + [tokenizer.eos_token_id]

    def encoding_options(self) -> tuple[bool, bool, bool]:
        return True, False, False

    def print_extra_newline(self) -> bool:
        return False


class PromptFormat_llama(PromptFormat):
    """Llama-2-chat: <s>[INST] <<SYS>>\\n{sys}\\n<</SYS>>\\n\\n{user} [/INST] {reply} </s>"""

    description = "Llama-2-chat and models tuned on its [INST] <<SYS>> template"
    response_prefix = " "

    def default_system_prompt(self) -> str:
        return (
            "You are a helpful, respectful and honest assistant. Answer as helpfully as possible "
            "while staying safe. If a question makes no sense or is not factually coherent, "
            "explain why instead of answering something incorrect. If you don't know the answer, "
            "say so instead of making something up."
        )

    def first_prompt(self, has_sys: bool) -> str:
        if has_sys:
            return f"<s>[INST] <<SYS>>\n{SYSTEM_PLACEHOLDER}\n<</SYS>>\n\n{USER_PLACEHOLDER} [/INST]"
        return f"<s>[INST] {USER_PLACEHOLDER} [/INST]"

    def subs_prompt(self) -> str:
        return f" </s><s>[INST] {USER_PLACEHOLDER} [/INST]"


class PromptFormat_codellama(PromptFormat_llama):
    """CodeLlama-Instruct: the Llama-2-chat template with a coding system prompt."""

    description = "CodeLlama-Instruct (Llama-2-chat template)"

    def default_system_prompt(self) -> str:
        return (
            "You are a helpful coding assistant. Answer as helpfully as possible, with correct, "
            "complete code where code is asked for."
        )


class PromptFormat_mistral(PromptFormat):
    """Mistral-Instruct: <s>[INST] {user} [/INST]{reply}</s> [INST] {user} [/INST]

    Mistral has no system role; the system prompt leads the first user message, followed by a
    blank line (as Mistral's own tokenizer library does).
    """

    description = "Mistral-Instruct v0.1/v0.2 ([INST] without a system block)"

    def default_system_prompt(self) -> str:
        return "Always assist with care, respect, and truth."

    def first_prompt(self, has_sys: bool) -> str:
        sys_part = f"{SYSTEM_PLACEHOLDER}\n\n" if has_sys else ""
        return f"<s>[INST] {sys_part}{USER_PLACEHOLDER} [/INST]"

    def subs_prompt(self) -> str:
        return f"</s> [INST] {USER_PLACEHOLDER} [/INST]"


class PromptFormat_llama3(PromptFormat):
    """Llama-3 instruct: header tokens around each role, <|eot_id|> after each message."""

    description = "Llama-3 / 3.1 / 3.2 / 3.3 instruct"

    def default_system_prompt(self) -> str:
        return f"You are {self.botname}, a helpful AI assistant."

    def first_prompt(self, has_sys: bool) -> str:
        sys_part = (
            f"<|start_header_id|>system<|end_header_id|>\n\n{SYSTEM_PLACEHOLDER}<|eot_id|>"
            if has_sys
            else ""
        )
        return f"<|begin_of_text|>{sys_part}{self._user_turn()}"

    def subs_prompt(self) -> str:
        return f"<|eot_id|>{self._user_turn()}"

    @staticmethod
    def _user_turn() -> str:
        return (
            f"<|start_header_id|>user<|end_header_id|>\n\n{USER_PLACEHOLDER}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        )

    def stop_conditions(self, tokenizer: _Tokenizer) -> list[int | str]:
        return _special_ids(tokenizer, ["<|eot_id|>", "<|eom_id|>"]) + [tokenizer.eos_token_id]


class PromptFormat_chatml(PromptFormat):
    """ChatML: <|im_start|>{role}\\n{text}<|im_end|>\\n per message."""

    description = "ChatML (Qwen, Yi, OpenHermes, many fine-tunes)"

    def default_system_prompt(self) -> str:
        return f"You are {self.botname}, a helpful AI assistant."

    def first_prompt(self, has_sys: bool) -> str:
        sys_part = f"<|im_start|>system\n{SYSTEM_PLACEHOLDER}<|im_end|>\n" if has_sys else ""
        return f"{sys_part}{self._user_turn()}"

    def subs_prompt(self) -> str:
        return f"<|im_end|>\n{self._user_turn()}"

    @staticmethod
    def _user_turn() -> str:
        return f"<|im_start|>user\n{USER_PLACEHOLDER}<|im_end|>\n<|im_start|>assistant\n"

    def stop_conditions(self, tokenizer: _Tokenizer) -> list[int | str]:
        return _special_ids(tokenizer, ["<|im_end|>"]) + [tokenizer.eos_token_id]


class PromptFormat_gemma(PromptFormat):
    """Gemma: <start_of_turn>{user|model}\\n{text}<end_of_turn>\\n per message.

    Gemma has no system role; the system prompt leads the first user turn, then a blank line.
    """

    description = "Gemma / Gemma-2 / Gemma-3 instruct"

    def first_prompt(self, has_sys: bool) -> str:
        sys_part = f"{SYSTEM_PLACEHOLDER}\n\n" if has_sys else ""
        return f"<bos><start_of_turn>user\n{sys_part}{USER_PLACEHOLDER}{self._turn_end()}"

    def subs_prompt(self) -> str:
        return f"<end_of_turn>\n<start_of_turn>user\n{USER_PLACEHOLDER}{self._turn_end()}"

    @staticmethod
    def _turn_end() -> str:
        return "<end_of_turn>\n<start_of_turn>model\n"

    def stop_conditions(self, tokenizer: _Tokenizer) -> list[int | str]:
        return _special_ids(tokenizer, ["<end_of_turn>"]) + [tokenizer.eos_token_id]


class PromptFormat_phi3(PromptFormat):
    """Phi-3 / Phi-3.5: <|{role}|>\\n{text}<|end|>\\n per message."""

    description = "Phi-3 / Phi-3.5 instruct"

    def first_prompt(self, has_sys: bool) -> str:
        sys_part = f"<|system|>\n{SYSTEM_PLACEHOLDER}<|end|>\n" if has_sys else ""
        return f"{sys_part}{self._user_turn()}"

    def subs_prompt(self) -> str:
        return f"<|end|>\n{self._user_turn()}"

    @staticmethod
    def _user_turn() -> str:
        return f"<|user|>\n{USER_PLACEHOLDER}<|end|>\n<|assistant|>\n"

    def stop_conditions(self, tokenizer: _Tokenizer) -> list[int | str]:
        return _special_ids(tokenizer, ["<|end|>", "<|endoftext|>"]) + [tokenizer.eos_token_id]


prompt_formats: dict[str, type[PromptFormat]] = {
    "raw": PromptFormat_raw,
    "llama": PromptFormat_llama,
    "llama3": PromptFormat_llama3,
    "codellama": PromptFormat_codellama,
    "mistral": PromptFormat_mistral,
    "chatml": PromptFormat_chatml,
    "gemma": PromptFormat_gemma,
    "phi3": PromptFormat_phi3,
}


def fill(template: str, user_prompt: str, system_prompt: str = "") -> str:
    """Substitute both placeholders in one pass, so text inside a prompt is never re-substituted."""
    values = {"system_prompt": system_prompt, "user_prompt": user_prompt}
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], template)


def render_conversation(
    fmt: PromptFormat,
    user_prompts: Sequence[str],
    responses: Sequence[str],
    system_prompt: str | None = None,
) -> str:
    """The whole conversation as text, ending where the model's next reply starts.

    ``responses[i]`` is the finished reply to ``user_prompts[i]`` without its stop token;
    ``system_prompt=None`` leaves the system block out.
    """
    if len(responses) > len(user_prompts):
        raise ValueError(
            f"{len(responses)} replies for {len(user_prompts)} user prompts; each reply must "
            f"answer a user prompt"
        )
    parts = []
    for i, user_prompt in enumerate(user_prompts):
        if i == 0:
            template = fmt.first_prompt(system_prompt is not None)
        else:
            template = fmt.subs_prompt()
        parts.append(fill(template, user_prompt, system_prompt or ""))
        if i < len(responses):
            parts.append(fmt.response_prefix + responses[i])
    return "".join(parts)
