"""The CPU kernels' layout of a quantized matrix (EXL2 or GPTQ), built once at load from the file's tensors.

The kernels (exllamav2_ext/cpu/qkernel_impl.h) read 16 output columns at a time and decode 32 rows per step,
so the rows of each group (in stored order) are cut into chunks of 32, the last one padded. A chunk of a
16-column block is 16 b-bit LSB-first bitstreams of 32 codes, exactly b int32 words each: stream i holds
rows i and 16 + i of the 16 columns (code h * 16 + j is row h * 16 + i, column j), so one shift gives a
vector of one column's codes for 16 consecutive rows. The words of the 16 streams sit together
([blocks, words, 16]) so one column block is one contiguous stream.
The weight stays w = fp16(fp16(code - zero) * scale) with the twin's fp16 scales (EXL2: exl2.group_scales,
zero 2^(b-1); GPTQ: the stored fp16 scales, zero = qzeros + 1), so the layout dequantizes bit-exactly to the
twin's weight (tests/test_cpu_exl2.py checks this). EXL2's scales take 16 values per group (a 4-bit code
times the group's maximum), so they are kept as those values [G, 16] and each column's code: the kernels
then round each group's 16 x 2^b weights to fp16 once per call instead of once per column block. `src[p]` is the input feature of padded row p (-1 on
padding): the kernel gathers x through it, which applies the act-order permutation.

The pair layout (`pairs`, for bf16 activations where the kernels have AVX512-BF16) holds the same codes
otherwise: lane j of a block is column j, and the halves of its words are the 16-bit streams of the chunk's
even and odd rows (`_pack_pairs`), which one vdpbf16ps multiplies two rows at a time (kernels_avx512bf16.cpp).

Bytes against the file: the codes take the same space up to the padding of each group's last chunk; the
scales take 8 bits per (group, column) instead of EXL2's 4 (GPTQ: 16); src is int32 [K] like the permutation.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Iterator

import torch

from . import exl2, gptq

BLOCK = 16            # columns per block (kBlock in qkernel.h)
CHUNK_ROWS = 32       # rows per chunk (kChunkRows)
MAX_GEMV_ROWS = 8     # more input rows than this: tiles of dequantized columns and a GEMM (prefill)


@dataclass
class CpuQMatrix:
    qw: torch.Tensor                 # int32 [blocks, words, 16]
    chunks: torch.Tensor             # int32 [chunks, 3]: bits, first word, group
    scales: torch.Tensor             # fp16 [blocks, groups, 16]; with scale_values, uint8 indices into them
    zeros: torch.Tensor | None       # uint8 [blocks, groups, 16] (GPTQ), None for EXL2
    src: torch.Tensor                # int32 [chunks * 32]
    bias: torch.Tensor | None        # fp32 [N]
    in_features: int
    out_features: int
    scale_values: torch.Tensor | None = None     # fp16 [groups, 16] (EXL2)
    pairs: bool = False              # the pair layout (bf16 activations on AVX512-BF16 CPUs)

    def matmul(self, kernels: ModuleType, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 or bfloat16 -> x @ W + bias [M, N] in x's dtype (summed in float32)."""
        return kernels.q_matmul(x, self.qw, self.chunks, self.scales, self.zeros, self.src, self.bias,
                                self.out_features, MAX_GEMV_ROWS, self.scale_values, self.pairs)

    def call_args(self) -> tuple:
        """This layer as one entry of kernels.q_matmul_many."""
        return (self.qw, self.chunks, self.scales, self.zeros, self.src, self.bias, self.out_features,
                self.scale_values, self.pairs)

    def decode_proj(self, kernels: ModuleType):
        """This layer as a projection of the kernels' fused decode blocks (checked once, there)."""
        return kernels.DecodeProj.quantized(self.qw, self.chunks, self.scales, self.zeros, self.src, self.bias,
                                            self.out_features, self.in_features, self.scale_values, self.pairs)

    def dequantize(self, kernels: ModuleType) -> torch.Tensor:
        """W as float32 [K, N] (every value an fp16 value)."""
        w = kernels.q_dequant(self.qw, self.chunks, self.scales, self.zeros, self.src, self.in_features,
                              self.scale_values, self.pairs)
        return w[:, : self.out_features]

    def tensors(self) -> list[torch.Tensor]:
        kept = (self.qw, self.chunks, self.scales, self.zeros, self.src, self.bias, self.scale_values)
        return [t for t in kept if t is not None]


def matmul_many(kernels: ModuleType, x: torch.Tensor, layers: list[CpuQMatrix]) -> list[torch.Tensor]:
    """x [M, K] (M <= MAX_GEMV_ROWS) through several layers in one kernel call and one parallel region."""
    return kernels.q_matmul_many(x, [m.call_args() for m in layers], MAX_GEMV_ROWS)


def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _by_block(t: torch.Tensor) -> torch.Tensor:
    """[rows, Np] -> [Np/16, rows, 16], contiguous."""
    return t.reshape(t.shape[0], -1, BLOCK).permute(1, 0, 2).contiguous()


def _lanes_by_row(padded: torch.Tensor) -> torch.Tensor:
    """Codes [chunks * 32, Np] -> the streams pack_codes packs per column: the stream of "column" cb * 16 + i
    (lane i of block cb) holds, at position h * 16 + j, the code of row h * 16 + i, column cb * 16 + j of
    each chunk (a 16 x 16 transpose of each half-chunk tile)."""
    chunks, columns = padded.shape[0] // CHUNK_ROWS, padded.shape[1]
    tiles = padded.view(chunks, 2, BLOCK, columns // BLOCK, BLOCK)      # chunk, h, i, block, j
    return tiles.permute(0, 1, 4, 3, 2).reshape(chunks * CHUNK_ROWS, columns)


def _halfword_streams(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [n, 16, C] -> [n, bits, C]: each 16 codes an LSB-first stream of `bits`-bit fields in 16-bit words."""
    n, _, c = codes.shape
    words = torch.zeros((n, bits + 1, c), dtype=torch.int64)
    for p in range(16):
        i, shift = divmod(p * bits, 16)
        field = codes[:, p] << shift
        words[:, i] |= field & 0xFFFF
        words[:, i + 1] |= field >> 16
    return words[:, :bits]


def _pack_pairs(padded: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [chunks * 32, C] -> the pair layout's words [chunks * bits, C] (int32): word w of a chunk's column holds
    halfword w of its even rows' stream (low half) and of its odd rows' (high half); 8-bit codes as two 4-bit
    streams, low nibbles first (kernels_avx512bf16.cpp)."""
    chunks = padded.shape[0] // CHUNK_ROWS
    rows = padded.view(chunks, CHUNK_ROWS // 2, 2, -1)            # chunk, pair, parity, column

    def stream(parity: int) -> torch.Tensor:
        codes = rows[:, :, parity]
        if bits == 8:
            return torch.cat([_halfword_streams(codes & 15, 4), _halfword_streams(codes >> 4, 4)], dim=1)
        return _halfword_streams(codes, bits)

    high = stream(1)
    high = torch.where(high >= 0x8000, high - 0x10000, high)      # the signed high half: the word fits int32
    return (high * 0x10000 + stream(0)).to(torch.int32).reshape(chunks * bits, -1)


def assemble(
    runs: Iterator[tuple[int, int, torch.Tensor, torch.Tensor]],
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    in_features: int,
    out_features: int,
    scale_values: torch.Tensor | None = None,
    pairs: bool = False,
) -> CpuQMatrix:
    """The layout from `runs`: (bits, group, codes [rows, C] in stored order, features [rows] int64) per run of
    rows of one group, in stored order; scales fp16 [G, C], or with scale_values [G, 16] indices into them;
    zeros [G, C] (GPTQ zero points) or None; `pairs` packs the codes in the pair layout."""
    columns = _padded(out_features, BLOCK)        # EXL2's padding to 32 columns is not kept past the block
    scales = scales[:, :columns]
    pad = columns - scales.shape[1]
    words, chunks, src = [], [], []
    word = 0
    for bits, group, codes, features in runs:
        rows = codes.shape[0]
        n_chunks = -(-rows // CHUNK_ROWS)
        padded = torch.zeros((n_chunks * CHUNK_ROWS, columns), dtype=torch.int64)
        padded[:rows, : min(columns, codes.shape[1])] = codes[:, :columns]
        # chunk j: words j*bits .. (j+1)*bits - 1
        words.append(_pack_pairs(padded, bits) if pairs else exl2.pack_codes(_lanes_by_row(padded), bits))
        chunks += [[bits, word + j * bits, group] for j in range(n_chunks)]
        word += n_chunks * bits
        s = torch.full((n_chunks * CHUNK_ROWS,), -1, dtype=torch.int32)
        s[:rows] = features.to(torch.int32)
        src.append(s)
    scales = torch.nn.functional.pad(scales.to(torch.float16 if scale_values is None else torch.uint8), (0, pad))
    if zeros is not None:
        zeros = _by_block(torch.nn.functional.pad(zeros[:, :columns].to(torch.uint8), (0, pad)))
    return CpuQMatrix(
        qw=_by_block(torch.cat(words)),
        chunks=torch.tensor(chunks, dtype=torch.int32).view(-1, 3),
        scales=_by_block(scales),
        zeros=zeros,
        src=torch.cat(src),
        bias=None if bias is None else bias[:out_features].to(torch.float32).contiguous(),
        in_features=in_features,
        out_features=out_features,
        scale_values=None if scale_values is None else scale_values.to(torch.float16).contiguous(),
        pairs=pairs,
    )


def from_exl2(q_weight: torch.Tensor, q_scale: torch.Tensor, scale_max: torch.Tensor,
              groups: list[exl2.Exl2Group], perm: torch.Tensor, bias: torch.Tensor | None,
              in_features: int, out_features: int, pairs: bool = False) -> CpuQMatrix:
    """The layout of an EXL2 layer (the tensors as Exl2Weight keeps them: scale_max prescaled, perm int64)."""
    codes16 = torch.arange(16).expand(scale_max.shape[0], 16)
    values = exl2.group_scales(codes16, scale_max.cpu())          # [G, 16]: every scale a group can take
    perm = perm.cpu()

    def runs():
        for g, grp in enumerate(groups):
            codes = exl2.unpack_codes(q_weight[grp.word_start : grp.word_start + grp.words], grp.bits, grp.rows)
            yield grp.bits, g, codes, perm[grp.row_start : grp.row_start + grp.rows]

    return assemble(runs(), exl2.unpack_scale_codes(q_scale), None, bias, in_features, out_features, values, pairs)


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, row_groups: torch.Tensor,
              bias: torch.Tensor | None, in_features: int, out_features: int, pairs: bool = False) -> CpuQMatrix:
    """The layout of a 4-bit GPTQ layer (v1 zeros; `row_groups` [K] the group of each row, any order: rows are
    regrouped, the order going into src)."""
    row_groups = row_groups.cpu()
    order = torch.sort(row_groups, stable=True).indices
    values, counts = torch.unique_consecutive(row_groups[order], return_counts=True)
    zeros = gptq.unpack_columns(qzeros) + 1

    def runs():
        start = 0
        for g, rows in zip(values.tolist(), counts.tolist()):
            features = order[start : start + rows]
            shifts = (features % 8 * 4).to(torch.int32).unsqueeze(1)
            codes = (qweight[features // 8] >> shifts) & 0xF
            yield 4, g, codes.to(torch.int64), features
            start += rows

    return assemble(runs(), scales, zeros, bias, in_features, out_features, pairs=pairs)
