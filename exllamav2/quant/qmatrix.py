"""Kernel form of a quantized linear layer (EXL2 or GPTQ from exllamav2.quant) for exllamav2_ext.

The load-time preparation is plain PyTorch and runs (and is tested) on the CPU. The kernels (cuda/q_matrix.cu)
decode one column of one *chunk* at a time: at most 32 stored rows that lie in one group and start on a
q_weight word row, so the chunk's codes are one LSB-first bitstream of `bits`-wide fields. Preparation builds:
- the chunk table, int32 [chunks, 5]: first stored row, rows, bits, first q_weight row, group;
- the permutation as int32 (stored row k holds input feature perm[k]; None when it is the identity). int32
  instead of upstream's uint16 lifts the K <= 65535 limit on the kernel side;
- for GPTQ whose g_idx is not sorted, a copy of qweight with rows reordered so each group is contiguous
  (upstream's make_sequential), the order becoming the permutation.
Upstream's per-row q_group_map and its load-time weight shuffles are not needed by these kernels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Sequence

import torch

from . import exl2, gptq
from .exl2 import Exl2Group
if TYPE_CHECKING:
    from .qlinear import Exl2Weight, GptqWeight, QuantWeight

log = logging.getLogger(__name__)

CHUNK_ROWS = 32
MAX_FUSED_ROWS = 32           # more input rows than this: reconstruct + cuBLAS instead of the fused kernel
FORMAT_EXL2, FORMAT_GPTQ = 0, 1   # QFORMAT_* in cuda/q_matrix.h
_REPACK_COLUMNS = 4096        # column slice when reordering GPTQ rows, to bound temporary memory


@dataclass
class PreparedQMatrix:
    """Everything the extension's QMatrix takes, on the layer's device."""

    format: int
    q_weight: torch.Tensor               # int32 [words, columns]
    chunks: torch.Tensor                 # int32 [chunks, 5]
    perm: torch.Tensor | None            # int32 [K]
    in_features: int
    out_features: int
    bias: torch.Tensor | None            # fp16 [N]
    q_scale: torch.Tensor | None = None  # EXL2: int32 [G, columns/8]
    scale_max: torch.Tensor | None = None  # EXL2: fp16 [G], prescaled
    scales: torch.Tensor | None = None   # GPTQ: fp16 [G, N]
    qzeros: torch.Tensor | None = None   # GPTQ: int32 [G, N/8] (v1 zeros)
    zero_offset: int = 0                 # GPTQ: zero point = stored zero + zero_offset


def chunk_rows(row_start: int, rows: int, bits: int, word_start: int, group: int) -> list[list[int]]:
    """Chunks of one run of `rows` stored rows of `group` whose bitstream starts at q_weight row `word_start`."""
    out = []
    for i in range(0, rows, CHUNK_ROWS):
        out.append([row_start + i, min(CHUNK_ROWS, rows - i), bits, word_start + i * bits // 32, group])
    return out


def exl2_chunks(groups: Sequence[Exl2Group]) -> torch.Tensor:
    """Chunk table of an EXL2 layer. Each group's rows·bits is a multiple of 32 except the last group's,
    so every 32-row chunk (32·bits bits) starts on a word row."""
    table = []
    for g, grp in enumerate(groups):
        table += chunk_rows(grp.row_start, grp.rows, grp.bits, grp.word_start, g)
    return torch.tensor(table, dtype=torch.int32).view(-1, 5)


def gptq_chunks(row_groups: torch.Tensor) -> torch.Tensor:
    """Chunk table of 4-bit rows whose group indices `row_groups` [K] are sorted. Raises ValueError when a group
    starts inside a q_weight word (not a multiple of 8 rows), which the kernels cannot address."""
    groups = row_groups.cpu()
    if groups.numel() and bool((groups[1:] < groups[:-1]).any()):
        raise ValueError("gptq_chunks: row groups must be sorted; reorder the rows first")
    values, counts = torch.unique_consecutive(groups, return_counts=True)
    table, row = [], 0
    for g, rows in zip(values.tolist(), counts.tolist()):
        if row % 8:
            raise ValueError(
                f"GPTQ group {g} starts at row {row}, inside a packed word (groups must start on multiples of 8 "
                f"rows); this layer runs on the PyTorch path"
            )
        table += chunk_rows(row, rows, 4, row // 8, g)
        row += rows
    return torch.tensor(table, dtype=torch.int32).view(-1, 5)


def _perm_or_none(perm: torch.Tensor) -> torch.Tensor | None:
    identity = torch.arange(perm.numel(), device=perm.device)
    return None if torch.equal(perm.long(), identity) else perm.to(torch.int32).contiguous()


def prepare_exl2(w: "Exl2Weight") -> PreparedQMatrix:
    return PreparedQMatrix(
        format=FORMAT_EXL2,
        q_weight=w.q_weight.contiguous(),
        chunks=exl2_chunks(w.groups).to(w.device),
        perm=_perm_or_none(w.perm),
        in_features=w.in_features,
        out_features=w.out_features,
        bias=w.bias,
        q_scale=w.q_scale.contiguous(),
        scale_max=w.scale_max.to(torch.float16).contiguous(),
    )


def reorder_rows(qweight: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """qweight [K/8, N] with its 4-bit rows taken in `order` (new row k = old row order[k]), repacked."""
    out = torch.empty_like(qweight)
    for c0 in range(0, qweight.shape[1], _REPACK_COLUMNS):
        cols = slice(c0, c0 + _REPACK_COLUMNS)
        codes = gptq.unpack_rows(qweight[:, cols])[order.to(qweight.device)]
        out[:, cols] = exl2.pack_codes(codes, 4)
    return out


def prepare_gptq(w: "GptqWeight") -> PreparedQMatrix:
    groups = w.groups.cpu()
    if bool((groups[1:] < groups[:-1]).any()):
        order = torch.sort(groups, stable=True).indices
        q_weight, perm, groups = reorder_rows(w.qweight, order), order, groups[order]
    else:
        q_weight, perm = w.qweight.contiguous(), None
    return PreparedQMatrix(
        format=FORMAT_GPTQ,
        q_weight=q_weight,
        chunks=gptq_chunks(groups).to(w.device),
        perm=None if perm is None else _perm_or_none(perm.to(w.device)),
        in_features=w.in_features,
        out_features=w.out_features,
        bias=w.bias,
        scales=w.scales.to(torch.float16).contiguous(),
        qzeros=w.qzeros.contiguous(),
        zero_offset=1,
    )


def make_qmatrix(w: "QuantWeight", ext: ModuleType):
    """The extension's QMatrix for this layer: `.forward(x, MAX_FUSED_ROWS, max_dq_elements)` gives x·W + bias
    and `.reconstruct(out [K, c] fp16, col_start)` fills columns of W, bit-exact with `w.dequantize()`.
    Raises ValueError for a layout the kernels cannot run."""
    p = w.kernel_form()
    return ext.QMatrix(
        p.format, p.q_weight, p.chunks, p.perm, p.q_scale, p.scale_max, p.scales, p.qzeros, p.zero_offset,
        p.in_features, p.out_features, p.bias,
    )
