"""Reading an image processor's preprocessor_config.json, for every family: the keys a family's processor reads
that we apply are its own, the bookkeeping keys are shared; any other key, a switched-off step or another
resampling filter is refused by name (we would compute something else than the processor)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError

# keys that only name or describe the processor, or apply to batches (padding to a common size) and videos
BOOKKEEPING_KEYS = {
    "image_processor_type", "processor_class", "feature_extractor_type", "image_processor_class",
    "default_to_square", "data_format", "input_data_format", "device", "return_tensors", "disable_grouping",
    "do_pad", "image_seq_length", "video_processor_type",
}
BICUBIC = 3      # PIL's (and transformers') code for bicubic resampling


def read_preprocessor(path: Path, keys: set[str]) -> dict:
    """preprocessor_config.json as a dict ({} where there is none: the processor's defaults apply), refused if it
    holds a key outside `keys` and the bookkeeping ones, turns a step off, or resamples other than bicubic."""
    pre: dict = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    unknown = sorted(set(pre) - keys - BOOKKEEPING_KEYS)
    if unknown:
        raise ConfigError(f"{path}: image processor settings {', '.join(map(repr, unknown))} are not supported")
    for switch in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if pre.get(switch) is False:
            raise ConfigError(f"{path}: {switch}: false is not supported (the processor always does it)")
    if pre.get("resample", BICUBIC) != BICUBIC:
        raise ConfigError(f"{path}: resample {pre['resample']!r} is not supported (only 3, bicubic)")
    return pre
