"""Validation of a raw config.json (the parsed dict) before ExLlamaV2Config reads anything from it.

ExLlamaV2Config converts values with int()/float(), which truncates (`hidden_size: 128.5` became 128)
or fails with a bare ValueError/KeyError/TypeError naming neither the file nor the key. This module
checks the type and range of every key config.py reads, and every rope_scaling/rope_parameters type's
required fields, and raises one ConfigError naming the file, the key, the value and the fix.

Keys are looked up as config.py does: in the top level first, then in text_config (multimodal
checkpoints nest the text model there). An absent key or a JSON null means "use the default" and is
not checked; config.py's own `required=True` reads report missing required keys.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable

from .errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["validate_config", "validate_generation_config"]

# A check returns None when the value is fine, else what the value should be ("a positive integer").
Check = Callable[[Any], "str | None"]

_ORIGINAL = "set it to the value in the model's original config.json"


def _is_int(v: Any) -> bool:
    # bool is an int subclass in Python; JSON true is never a size. An integral float (4096.0) loses nothing.
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def pos_int(v: Any) -> str | None:
    return None if _is_int(v) and v > 0 else "a positive integer"


def pos_int_upto(limit: int) -> Check:
    """A positive integer no larger than `limit`: sizes beyond it are corrupt values (a layer count of 10^12
    would otherwise allocate per-layer lists until memory runs out)."""
    def check(v: Any) -> str | None:
        return None if _is_int(v) and 0 < v <= limit else f"a positive integer up to {limit}"
    return check


_INT32 = 2**31 - 1           # tensor sizes are indexed with int32 by the kernels
_COUNT = 65536               # layers and heads: far above any real model


def nonneg_int(v: Any) -> str | None:
    return None if _is_int(v) and v >= 0 else "a non-negative integer"


def integer(v: Any) -> str | None:
    return None if _is_int(v) else "an integer"


def pos_num(v: Any) -> str | None:
    return None if _is_num(v) and v > 0 else "a positive number"


def number(v: Any) -> str | None:
    return None if _is_num(v) else "a finite number"


def nonzero_num(v: Any) -> str | None:
    return None if _is_num(v) and v != 0 else "a finite, non-zero number"


def fraction(v: Any) -> str | None:
    return None if _is_num(v) and 0 < v <= 1 else "a number in (0, 1]"


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def string(v: Any) -> str | None:
    return None if isinstance(v, str) else "a string"


def token_ids(v: Any) -> str | None:
    if nonneg_int(v) is None or (isinstance(v, list) and v and all(nonneg_int(x) is None for x in v)):
        return None
    return "a token id (a non-negative integer) or a non-empty list of them"


def number_list(v: Any) -> str | None:
    return None if isinstance(v, list) and v and all(_is_num(x) for x in v) else "a non-empty list of numbers"


def string_list(v: Any) -> str | None:
    return None if isinstance(v, list) and all(isinstance(x, str) for x in v) else "a list of strings"


def flag_list(v: Any) -> str | None:
    ok = isinstance(v, list) and all(x in (0, 1) for x in v)
    return None if ok else "a list of 0/1 (or true/false) per layer"


# key (first name is the one reported; the others are aliases config.py also reads) -> check, fix
_KEYS: tuple[tuple[tuple[str, ...], Check, str], ...] = (
    (("hidden_size", "d_model"), pos_int_upto(_INT32), _ORIGINAL),
    (("num_hidden_layers", "n_layer"), pos_int_upto(_COUNT), _ORIGINAL),
    (("num_attention_heads", "n_head"), pos_int_upto(_COUNT), _ORIGINAL),
    (("num_key_value_heads",), pos_int_upto(_COUNT), _ORIGINAL + " (remove it for multi-head attention)"),
    (("head_dim",), pos_int_upto(_INT32), _ORIGINAL + " (remove it to use hidden_size / num_attention_heads)"),
    (("intermediate_size",), pos_int_upto(_INT32), _ORIGINAL),
    (("vocab_size",), pos_int_upto(_INT32), _ORIGINAL),
    (("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon", "norm_eps"), pos_num,
     "e.g. 1e-05 or 1e-06"),
    (("tie_word_embeddings",), boolean, "write true or false"),
    (("torch_dtype", "dtype"), string, 'write e.g. "float16" or "bfloat16"'),
    (("hidden_act",), string, 'write e.g. "silu"'),
    (("hidden_activation",), string, 'write e.g. "gelu_pytorch_tanh"'),
    (("partial_rotary_factor",), fraction, "remove it to rotate the whole head"),
    (("attn_logit_softcapping",), pos_num, "remove it (or null) for no softcap"),
    (("final_logit_softcapping",), pos_num, "remove it (or null) for no softcap"),
    (("query_pre_attn_scalar",), pos_num, "remove it to scale by head_dim"),
    (("attention_multiplier",), pos_num, _ORIGINAL),
    (("residual_multiplier",), number, _ORIGINAL),
    (("logits_scaling",), nonzero_num, _ORIGINAL),
    (("logit_scale",), number, _ORIGINAL),
    (("original_max_position_embeddings",), pos_int_upto(_INT32), "the context length the model was trained at"),
    (("embedding_multiplier",), number, _ORIGINAL),
    (("bos_token_id",), token_ids, "use the id of the tokenizer's BOS token, or null"),
    (("eos_token_id",), token_ids, "use the id(s) of the tokenizer's EOS token(s), or null"),
    (("pad_token_id",), integer, "use the id of the padding token, or null"),
    (("max_position_embeddings", "max_sequence_length", "n_positions"), pos_int_upto(_INT32),
     "the model's context length"),
    (("sliding_window",), nonneg_int, "the window in tokens, or null for none"),
    (("use_sliding_window",), boolean, "write true or false"),
    (("layer_types",), string_list, 'one "full_attention", "sliding_attention" or "chunked_attention" per layer'),
    (("no_rope_layers",), flag_list, "one 1 (RoPE) or 0 (no RoPE) per layer"),
    (("no_rope_layer_interval",), pos_int_upto(_COUNT), _ORIGINAL),
    (("intermediate_size_mlp",), pos_int_upto(_INT32), _ORIGINAL),
    (("interleave_moe_layer_step",), pos_int_upto(_COUNT), _ORIGINAL),
    (("attention_chunk_size",), pos_int_upto(_INT32), "the chunk in tokens, or null for no chunked attention"),
    (("floor_scale",), pos_num, _ORIGINAL),
    (("attn_scale",), number, _ORIGINAL),
    (("rope_theta",), pos_num, "e.g. 10000.0"),
    (("rope_local_base_freq",), pos_num, "e.g. 10000.0"),
)


def _fail(path: str, key: str, value: Any, expected: str, fix: str) -> ConfigError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return ConfigError(f"{path}: {key} is {shown}, but must be {expected}; {fix}")


class _Lookup:
    """Finds a key as config.py does (top level, then text_config) and remembers where it was."""

    def __init__(self, raw: dict, path: str) -> None:
        self.path = path
        text = raw.get("text_config")
        if text is not None and not isinstance(text, dict):
            raise _fail(path, "text_config", text, "an object", "remove it or give the text model's settings")
        self.sources = (("", raw), ("text_config.", text or {}))

    def find(self, names: tuple[str, ...]) -> tuple[str, Any] | None:
        """(reported key, value) of the first non-null match, or None."""
        for name in names:
            for prefix, src in self.sources:
                if src.get(name) is not None:
                    return prefix + name, src[name]
        return None

    def get(self, *names: str, default: Any = None) -> Any:
        found = self.find(names)
        return default if found is None else found[1]


def _check_keys(look: _Lookup) -> None:
    for names, check, fix in _KEYS:
        found = look.find(names)
        if found is not None and (expected := check(found[1])) is not None:
            raise _fail(look.path, found[0], found[1], expected, fix)


def _check_architectures(raw: dict, path: str) -> None:
    archs = raw.get("architectures")
    if archs is None:
        return          # config.py reports the missing key with the fix
    if not isinstance(archs, list) or not all(isinstance(a, str) and a for a in archs):
        raise _fail(path, "architectures", archs, "a list of architecture names",
                    'write e.g. ["LlamaForCausalLM"]')


def _check_sizes(look: _Lookup) -> None:
    """Relations between sizes: heads dividing, a head size that fits, per-layer lists long enough."""
    path = look.path
    heads = look.get("num_attention_heads", "n_head")
    kv_heads = look.get("num_key_value_heads", default=heads)
    hidden = look.get("hidden_size", "d_model")
    layers = look.get("num_hidden_layers", "n_layer")
    if heads and kv_heads and heads % kv_heads:
        raise ConfigError(
            f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}; "
            f"set num_key_value_heads to a divisor of {heads} ({_ORIGINAL})"
        )
    head_dim = look.get("head_dim")
    if head_dim is None and hidden and heads and hidden % heads:
        raise ConfigError(
            f"{path}: hidden_size {hidden} is not divisible by num_attention_heads {heads} and there is no "
            f"head_dim; add head_dim or fix the two sizes ({_ORIGINAL})"
        )
    head_dim = head_dim or (hidden // heads if hidden and heads else None)
    factor = look.get("partial_rotary_factor", default=1.0)
    if head_dim and int(head_dim * factor) // 2 * 2 == 0:
        raise ConfigError(
            f"{path}: head size {head_dim} with partial_rotary_factor {factor} leaves no dimension to rotate; "
            f"{_ORIGINAL}"
        )
    for key in ("layer_types", "no_rope_layers"):
        per_layer = look.find((key,))
        # an empty list is Llama 4's "from no_rope_layer_interval" (config.py)
        if per_layer is not None and layers and 0 < len(per_layer[1]) < layers:
            raise ConfigError(
                f"{path}: {per_layer[0]} has {len(per_layer[1])} entries but num_hidden_layers is {layers}; "
                f"give one entry per layer"
            )


# rope type -> (required field -> check, optional field -> check)
_ROPE_FIELDS: dict[str, tuple[dict[str, Check], dict[str, Check]]] = {
    "default": ({}, {}),
    "linear": ({"factor": pos_num}, {}),
    "dynamic": ({"factor": pos_num}, {"original_max_position_embeddings": pos_int}),
    "llama3": ({"factor": pos_num, "low_freq_factor": pos_num, "high_freq_factor": pos_num,
                "original_max_position_embeddings": pos_int}, {}),
    "yarn": ({"factor": pos_num}, {"original_max_position_embeddings": pos_int, "beta_fast": pos_num,
                                   "beta_slow": pos_num, "mscale": number, "mscale_all_dim": number,
                                   "attention_factor": pos_num, "truncate": boolean}),
    "longrope": ({"short_factor": number_list, "long_factor": number_list},
                 {"original_max_position_embeddings": pos_int, "attention_factor": pos_num,
                  "factor": pos_num}),
}
_ROPE_FIELDS["su"] = _ROPE_FIELDS["longrope"]
_ROPE_COMMON: dict[str, Check] = {"rope_theta": pos_num, "partial_rotary_factor": fraction}


def _check_rope_dict(path: str, key: str, params: Any) -> None:
    """One rope_scaling / rope_parameters object: its type's required fields, all fields typed."""
    if not isinstance(params, dict):
        raise _fail(path, key, params, "an object such as {\"rope_type\": \"linear\", \"factor\": 2.0}",
                    "write it as an object, or null for no scaling")
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if not isinstance(rope_type, str):
        raise _fail(path, f"{key}.rope_type", rope_type, "a string", "write e.g. \"linear\" or \"yarn\"")
    if rope_type not in _ROPE_FIELDS:
        return          # config.py refuses unsupported types, listing the supported ones
    required, optional = _ROPE_FIELDS[rope_type]
    for field, check in required.items():
        if params.get(field) is None:
            raise ConfigError(
                f"{path}: {key} of type {rope_type!r} has no {field!r} (it needs "
                f"{', '.join(required)}); add it from the model's original config.json, or remove {key}"
            )
    for field, check in {**_ROPE_COMMON, **required, **optional}.items():
        value = params.get(field)
        if value is not None and (expected := check(value)) is not None:
            raise _fail(path, f"{key}.{field}", value, expected, _ORIGINAL)
    if rope_type == "llama3" and params["high_freq_factor"] <= params["low_freq_factor"]:
        raise ConfigError(
            f"{path}: {key}.high_freq_factor {params['high_freq_factor']} must be greater than "
            f"low_freq_factor {params['low_freq_factor']}; {_ORIGINAL}"
        )


def _check_rope(look: _Lookup) -> None:
    found = look.find(("rope_parameters",))
    if found is not None:
        key, params = found
        if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
            for layer_type, sub in params.items():       # per layer type (Gemma 3)
                if sub is not None:
                    _check_rope_dict(look.path, f"{key}.{layer_type}", sub)
        else:
            _check_rope_dict(look.path, key, params)
    found = look.find(("rope_scaling",))
    if found is not None:
        _check_rope_dict(look.path, *found)


def _check_quantization(raw: dict, path: str) -> None:
    q = raw.get("quantization_config")
    if q is not None and not isinstance(q, dict):
        raise _fail(path, "quantization_config", q, "an object", "remove it for an unquantized model")


def _warn_ids_outside_vocab(look: _Lookup) -> None:
    """An EOS id the head cannot produce never ends generation; it is legal, so only warn."""
    vocab = look.get("vocab_size")
    eos = look.get("eos_token_id")
    ids = [eos] if _is_int(eos) else eos or []
    outside = [i for i in ids if vocab and i >= vocab]
    if outside:
        log.warning("%s: eos_token_id %s is outside the vocabulary (vocab_size %d); generation cannot "
                    "stop on it", look.path, outside, vocab)


def validate_config(raw: Any, path: str | os.PathLike) -> None:
    """Check a parsed config.json (`raw`, read from `path`) before any value is converted.

    Raises ConfigError naming the file, the key, the value and the fix for a value of the wrong
    type or range, sizes that do not fit together, or rope scaling without its required fields."""
    path = str(path)
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the top level is a JSON {type(raw).__name__}, but config.json must be an object "
            f'({{"architectures": [...], "hidden_size": ...}}); use the model\'s original config.json'
        )
    _check_architectures(raw, path)
    look = _Lookup(raw, path)
    _check_keys(look)
    _check_sizes(look)
    _check_rope(look)
    _check_quantization(raw, path)
    _warn_ids_outside_vocab(look)


def validate_generation_config(gen: Any, path: str | os.PathLike) -> None:
    """Check a parsed generation_config.json: an object whose token ids are ids or lists of ids."""
    path = str(path)
    if not isinstance(gen, dict):
        raise ConfigError(f"{path}: the top level is a JSON {type(gen).__name__}, but must be an object; "
                          f"fix or remove generation_config.json")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = gen.get(key)
        if value is not None and (expected := token_ids(value)) is not None:
            raise _fail(path, key, value, expected, "use the tokenizer's token id(s), or remove the key")
