"""Read the added/special tokens a model directory declares beside its tokenizer.

Sources, later ones overriding earlier ones for the same piece:
  tokenizer.json "added_tokens" (special -> special, the rest -> unspecial),
  added_tokens.json (all taken as special),
  tokenizer_config.json "added_tokens_decoder" (entries marked special).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from ..errors import TokenizerError


@dataclass
class AddedTokens:
    special: dict[str, int]
    unspecial: dict[str, int]
    tokenizer_config: dict[str, Any] | None


def read_json_object(path: str) -> dict[str, Any]:
    """A tokenizer file's JSON object; TokenizerError naming the file (and line) when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}; "
                             f"re-download the model's tokenizer files") from e
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 text ({e.reason}); re-download the model's tokenizer files") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: the top level is a JSON {type(data).__name__}, not an object; "
                             f"re-download the model's tokenizer files")
    return data


def _token_id(path: str, where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
        raise TokenizerError(f"{path}: {where} has id {value!r}, not a non-negative integer; "
                             f"re-download the model's tokenizer files")
    return int(value)


def _entry(path: str, where: str, entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
        raise TokenizerError(f"{path}: {where} is {entry!r:.80}, not an object with a string 'content'; "
                             f"re-download the model's tokenizer files")
    return entry


def read_added_tokens(model_dir: str, tokenizer_json: dict[str, Any] | None) -> AddedTokens:
    """`tokenizer_json` is the parsed tokenizer.json, or None when the directory has none."""
    special: dict[str, int] = {}
    unspecial: dict[str, int] = {}

    json_path = os.path.join(model_dir, "tokenizer.json")
    added = (tokenizer_json or {}).get("added_tokens") or []
    if not isinstance(added, list):
        raise TokenizerError(f"{json_path}: added_tokens is not a list; re-download the model's tokenizer files")
    for n, entry in enumerate(added):
        entry = _entry(json_path, f"added_tokens[{n}]", entry)
        target = special if entry.get("special") else unspecial
        target[entry["content"]] = _token_id(json_path, f"added_tokens[{n}]", entry.get("id"))

    added_path = os.path.join(model_dir, "added_tokens.json")
    if os.path.exists(added_path):
        for piece, idx in read_json_object(added_path).items():
            special[piece] = _token_id(added_path, f"token {piece!r}", idx)

    config_path = os.path.join(model_dir, "tokenizer_config.json")
    tokenizer_config = read_json_object(config_path) if os.path.exists(config_path) else None
    decoder = (tokenizer_config or {}).get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise TokenizerError(f"{config_path}: added_tokens_decoder is not an object; re-download it")
    for idx, entry in decoder.items():
        entry = _entry(config_path, f"added_tokens_decoder[{idx!r}]", entry)
        if entry.get("special"):
            special[entry["content"]] = _token_id(config_path, "added_tokens_decoder key", idx)

    return AddedTokens(special, unspecial, tokenizer_config)
