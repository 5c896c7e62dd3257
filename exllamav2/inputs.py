"""Checks of runtime inputs where they enter: token ids given to forward(), text given to the tokenizer,
and sampler settings.

Each raises one ExLlamaV2Error subclass (also the builtin a caller would catch) naming the argument,
the value and the fix, before any work is done. Without them a float input_ids failed deep in the
embedding with an IndexError, an empty (1, 0) input with a torch.cat error, and a negative
temperature sampled from inverted probabilities.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .errors import GenerationArgumentError, InputError, InputTypeError

__all__ = ["check_input_ids", "check_text", "check_sampler_settings"]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_input_ids(input_ids: Any, name: str = "input_ids") -> None:
    """input_ids must be a 2-D integer tensor (batch, length) with at least one token per row."""
    if not isinstance(input_ids, torch.Tensor):
        raise InputTypeError(
            f"{name} must be a torch.Tensor of token ids, shape (batch, length), not {type(input_ids).__name__}; "
            f"use tokenizer.encode(text) or torch.tensor([[...]])"
        )
    if input_ids.dtype not in _INT_DTYPES:
        raise InputTypeError(
            f"{name} has dtype {input_ids.dtype}, but token ids must be integers; use tokenizer.encode(text) "
            f"or convert with {name}.long()"
        )
    if input_ids.dim() != 2:
        raise InputError(
            f"{name} must be (batch, length), got shape {tuple(input_ids.shape)}; "
            f"add a batch dimension with {name}.unsqueeze(0)" if input_ids.dim() == 1 else
            f"{name} must be (batch, length), got shape {tuple(input_ids.shape)}"
        )
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise InputError(
            f"{name} has shape {tuple(input_ids.shape)}: there is no token to process; pass at least one "
            f"token per sequence (an empty prompt still needs the BOS token: tokenizer.encode('', add_bos=True))"
        )


def check_text(text: Any, name: str = "text") -> None:
    """Tokenizer input: a str, or a list of str (a batch)."""
    if isinstance(text, str):
        return
    if isinstance(text, list) and all(isinstance(t, str) for t in text):
        return
    bad = next((t for t in text if not isinstance(t, str)), None) if isinstance(text, list) else text
    raise InputTypeError(
        f"{name} must be a string or a list of strings, got {type(bad).__name__} ({bad!r:.60}); "
        f"convert it with str() first"
    )


def _number(settings: Any, attr: str) -> float | None:
    """The setting as a float, None when it is absent; refuses non-numbers and NaN."""
    value = getattr(settings, attr, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise GenerationArgumentError(f"sampler setting {attr} = {value!r} is not a number; give a number")
    return float(value)


# setting -> (lowest allowed, highest allowed, what it means / the fix). Only values that are wrong,
# not merely unusual: a temperature of 5 is odd but meaningful; -1 is not.
_RANGES: dict[str, tuple[float, float, str]] = {
    "temperature": (0.0, math.inf, "0 is greedy; 1 leaves the distribution as is"),
    "top_p": (0.0, 1.0, "0 (or 1) turns top-P off"),
    "min_p": (0.0, 1.0, "0 turns min-P off"),
    "top_a": (0.0, math.inf, "0 turns top-A off"),
    "tfs": (0.0, 1.0, "0 (or 1) turns tail-free sampling off"),
    "typical": (0.0, 1.0, "0 (or 1) turns typical sampling off"),
    "skew": (-math.inf, math.inf, "0 turns skew off"),
    "smoothing_factor": (0.0, math.inf, "0 turns quadratic sampling off"),
    "cfg_scale": (-math.inf, math.inf, "1 is the positive prompt alone"),
    "token_repetition_penalty": (0.0, math.inf, "1 turns the repetition penalty off; it must be above 0"),
    "token_frequency_penalty": (-math.inf, math.inf, "0 turns the frequency penalty off"),
    "token_presence_penalty": (-math.inf, math.inf, "0 turns the presence penalty off"),
    "token_repetition_range": (-1, math.inf, "-1 covers the whole context"),
    "token_repetition_decay": (0, math.inf, "0 turns decay off"),
    "mirostat_tau": (0.0, math.inf, "a target surprise in bits, e.g. 1.5"),
    "mirostat_eta": (0.0, math.inf, "a learning rate, e.g. 0.1"),
    "min_temp": (0.0, math.inf, "the dynamic temperature's lower end"),
    "max_temp": (0.0, math.inf, "the dynamic temperature's upper end"),
    "temp_exponent": (0.0, math.inf, "1 is linear"),
    "xtc_probability": (0.0, 1.0, "0 turns XTC off"),
    "xtc_threshold": (0.0, 1.0, "a probability, e.g. 0.1"),
    "dry_multiplier": (0.0, math.inf, "0 turns DRY off"),
    "dry_base": (0.0, math.inf, "e.g. 1.75"),
    "dry_allowed_length": (0, math.inf, "e.g. 2"),
    "dry_range": (0, math.inf, "0 covers the whole context"),
}
_INTEGERS = ("top_k", "token_repetition_range", "token_repetition_decay", "dry_allowed_length", "dry_range")
_OPEN_BELOW = ("token_repetition_penalty",)     # 0 itself divides by zero


def _check_integers(settings: Any) -> None:
    for attr in _INTEGERS:
        value = getattr(settings, attr, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise GenerationArgumentError(f"sampler setting {attr} = {value!r} must be an integer")
    top_k = getattr(settings, "top_k", None)
    if top_k is not None and top_k < 0:
        raise GenerationArgumentError(f"sampler setting top_k = {top_k} is negative; 0 turns top-K off, 1 is greedy")


def check_sampler_settings(settings: Any) -> None:
    """Refuse sampler settings that are wrong rather than unusual: a negative temperature, top_p outside
    [0, 1], a negative top_k, a repetition penalty of 0 or below, NaN anywhere, a dynamic temperature
    range upside down. Absent attributes are skipped, so any Settings-like object can be checked."""
    _check_integers(settings)
    for attr, (low, high, meaning) in _RANGES.items():
        value = _number(settings, attr)
        if value is None:
            continue
        too_low = value <= low if attr in _OPEN_BELOW else value < low
        if too_low or value > high:
            bounds = f"above {low:g}" if attr in _OPEN_BELOW else f"at least {low:g}"
            if high != math.inf:
                bounds = f"between {low:g} and {high:g}"
            raise GenerationArgumentError(f"sampler setting {attr} = {value!r} is out of range: it must be "
                                          f"{bounds} ({meaning})")
    low, high = _number(settings, "min_temp"), _number(settings, "max_temp")
    if low is not None and high is not None and 0 < high < low:     # max_temp 0 means dynamic temperature off
        raise GenerationArgumentError(f"sampler settings min_temp = {low:g} is above max_temp = {high:g}; swap them")
