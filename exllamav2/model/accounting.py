"""The load-time account of a checkpoint: every tensor in the files must be one the built model reads.

A tensor no module reads means the checkpoint has parts the chosen layout does not know (a q/k norm,
a bias, a vision tower, an architecture that only resembles the one named); running without it
would give wrong output, so it is refused before any weight is read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from ..errors import CheckpointError

log = logging.getLogger(__name__)

# Buffers some checkpoints store that are recomputed from config.json, never read.
_DERIVED_TENSORS = (".rotary_emb.inv_freq",)
_LISTED = 20   # names shown in the error; the rest are counted


def unaccounted_tensors(names: Iterable[str], owners: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Tensor names not of the form `<key>.<suffix>` for an owner key and one of its suffixes."""
    left = []
    for name in names:
        key, _, suffix = name.rpartition(".")
        if suffix in owners.get(key, ()) or name.endswith(_DERIVED_TENSORS):
            continue
        left.append(name)
    return sorted(left)


def check_tensors_accounted(names: Iterable[str], owners: Mapping[str, tuple[str, ...]], architecture: str,
                            files: list[str], vision_prefixes: tuple[str, ...] = ()) -> None:
    """Refuse tensors the layout does not read; a multimodal checkpoint's vision tower and projector (under
    `vision_prefixes`) are set apart as the vision model's, and said so once."""
    names = list(names)
    vision = [n for n in names if n.startswith(vision_prefixes)] if vision_prefixes else []
    if vision:
        log.info("%s: %d vision tower and projector tensors are the vision model's; the text model does not read "
                 "them", architecture, len(vision))
    left = unaccounted_tensors((n for n in names if not vision or not n.startswith(vision_prefixes)), owners)
    if not left:
        return
    shown = ", ".join(left[:_LISTED]) + (f" and {len(left) - _LISTED} more" if len(left) > _LISTED else "")
    raise CheckpointError(
        f"{len(left)} tensor(s) in {', '.join(files)} are not read by the {architecture} layout: {shown}. "
        f"The checkpoint has parts this architecture does not have, so running it would give wrong output; "
        f"check config.json's 'architectures' entry names the model these weights belong to"
    )
