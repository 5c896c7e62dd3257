"""MRoPE positions of a prompt (Qwen2-VL, Qwen2.5-VL), as transformers' get_rope_index computes them.

Text tokens get one position for all three components (temporal, height, width), counting up. An image's tokens
get (start + t, start + row, start + column) over its merged grid, where start is the position the image begins
at; the text after it continues from start + max(rows, columns), one past the image's largest position. Past
the prompt every position is the token's index plus the prompt's `delta` (its last position + 1 minus its
length), all three components equal.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..model.embedding import EMBEDDING_INDEX


class MRopeLayout:
    """The MRoPE positions of one sequence's prompt and the offset of every position after it."""

    def __init__(self, positions: torch.Tensor, delta: int) -> None:
        self.positions = positions          # (3, prompt length) long
        self.delta = delta

    def window(self, start: int, length: int) -> torch.Tensor:
        """Positions (3, length) of the tokens at indices start .. start + length - 1."""
        end = start + length
        inside = self.positions[:, start:min(end, self.positions.shape[1])]
        first_after = max(start, self.positions.shape[1])
        after = torch.arange(first_after, max(end, first_after), dtype=torch.long) + self.delta
        return torch.cat((inside, after.view(1, -1).expand(3, -1)), dim=1)


def _image_positions(start: int, grid: tuple[int, int, int]) -> torch.Tensor:
    t, h, w = grid
    pos = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
    return pos.reshape(3, -1) + start


def mrope_layout(ids: Sequence[int], embeddings: Sequence[Any] | None) -> MRopeLayout | None:
    """The layout of a prompt of raw ids (each embedding's own ids, see ExLlamaV2MMEmbedding.get_ids), or None
    when it holds no embedding with an `mrope_grid` (plain 1-D positions are then exact)."""
    starts = {EMBEDDING_INDEX + e.first_index: e for e in embeddings or () if getattr(e, "mrope_grid", None)}
    if not starts or not any(i in starts for i in ids):
        return None
    parts: list[torch.Tensor] = []
    pos = i = 0
    while i < len(ids):
        e = starts.get(ids[i])
        if e is None:
            text = i
            while i < len(ids) and ids[i] not in starts:
                i += 1
            parts.append(torch.arange(pos, pos + i - text).view(1, -1).expand(3, -1))
            pos += i - text
            continue
        own = list(range(ids[i], ids[i] + e.length))
        if list(ids[i:i + e.length]) != own:
            raise ValueError("an image embedding's ids are split or cut short in the prompt; place its text alias "
                             "whole")
        parts.append(_image_positions(pos, e.mrope_grid))
        pos += max(e.mrope_grid[1], e.mrope_grid[2])
        i += e.length
    positions = torch.cat(parts, dim=1).long()
    return MRopeLayout(positions, int(positions.max()) + 1 - len(ids))


def batch_positions(layouts: Sequence[MRopeLayout | None], starts: Sequence[int], length: int) -> torch.Tensor | None:
    """(3, B, length) positions of `length` tokens from starts[b] in each sequence; None when no sequence has an
    image (1-D positions are then exact)."""
    if all(layout is None for layout in layouts):
        return None
    rows = []
    for layout, start in zip(layouts, starts):
        if layout is None:
            rows.append(torch.arange(start, start + length).view(1, -1).expand(3, -1))
        else:
            rows.append(layout.window(start, length))
    return torch.stack(rows, dim=1)


def forward_args(layout: MRopeLayout | None, start: int, length: int) -> dict:
    """ExLlamaV2.forward's mrope_positions for `length` tokens from `start` of a one-row batch ({} without images)."""
    return {} if layout is None else {"mrope_positions": layout.window(start, length).unsqueeze(1)}
