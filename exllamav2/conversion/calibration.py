"""Calibration text: a user's parquet or text file, or a built-in corpus, cut into token rows.

The built-in corpus is the docstrings of a fixed list of Python standard-library modules: prose,
code and lists, available offline and identical for one Python version.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BUILTIN_NAME = "(built-in: Python standard library docstrings)"

_STDLIB_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email.message", "email.utils", "enum", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
    "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client", "http.cookiejar", "http.server",
    "imaplib", "inspect", "ipaddress", "itertools", "json", "locale", "logging", "logging.handlers",
    "mailbox", "math", "multiprocessing.pool", "numbers", "operator", "optparse", "os", "pathlib",
    "pickle", "pkgutil", "platform", "poplib", "pprint", "pydoc", "queue", "random", "re", "sched",
    "selectors", "shlex", "shutil", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "traceback", "turtle", "typing", "unittest", "unittest.mock", "urllib.parse", "urllib.request",
    "uuid", "warnings", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile",
)

_CHUNK_CHARS = 16384


def builtin_documents() -> list[str]:
    with warnings.catch_warnings():                 # deprecated aliases (typing.io) warn when touched
        warnings.simplefilter("ignore", DeprecationWarning)
        return _stdlib_docstrings()


def _stdlib_docstrings() -> list[str]:
    docs = []
    for name in _STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if doc := inspect.getdoc(mod):
            docs.append(doc)
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and (doc := inspect.getdoc(obj)):
                docs.append(f"{attr}\n\n{doc}")
            if inspect.isclass(obj):
                for member, fn in sorted(vars(obj).items()):
                    if inspect.isfunction(fn) and not member.startswith("_") and (doc := inspect.getdoc(fn)):
                        docs.append(f"{attr}.{member}\n\n{doc}")
    return docs


def read_documents(path: str | None) -> list[str]:
    """Documents from a .parquet file (its "text" column, or its first string column) or a text
    file; the built-in corpus when path is None."""
    if path is None:
        return builtin_documents()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"calibration dataset {p} does not exist")
    if p.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"reading {p} needs pyarrow: pip install pyarrow (or pass a plain text file with -c)") from e
        table = pq.read_table(p)
        columns = [c for c in table.column_names if str(table.schema.field(c).type) in ("string", "large_string")]
        if not columns:
            raise ValueError(f"{p}: no text column (looked for a string column, preferably named 'text')")
        column = "text" if "text" in columns else columns[0]
        return [t for t in table.column(column).to_pylist() if t]
    text = p.read_text(encoding="utf-8", errors="replace")
    return [t for t in text.split("\n\n") if t.strip()] or [text]


def token_rows(tokenizer, documents: list[str], rows: int, length: int) -> torch.Tensor:
    """LongTensor [rows, length] from the documents' tokens laid end to end (repeated if short)."""
    need = rows * length
    ids: list[int] = []
    chunk: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal size
        if chunk:
            ids.extend(tokenizer.encode("\n\n".join(chunk))[0].tolist())
            chunk.clear()
            size = 0

    for doc in documents:
        chunk.append(doc)
        size += len(doc)
        if size >= _CHUNK_CHARS:
            flush()
            if len(ids) >= need:
                break
    flush()
    if not ids:
        raise ValueError("calibration text produced no tokens")
    if len(ids) < need:
        log.warning("calibration text has %d tokens, fewer than %d rows x %d; repeating it", len(ids), rows, length)
        ids = (ids * (need // len(ids) + 1))
    return torch.tensor(ids[:need], dtype=torch.long).view(rows, length)
