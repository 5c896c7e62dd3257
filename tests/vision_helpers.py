"""What the vision tests of every family share."""

from __future__ import annotations

import numpy as np
import torch


def image(seed: int, width: int, height: int, mode: str = "RGB"):
    """A PIL image of random pixels (RGB, RGBA or L)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(data[..., 0] if channels == 1 else data, mode)


def assert_logits_match(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Within fp16 tolerance of transformers' logits, and the same top-1 at >= 99% of positions."""
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=2e-3)
    top1 = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert top1 >= 0.99, top1


def run_jobs(generator, jobs: list) -> dict:
    """Run dynamic-generator jobs to the end: {identifier: token ids, (identifier, "cached"): cached tokens}."""
    for job in jobs:
        generator.enqueue(job)
    out: dict = {}
    while generator.num_remaining_jobs():
        for r in generator.iterate():
            if r["stage"] == "streaming":
                out.setdefault(r["identifier"], []).extend(r.get("token_ids", torch.empty(1, 0)).view(-1).tolist())
                if r["eos"]:
                    out[r["identifier"], "cached"] = r["cached_tokens"]
    return out


def prompt_ids(parts: list) -> list[int]:
    """A prompt's ids from lists of plain ids and embeddings (each standing for its whole image block)."""
    ids: list[int] = []
    for part in parts:
        ids += part.get_ids() if hasattr(part, "get_ids") else part
    return ids
