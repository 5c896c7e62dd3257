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


@dataclass
class AddedTokens:
    special: dict[str, int]
    unspecial: dict[str, int]
    tokenizer_config: dict[str, Any] | None


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_added_tokens(model_dir: str, tokenizer_json: dict[str, Any] | None) -> AddedTokens:
    """`tokenizer_json` is the parsed tokenizer.json, or None when the directory has none."""
    special: dict[str, int] = {}
    unspecial: dict[str, int] = {}

    for entry in (tokenizer_json or {}).get("added_tokens") or []:
        target = special if entry.get("special") else unspecial
        target[entry["content"]] = int(entry["id"])

    added_path = os.path.join(model_dir, "added_tokens.json")
    if os.path.exists(added_path):
        special.update({piece: int(idx) for piece, idx in _read_json(added_path).items()})

    config_path = os.path.join(model_dir, "tokenizer_config.json")
    tokenizer_config = _read_json(config_path) if os.path.exists(config_path) else None
    for idx, entry in ((tokenizer_config or {}).get("added_tokens_decoder") or {}).items():
        if entry.get("special"):
            special[entry["content"]] = int(idx)

    return AddedTokens(special, unspecial, tokenizer_config)
