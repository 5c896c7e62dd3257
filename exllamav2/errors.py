"""The project's errors. Each also subclasses the builtin a caller would catch for it, so existing
`except ValueError` / `except FileNotFoundError` / `except KeyError` clauses keep working.

Every message names the file or key, the value, and the fix. Command-line front ends (model_init,
examples/chat.py, convert.py) print any ExLlamaV2Error as one line; everything else is a bug and keeps
its traceback.

    ExLlamaV2Error
    ├── ConfigError (ValueError)                config.json missing keys, bad types, bad ranges
    │   └── ArchitectureError                   an architecture we cannot run
    ├── ModelFileNotFoundError (FileNotFoundError)   a model directory, config.json or shard is missing
    ├── CheckpointError (ValueError)            tensors disagree with config.json
    │   ├── TensorShapeError                    a tensor's shape is not what config.json implies
    │   ├── MissingTensorError (KeyError)       a tensor the layout reads is absent
    │   └── TensorFileError                     a safetensors file is truncated or malformed
    ├── TokenizerError (ValueError)             tokenizer files unreadable or inconsistent with the model
    ├── AttentionConfigError (ValueError)       EXLLAMA_ATTN_* variables, flags, a backend that can't run
    ├── InputError (ValueError)                 runtime inputs: input_ids, masks, text
    │   └── InputTypeError (TypeError)          ... of the wrong type or dtype
    ├── GenerationArgumentError (ValueError)    sampler settings and generator arguments
    ├── ConversionError (ValueError)            convert.py: bad input model, directories, options, disk
    └── UsageError (ValueError)                 command-line flags that cannot be combined
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ExLlamaV2Error(Exception):
    """Base of every error this package raises on purpose (bad input, not a bug)."""


class ConfigError(ExLlamaV2Error, ValueError):
    """config.json is missing, malformed or describes something we cannot run."""


class ArchitectureError(ConfigError):
    """The checkpoint's architecture is not one this package knows how to run."""


class ModelFileNotFoundError(ExLlamaV2Error, FileNotFoundError):
    """A file or directory the model needs is not there."""


class CheckpointError(ExLlamaV2Error, ValueError):
    """The checkpoint's tensors do not match the layout its config.json describes."""


class TensorShapeError(CheckpointError):
    """A checkpoint tensor disagrees with config.json."""


class MissingTensorError(CheckpointError, KeyError):
    """A tensor the model's layout reads is not in any of the checkpoint's files."""

    def __str__(self) -> str:
        # KeyError's str() is the repr of its argument (quotes, escaped newlines); print the message as is.
        return str(self.args[0]) if self.args else ""


class TensorFileError(CheckpointError):
    """A safetensors file is truncated or malformed (a missing one raises ModelFileNotFoundError)."""


class TokenizerError(ExLlamaV2Error, ValueError):
    """Tokenizer files are unreadable, or disagree with the model."""


class AttentionConfigError(ExLlamaV2Error, ValueError):
    """Bad attention settings: an unparseable variable, a conflict, or a forced backend that can't run."""


class InputError(ExLlamaV2Error, ValueError):
    """A runtime input (token ids, mask, text) that cannot be processed."""


class InputTypeError(InputError, TypeError):
    """A runtime input of the wrong Python type or tensor dtype."""


class GenerationArgumentError(ExLlamaV2Error, ValueError):
    """A sampler setting or generator argument that is wrong (not merely unusual)."""


class ConversionError(ExLlamaV2Error, ValueError):
    """A conversion job cannot start or continue: bad input model, directories, options or a full disk."""


class UsageError(ExLlamaV2Error, ValueError):
    """Command-line options that cannot be used (or combined) as given."""


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for a near miss or a unique prefix ('flash' -> flash_attn), else ''.

    For messages about a choice-valued flag or variable; the caller lists the valid values too."""
    choices = list(choices)
    text = str(value).strip().lower()
    near = [c for c in choices if text and c.lower().startswith(text)]
    if len(near) != 1:
        near = difflib.get_close_matches(text, choices, n=1, cutoff=0.6)
    return f" (did you mean {near[0]}?)" if near else ""
