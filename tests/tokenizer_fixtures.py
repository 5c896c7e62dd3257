"""Small tokenizers trained offline for the tokenizer tests.

Three layouts real models use:
  byte-level BPE tokenizer.json (GPT-2/Qwen style) with ChatML specials at the end of the vocab
      and one non-special added token,
  SentencePiece-style BPE tokenizer.json with "▁", byte fallback and <unk>/<s>/</s> first
      (Llama/Mistral style),
  SentencePiece tokenizer.model with byte fallback, plus added_tokens.json naming ChatML tokens
      past the end of its vocabulary (how older Llama fine-tunes ship them).
Every writer also writes a tokenizer_config.json and returns the directory.
"""

from __future__ import annotations

import collections
import inspect
import io
import json
import os
import re
import string
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import sentencepiece
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
UNSPECIAL = "<tool>"

# Texts to round-trip: unicode outside the training corpus, emoji, tabs, runs of spaces/newlines
SAMPLE_TEXTS = [
    "Hello, world!",
    "  leading spaces and trailing  ",
    "line one\nline two\n\n\tindented\r\nwindows",
    "Ünïcödé: naïve café, Straße, Ωμέγα, 日本語のテキスト",
    "emoji 🙂🚀 and ZWJ 👩‍💻 family",
    "code: def f(x):\n    return {'a': [1, 2, 3]}  # done",
    "numbers 1234567890 3.14159 -42",
    "",
    " ",
    "\n",
]


def corpus() -> list[str]:
    """About 100 KB of stdlib docstrings: deterministic for one Python version, offline."""
    texts = []
    for module in (os, json, collections, textwrap, string, re, inspect, io):
        for obj in vars(module).values():
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc:
                texts.append(doc)
    return texts


def make_config(model_dir: Path | str, **fields: Any) -> SimpleNamespace:
    """The config fields the tokenizer reads; ids not given are None, as for a bare config.json."""
    values = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "vocab_size": None}
    values.update(fields)
    return SimpleNamespace(model_dir=str(model_dir), **values)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")


def _added_tokens_decoder(tokenizer: Tokenizer) -> dict[str, dict]:
    return {
        str(i): {"content": t.content, "special": t.special}
        for i, t in tokenizer.get_added_tokens_decoder().items()
    }


def write_bytelevel_bpe(model_dir: Path, tokenizer_config: dict | None = None) -> Path:
    """Byte-level BPE, ChatML specials appended after the trained vocab, bos null, eos
    <|im_end|>, pad <|endoftext|> (Qwen2 layout)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHATML])
    tok.add_tokens([AddedToken(UNSPECIAL, special=False)])
    tok.save(str(model_dir / "tokenizer.json"))
    if tokenizer_config is None:
        tokenizer_config = {
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "added_tokens_decoder": _added_tokens_decoder(tok),
        }
    _write_json(model_dir / "tokenizer_config.json", tokenizer_config)
    return model_dir


def write_metaspace_bpe(model_dir: Path, tokenizer_config: dict | None = None) -> Path:
    """SentencePiece-style BPE in tokenizer.json: <unk> <s> </s>, then <0x00>..<0xFF> byte
    fallback tokens, then the trained pieces; "▁" marks spaces (Llama/Mistral layout)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, limit_alphabet=120, show_progress=False)
    tok.train_from_iterator(corpus(), trainer)

    # Put the 256 byte tokens right after the specials, as SentencePiece conversions do
    spec = json.loads(tok.to_str())
    trained = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    order = specials + [f"<0x{b:02X}>" for b in range(256)] + [t for t, _ in trained if t not in specials]
    spec["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    (model_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")

    if tokenizer_config is None:
        tokenizer_config = {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "added_tokens_decoder": _added_tokens_decoder(tok),
        }
    _write_json(model_dir / "tokenizer_config.json", tokenizer_config)
    return model_dir


def train_sentencepiece_model(path: Path) -> None:
    """A tokenizer.model with Llama's settings: BPE, byte fallback, identity normalisation,
    dummy prefix, <unk>=0 <s>=1 </s>=2."""
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=buf,
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        num_threads=1,
        minloglevel=2,
    )
    path.write_bytes(buf.getvalue())


def write_sentencepiece(model_dir: Path, tokenizer_config: dict | None = None) -> Path:
    """tokenizer.model plus added_tokens.json with <|im_start|>/<|im_end|> right after its vocab."""
    model_dir.mkdir(parents=True, exist_ok=True)
    train_sentencepiece_model(model_dir / "tokenizer.model")
    size = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model")).vocab_size()
    added = {"<|im_start|>": size, "<|im_end|>": size + 1}
    _write_json(model_dir / "added_tokens.json", added)
    if tokenizer_config is None:
        tokenizer_config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    _write_json(model_dir / "tokenizer_config.json", tokenizer_config)
    return model_dir
