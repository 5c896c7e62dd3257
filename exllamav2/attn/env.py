"""The attention environment variables, parsed in one place, at selection time (never at import).

Variables:
    EXLLAMA_ATTN_BACKEND   auto | flash_attn | xformers | sdpa | matmul   (unset or empty: auto)
    EXLLAMA_NO_FLASH_ATTN  boolean: disable flash-attn
    EXLLAMA_NO_XFORMERS    boolean: disable xformers
    EXLLAMA_NO_SDPA        boolean: disable PyTorch SDPA

Booleans are read by value: 1/true/yes/on disable; 0/false/no/off/empty (or unset) do not; anything
else is an error. (Upstream tested presence, so EXLLAMA_NO_FLASH_ATTN=0 used to disable.)

Precedence between the config flags and the environment:
1. A backend is disabled when its config flag (`config.no_flash_attn`, alias `no_flash_attention`,
   `no_xformers`, `no_sdpa`) is True OR its EXLLAMA_NO_* variable is true: either one disables,
   and neither can re-enable what the other disabled.
2. EXLLAMA_ATTN_BACKEND=NAME forces NAME on every device the model uses. Forcing a backend that is
   also disabled (by its flag or variable) is an error, not a silent pick of one or the other.
3. A forced backend that some device cannot run is an error naming the device, its capability,
   the reasons and the backends that would run there, raised before any weight is loaded.
4. Otherwise (auto) each device takes the first usable backend of its priority list, and the plan
   records why every earlier candidate was rejected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from ..errors import AttentionConfigError, did_you_mean  # AttentionConfigError re-exported: the attn package imports it from here

BACKEND_NAMES = ("flash_attn", "xformers", "sdpa", "matmul")

VAR_BACKEND = "EXLLAMA_ATTN_BACKEND"
VAR_NO = {
    "flash_attn": "EXLLAMA_NO_FLASH_ATTN",
    "xformers": "EXLLAMA_NO_XFORMERS",
    "sdpa": "EXLLAMA_NO_SDPA",
}
ATTN_VARS = (VAR_BACKEND, *VAR_NO.values())

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class AttnEnv:
    backend: str | None = None     # forced backend; None = auto
    no_flash_attn: bool = False
    no_xformers: bool = False
    no_sdpa: bool = False

    def disables(self, backend: str) -> bool:
        return backend in VAR_NO and getattr(self, "no_" + backend)


def _subject(name: str, value: str | None) -> str:
    """How the user gave it: '--attn-backend flash' for a flag, "EXLLAMA_ATTN_BACKEND='flash'" for a variable."""
    return f"{name} {value}" if name.startswith("-") else f"{name}={value!r}"


def parse_bool(name: str, value: str | None) -> bool:
    if value is None:
        return False
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    hint = did_you_mean(text, sorted(_TRUE | _FALSE - {""}))
    raise AttentionConfigError(
        f"{_subject(name, value)} is not a boolean{hint}; use 1/true/yes/on to disable or 0/false/no/off to keep it"
    )


def parse_backend(name: str, value: str | None) -> str | None:
    """The forced backend named by `value` (None for auto). `name` is what the user set: a variable or a flag."""
    text = (value or "").strip().lower()
    if text in ("", "auto"):
        return None
    if text not in BACKEND_NAMES:
        raise AttentionConfigError(
            f"{_subject(name, value)} is not an attention backend{did_you_mean(text, BACKEND_NAMES)}; "
            f"valid values: auto, {', '.join(BACKEND_NAMES)}"
        )
    return text


def parse_env(environ: Mapping[str, str]) -> AttnEnv:
    """Parse the attention variables out of `environ` (a plain mapping; nothing is read here)."""
    return AttnEnv(
        backend=parse_backend(VAR_BACKEND, environ.get(VAR_BACKEND)),
        no_flash_attn=parse_bool(VAR_NO["flash_attn"], environ.get(VAR_NO["flash_attn"])),
        no_xformers=parse_bool(VAR_NO["xformers"], environ.get(VAR_NO["xformers"])),
        no_sdpa=parse_bool(VAR_NO["sdpa"], environ.get(VAR_NO["sdpa"])),
    )


def attn_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The attention variables present in `environ` (default: the process environment, read now)."""
    source = os.environ if environ is None else environ
    return {k: source[k] for k in ATTN_VARS if k in source}
