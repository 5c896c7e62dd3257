"""The EXL2 weight format: validation, bit-exact dequantization, packing, and a per-group quantizer.

Layout (shared/reference/upstream-api-and-exl2-format.md §3, issue 4). A linear layer y = x·W with
W [K, N] is stored in activation order (stored row k holds input feature perm[k]) as G groups of rows,
each with one bit width b. Per group and column, the q_weight words of the group form an LSB-first
bitstream and local row i's code is the b bits at stream bit i·b. The weight is
    w = fp16( fp16(code - 2^(b-1)) * fp16( fp16((s+1)^2) * m[g] ) ),   m[g] = fp16(q_scale_max[g] * prescale / 256)
with s the 4-bit scale code of (g, column). Columns are padded to Np, a multiple of 32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

EXL2_BITS = (2, 3, 4, 5, 6, 8)
MAX_IN_FEATURES = 65535          # the CUDA kernels read q_perm as uint16
SCALE_BITS = 4
_U32 = 0xFFFFFFFF


def padded_columns(n: int) -> int:
    return -(-n // 32) * 32


@dataclass(frozen=True)
class Exl2Group:
    """One group of stored rows: `rows` rows from stored row `row_start`, in q_weight rows
    [word_start, word_start + words)."""

    bits: int
    word_start: int
    words: int
    row_start: int
    rows: int


def parse_groups(key: str, q_groups: torch.Tensor, q_rows: int, in_features: int) -> list[Exl2Group]:
    """Check q_groups against q_weight's row count Q and K, and return the groups.

    The last group's row count is K minus the earlier groups' rows (its word rows are rounded up
    when it is short), as the kernels do (§3.8a)."""
    bits, starts = _group_pairs(key, q_groups, in_features)
    groups: list[Exl2Group] = []
    row = 0
    for g, (b, s0) in enumerate(zip(bits, starts)):
        last = g == len(bits) - 1
        s1 = q_rows if last else starts[g + 1]
        if s1 <= s0:
            where = f"q_weight's {q_rows} rows" if last else f"group {g + 1}'s start {s1}"
            raise ValueError(
                f"{key}.q_groups: group {g} starts at q_weight row {s0}, not before {where}; "
                f"group starts must increase and lie inside q_weight (truncated or damaged file)"
            )
        if last:
            words, rows = _last_group_size(key, b, s0, s1, q_rows, row, in_features)
        else:
            words, rows = _group_size(key, g, b, s1 - s0)
        groups.append(Exl2Group(b, s0, words, row, rows))
        row += rows
        if row > in_features:
            raise ValueError(
                f"{key}.q_groups: groups 0..{g} already hold {row} rows > in_features {in_features}; "
                f"the rows of q_groups do not sum to in_features"
            )
    return groups


def _group_pairs(key: str, q_groups: torch.Tensor, in_features: int) -> tuple[list[int], list[int]]:
    """(bit widths, q_weight start rows) of the groups, checked for shape, widths and the first start."""
    if in_features > MAX_IN_FEATURES:
        raise ValueError(
            f"{key}: in_features {in_features} > {MAX_IN_FEATURES}; EXL2 stores the permutation as "
            f"uint16, so this layer cannot be EXL2 (re-quantize it as FP16 or split it)"
        )
    if q_groups.dim() != 1 or q_groups.numel() == 0 or q_groups.numel() % 2:
        raise ValueError(
            f"{key}.q_groups: expected a 1-D tensor of (bits, q_weight start row) pairs, "
            f"got shape {tuple(q_groups.shape)}; the file is damaged, re-convert the model"
        )
    pairs = q_groups.tolist()
    bits, starts = pairs[0::2], pairs[1::2]
    for g, b in enumerate(bits):
        if b not in EXL2_BITS:
            raise ValueError(
                f"{key}.q_groups: group {g} has unsupported bit width {b}; EXL2 widths are {EXL2_BITS}"
            )
    if starts[0] != 0:
        raise ValueError(f"{key}.q_groups: the first group must start at q_weight row 0, not {starts[0]}")
    return bits, starts


def _group_size(key: str, g: int, b: int, words: int) -> tuple[int, int]:
    """(word rows, rows) of a group before the last: its word rows must hold whole b-bit rows."""
    if (words * 32) % b:
        raise ValueError(
            f"{key}.q_groups: group {g} spans {words} q_weight rows, not a whole number of "
            f"{b}-bit rows; q_groups is inconsistent"
        )
    return words, words * 32 // b


def _last_group_size(key: str, b: int, s0: int, s1: int, q_rows: int, row: int, in_features: int) -> tuple[int, int]:
    """(word rows, rows) of the last group: the rows left of in_features, in exactly the word rows left."""
    rows = in_features - row
    if rows <= 0:
        raise ValueError(
            f"{key}.q_groups: the groups before the last already hold {row} rows, but "
            f"in_features is {in_features}; q_groups does not match this layer"
        )
    words = -(-rows * b // 32)
    if s1 - s0 < words:
        raise ValueError(
            f"{key}.q_weight: truncated: {q_rows} rows, but q_groups and in_features="
            f"{in_features} need {s0 + words} (last group: {rows} rows at {b} bits)"
        )
    if s1 - s0 > words:
        raise ValueError(
            f"{key}.q_weight: {q_rows} rows, but q_groups and in_features={in_features} "
            f"need exactly {s0 + words}; the rows of q_groups do not sum to in_features"
        )
    return words, rows


def unpack_codes(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Codes [rows, C] (int64) of one group from its q_weight rows `words` [W, C] (int32 bit patterns)."""
    if 32 % bits == 0:
        # 2/4/8 bits: no code straddles a word, so each word splits into 32/bits fields in place
        # (int32 shifts are arithmetic, but the mask keeps only the field's own bits)
        shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32).view(1, -1, 1)
        fields = (words.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
        return fields.reshape(-1, words.shape[1])[:rows].to(torch.int64)
    block_words = bits * 32 // math.gcd(bits, 32) // 32          # 3 and 5 bits: 32 rows; 6 bits: 16 rows
    if words.shape[0] % block_words == 0:
        return _unpack_blocks(words, bits, rows, block_words)
    u = words.to(torch.int64) & _U32
    u = torch.cat([u, torch.zeros_like(u[:1])])                 # row W: nothing straddles past the end
    pos = torch.arange(rows, device=words.device) * bits
    w = pos // 32
    sh = (pos % 32).unsqueeze(1)
    lo = u[w] >> sh
    hi = (u[w + 1] & 0xFF) << (32 - sh)                          # bits of a code that straddles a word
    return (lo | hi) & ((1 << bits) - 1)


def _unpack_blocks(words: torch.Tensor, bits: int, rows: int, block_words: int) -> torch.Tensor:
    """3/5/6-bit codes by whole word blocks (block_words words hold block_words*32/bits rows): one shift
    per row of a block, applied to every block at once; codes straddling two words take bits from both."""
    blocks = words.to(torch.int32).view(-1, block_words, words.shape[1])      # [blocks, words, C]
    per_block = block_words * 32 // bits
    mask = (1 << bits) - 1
    out = torch.empty((blocks.shape[0], per_block, words.shape[1]), dtype=torch.int32, device=words.device)
    for r in range(per_block):
        w, sh = divmod(r * bits, 32)
        code = blocks[:, w] >> sh                      # arithmetic shift: the mask drops the sign bits
        if sh + bits > 32:
            code = (code & ((1 << (32 - sh)) - 1)) | (blocks[:, w + 1] << (32 - sh))
        out[:, r] = code & mask
    return out.view(-1, words.shape[1])[:rows].to(torch.int64)


def unpack_scale_codes(q_scale: torch.Tensor) -> torch.Tensor:
    """4-bit scale codes [G, 8·W] (int64, 0..15) from q_scale [G, W]."""
    shifts = torch.arange(0, 32, 4, device=q_scale.device)
    codes = (q_scale.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF
    return codes.flatten(-2)


def scale_max_prescaled(q_scale_max: torch.Tensor, prescale: float) -> torch.Tensor:
    """m[g] = fp16(q_scale_max[g] * prescale / 256): the same fp16 tensor op upstream applies at load."""
    return q_scale_max.to(torch.float16) * (prescale / 256)


def group_scales(scale_codes: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """fp16 scales: fp16( fp16((s+1)^2) * m ). Both factors are fp16, so the fp16 product rounds once."""
    return ((scale_codes + 1) ** 2).to(torch.float16) * m.to(torch.float16).unsqueeze(-1)


def dequantize_codes(codes: torch.Tensor, bits: int, scales: torch.Tensor) -> torch.Tensor:
    """fp16( fp16(code - 2^(b-1)) * scale ). The fp32 product is exact (8-bit × 11-bit), so one
    rounding to fp16 gives the fp16 multiply's result."""
    return ((codes - (1 << (bits - 1))).to(torch.float32) * scales.to(torch.float32)).to(torch.float16)


def dequantize_into(
    out: torch.Tensor,
    q_weight: torch.Tensor,
    q_scale: torch.Tensor,
    m: torch.Tensor,
    groups: Sequence[Exl2Group],
    perm: torch.Tensor,
    col_start: int = 0,
) -> None:
    """Write W[:, col_start : col_start + out.shape[1]] (original row order) into `out` [K, c].

    `m` is `scale_max_prescaled(...)`, `perm` the int64 activation order. col_start and the width
    must be multiples of 8 (whole q_scale words)."""
    c = out.shape[1]
    cols = slice(col_start, col_start + c)
    scales = group_scales(unpack_scale_codes(q_scale[:, col_start // 8 : (col_start + c + 7) // 8])[:, :c], m)
    for g, grp in enumerate(groups):
        codes = unpack_codes(q_weight[grp.word_start : grp.word_start + grp.words, cols], grp.bits, grp.rows)
        w = dequantize_codes(codes, grp.bits, scales[g])
        out.index_copy_(0, perm[grp.row_start : grp.row_start + grp.rows], w.to(out.dtype))


# packing ------------------------------------------------------------------------------------------


def _as_int32(u: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the same bit patterns as int32."""
    return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack one group's codes [rows, C] into ceil(rows·bits/32) int32 rows (LSB-first bitstream)."""
    rows, c = codes.shape
    words = -(-rows * bits // 32)
    codes = codes.to(torch.int64)
    pos = torch.arange(rows, device=codes.device) * bits
    w = pos // 32
    sh = (pos % 32).unsqueeze(1)
    out = torch.zeros((words + 1, c), dtype=torch.int64, device=codes.device)
    out.index_add_(0, w, (codes << sh) & _U32)                  # bit fields never overlap: add == or
    out.index_add_(0, w + 1, codes >> (32 - sh))
    return _as_int32(out[:words])


def pack_scale_codes(scale_codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes [G, C] (C a multiple of 8) into q_scale [G, C/8] int32."""
    g, c = scale_codes.shape
    shifts = torch.arange(0, 32, 4, device=scale_codes.device)
    words = (scale_codes.to(torch.int64).view(g, c // 8, 8) << shifts).sum(-1)
    return _as_int32(words)


def pack_exl2(
    codes: torch.Tensor,
    groups: Sequence[tuple[int, int]],
    scale_codes: torch.Tensor,
    q_scale_max: torch.Tensor,
    perm: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Build the tensors of one EXL2 layer, named by suffix (q_weight, q_scale, q_scale_max, q_groups,
    q_invperm[, bias]), exactly as upstream's converter writes them.

    codes [K, N]: integer codes 0..2^b-1 in stored (activation) order; groups: (bits, rows) per group
    in stored order, bits descending (the CUDA kernels require it), every group but the last with
    rows·bits a multiple of 32; scale_codes [G, N]: 0..15 (the scale is (s+1)^2·q_scale_max/256);
    q_scale_max [G]; perm [K]: stored row k holds input feature perm[k]; bias [N] (kept unpadded)."""
    k, n = codes.shape
    _check_pack_args(k, n, groups, scale_codes, q_scale_max, perm)
    np_ = padded_columns(n)
    q_weight, q_groups = [], []
    row = word = 0
    for g, (b, rows) in enumerate(groups):
        if g < len(groups) - 1 and (rows * b) % 32:
            raise ValueError(f"pack_exl2: group {g} has {rows} rows at {b} bits; rows·bits must be a multiple of 32")
        c = codes[row : row + rows]
        if c.min() < 0 or c.max() >= (1 << b):
            raise ValueError(f"pack_exl2: group {g} has codes outside 0..{(1 << b) - 1}")
        c = torch.nn.functional.pad(c.to(torch.int64), (0, np_ - n), value=1 << (b - 1))
        packed = pack_codes(c, b)
        q_weight.append(packed)
        q_groups += [b, word]
        row += rows
        word += packed.shape[0]
    if word > 32767:
        raise ValueError(f"pack_exl2: {word} q_weight rows do not fit q_groups' int16 row starts")

    out = {
        "q_weight": torch.cat(q_weight),
        "q_scale": pack_scale_codes(torch.nn.functional.pad(scale_codes.to(torch.int64), (0, np_ - n))),
        "q_scale_max": q_scale_max.to(torch.float16),
        "q_groups": torch.tensor(q_groups, dtype=torch.int16),
        "q_invperm": torch.argsort(perm.long()).to(torch.int32),
    }
    if bias is not None:
        out["bias"] = bias.to(torch.float16)
    return out


def _check_pack_args(k: int, n: int, groups: Sequence[tuple[int, int]], scale_codes: torch.Tensor,
                     q_scale_max: torch.Tensor, perm: torch.Tensor) -> None:
    """pack_exl2's arguments against the format: K, bit widths and their order, rows, scales, the permutation."""
    if k > MAX_IN_FEATURES:
        raise ValueError(f"pack_exl2: K = {k} > {MAX_IN_FEATURES}; EXL2 cannot store this layer")
    bits_seq = [b for b, _ in groups]
    if any(b not in EXL2_BITS for b in bits_seq):
        raise ValueError(f"pack_exl2: bit widths {bits_seq} must come from {EXL2_BITS}")
    if bits_seq != sorted(bits_seq, reverse=True):
        raise ValueError(f"pack_exl2: group bit widths {bits_seq} must be in descending order")
    if sum(r for _, r in groups) != k:
        raise ValueError(f"pack_exl2: group rows sum to {sum(r for _, r in groups)}, codes have K = {k} rows")
    if scale_codes.shape != (len(groups), n) or q_scale_max.shape != (len(groups),):
        raise ValueError(
            f"pack_exl2: scale_codes {tuple(scale_codes.shape)} / q_scale_max {tuple(q_scale_max.shape)} "
            f"must be [{len(groups)}, {n}] / [{len(groups)}]"
        )
    if scale_codes.min() < 0 or scale_codes.max() > 15:
        raise ValueError("pack_exl2: scale codes must lie in 0..15")
    if perm.shape != (k,) or not torch.equal(torch.sort(perm.long()).values, torch.arange(k, device=perm.device)):
        raise ValueError(f"pack_exl2: perm must be a permutation of 0..{k - 1}")


# quantizing ---------------------------------------------------------------------------------------


@dataclass
class GroupQuant:
    """One group's scale parameters: scale codes [N] (0..15), q_scale_max (fp16 scalar) and the
    resulting fp16 scales [N] exactly as the loader will compute them (prescale 1)."""

    bits: int
    scale_codes: torch.Tensor
    q_scale_max: torch.Tensor
    scales: torch.Tensor

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """q = clamp(rint(w/scale) + 2^(b-1), 0, 2^b-1), as int64."""
        s = self.scales.to(torch.float32)
        r = torch.where(s > 0, w.to(torch.float32) / torch.where(s > 0, s, 1.0), 0.0)
        return torch.clamp(torch.round(r) + (1 << (self.bits - 1)), 0, (1 << self.bits) - 1).to(torch.int64)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return dequantize_codes(codes, self.bits, self.scales)


ERROR_NORM = 3.5
P_MIN, P_MAX = 0.70, 1.2


def fit_group(w: torch.Tensor, bits: int, p_steps: int = 48) -> GroupQuant:
    """Choose scales for a group w [rows, N] (§3.10): per-column base scale max|w|/((2^b-1)/2),
    scale codes round(√(base/max)·16) in 1..16 (stored minus 1), then q_scale_max = max base × p with
    p from a grid over [0.70, 1.2] minimising Σ|error|^3.5."""
    w = w.to(torch.float32)
    maxq = (1 << bits) - 1
    base = w.abs().amax(dim=0) + 1e-12
    base = base / (maxq / 2)
    top = base.max()
    qscale = torch.clamp(torch.round(torch.sqrt(base / top) * 16), 1, 16).to(torch.int64)
    best = None
    for i in range(p_steps + 1):
        p = P_MIN + (P_MAX - P_MIN) * i / p_steps
        gq = _group_quant(bits, qscale - 1, (top * p).to(torch.float16))
        err = (gq.dequantize(gq.codes(w)).to(torch.float32) - w).abs().pow(ERROR_NORM).sum().item()
        if best is None or err < best[0]:
            best = (err, gq)
    return best[1]


def _group_quant(bits: int, scale_codes: torch.Tensor, q_scale_max: torch.Tensor) -> GroupQuant:
    m = scale_max_prescaled(q_scale_max.reshape(1), 1.0)
    return GroupQuant(bits, scale_codes, q_scale_max.reshape(()), group_scales(scale_codes, m)[0])


def quantize_rtn(
    weight: torch.Tensor,
    groups: Sequence[tuple[int, int]],
    perm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Round-to-nearest EXL2 quantization of weight [K, N] (y = x·W) with the given group layout, in
    the activation order `perm` (identity if None). Returns pack_exl2's tensor dict. The converter
    uses GPTQ instead; this makes real layers for tests and simple tools."""
    k, n = weight.shape
    perm = torch.arange(k) if perm is None else perm.long()
    stored = weight[perm].to(torch.float32)
    codes, scale_codes, scale_max = [], [], []
    row = 0
    for b, rows in groups:
        gq = fit_group(stored[row : row + rows], b)
        codes.append(gq.codes(stored[row : row + rows]))
        scale_codes.append(gq.scale_codes)
        scale_max.append(gq.q_scale_max)
        row += rows
    return pack_exl2(torch.cat(codes), groups, torch.stack(scale_codes), torch.stack(scale_max), perm, bias)


def group_layout(
    k: int,
    bits: Sequence[int],
    group_size: int | Sequence[int] = 128,
    proportions: Sequence[float] | None = None,
) -> list[tuple[int, int]]:
    """A (bits, rows) layout for K rows: one band of groups per width, in the order given (descending
    for files), band i covering about proportions[i]·K rows in groups of group_size[i] rows; the last
    band takes what is left and only the final group may be short."""
    sizes = [group_size] * len(bits) if isinstance(group_size, int) else list(group_size)
    proportions = proportions or [1 / len(bits)] * len(bits)
    layout: list[tuple[int, int]] = []
    remaining = k
    for i, (b, size, p) in enumerate(zip(bits, sizes, proportions)):
        band = remaining if i == len(bits) - 1 else math.ceil(min(k * p, remaining) / size) * size
        while band > 0 and remaining > 0:
            r = min(size, remaining)
            layout.append((b, r))
            band -= r
            remaining -= r
    return layout
