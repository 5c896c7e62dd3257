"""Quantization parameters of one linear layer, and the candidate tables the measurement pass tries.

A `QParams` is a layout recipe: bit widths (descending), the share of rows each width gets, and a
group size per width. Its dict form is the one upstream writes into measurement.json.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..quant.exl2 import SCALE_BITS, group_layout


@dataclass(frozen=True)
class QParams:
    group_size: tuple[int, ...]          # one per entry of bits
    bits: tuple[int, ...]
    bits_prop: tuple[float, ...]
    scale_bits: int = SCALE_BITS

    @staticmethod
    def of(group_size: int | list[int], bits: list[int], bits_prop: list[float]) -> "QParams":
        sizes = [group_size] * len(bits) if isinstance(group_size, int) else group_size
        return QParams(tuple(sizes), tuple(bits), tuple(bits_prop))

    def layout(self, rows: int) -> list[tuple[int, int]]:
        return group_layout(rows, self.bits, self.group_size, self.bits_prop)

    def total_bits(self, rows: int, columns: int) -> int:
        """Bits of the layer's tensors as upstream counts them (columns unpadded)."""
        layout = self.layout(rows)
        g = len(layout)
        return (
            sum(r * b for b, r in layout) * columns      # q_weight
            + g * 16                                     # q_scale_max
            + g * 32                                     # q_groups
            + g * columns * self.scale_bits              # q_scale
            + rows * 32                                  # q_invperm
        )

    def to_dict(self) -> dict:
        return {
            "group_size": {str(b): g for b, g in zip(self.bits, self.group_size)},
            "bits": list(self.bits),
            "bits_prop": list(self.bits_prop),
            "scale_bits": self.scale_bits,
        }

    @staticmethod
    def from_dict(d: dict) -> "QParams":
        """From measurement.json's form; group_size may be {bits: size}, one size, or a list."""
        bits = [int(b) for b in d["bits"]]
        gs = d["group_size"]
        if isinstance(gs, dict):
            sizes = [int(gs[str(b)] if str(b) in gs else gs[b]) for b in bits]
        elif isinstance(gs, int):
            sizes = [gs] * len(bits)
        else:
            sizes = [int(g) for g in gs]
        return QParams(tuple(sizes), tuple(bits), tuple(float(p) for p in d["bits_prop"]),
                       int(d.get("scale_bits", SCALE_BITS)))

    def __str__(self) -> str:
        return "/".join(f"{p}:{b}b_{g}g" for b, p, g in zip(self.bits, self.bits_prop, self.group_size))


Q = QParams.of

# Candidates per module, cheapest first; each row gives the parameters of the module's linears in
# order (attention: q, k, v, o; MLP: gate, up, down). v and down get more bits where it is cheap,
# since errors there reach the residual stream directly.
ATTN_OPTIONS: list[tuple[QParams, ...]] = [
    (Q(64, [3, 2], [0.1, 0.9]),) * 4,
    (Q(64, [3, 2], [0.1, 0.9]), Q(64, [3, 2], [0.1, 0.9]), Q(128, [4, 3], [0.1, 0.9]), Q(64, [3, 2], [0.1, 0.9])),
    (Q(128, [4, 3], [0.1, 0.9]),) * 4,
    (Q(128, [4, 3], [0.1, 0.9]), Q(128, [4, 3], [0.1, 0.9]), Q(128, [4], [1]), Q(128, [4], [1])),
    (Q(128, [4], [1]),) * 4,
    (Q(64, [4], [1]), Q(64, [4], [1]), Q(64, [5, 4], [0.1, 0.9]), Q(64, [4], [1])),
    (Q(64, [5, 4], [0.1, 0.9]),) * 4,
    (Q(32, [5], [1]), Q(32, [5], [1]), Q(32, [6], [1]), Q(32, [5], [1])),
    (Q(128, [6, 5], [0.1, 0.9]),) * 4,
    (Q(128, [6], [1]),) * 4,
    (Q(32, [6], [1]), Q(32, [6], [1]), Q(32, [8], [1]), Q(32, [6], [1])),
    (Q(128, [8, 6], [0.5, 0.5]),) * 4,
    (Q(128, [8], [1]),) * 4,
]

MLP_OPTIONS: list[tuple[QParams, ...]] = [
    (Q(64, [3, 2], [0.1, 0.9]), Q(64, [3, 2], [0.25, 0.75]), Q([32, 64, 64], [6, 3, 2], [0.05, 0.2, 0.75])),
    (Q(64, [3, 2], [0.25, 0.75]), Q(64, [3, 2], [0.3, 0.7]), Q(32, [5, 3], [0.05, 0.95])),
    (Q(128, [4, 3], [0.1, 0.9]), Q(128, [4, 3], [0.25, 0.75]), Q([32, 128, 128], [8, 4, 3], [0.05, 0.1, 0.85])),
    (Q(128, [4], [1]), Q(128, [4], [1]), Q([32, 128], [8, 4], [0.05, 0.95])),
    (Q(32, [4], [1]), Q(32, [4], [1]), Q([32, 32], [8, 4], [0.05, 0.95])),
    (Q(128, [5, 4], [0.1, 0.9]), Q(128, [5, 4], [0.25, 0.75]), Q([32, 128, 128], [8, 5, 4], [0.05, 0.1, 0.85])),
    (Q(32, [5, 4], [0.1, 0.9]), Q(32, [5, 4], [0.25, 0.75]), Q([32, 32, 32], [8, 5, 4], [0.05, 0.1, 0.85])),
    (Q(128, [6, 5], [0.1, 0.9]), Q(128, [6, 5], [0.25, 0.75]), Q([32, 128, 128], [8, 6, 5], [0.05, 0.1, 0.85])),
    (Q(128, [6], [1]), Q(128, [6], [1]), Q([32, 128], [8, 6], [0.05, 0.95])),
    (Q(128, [8, 6], [0.1, 0.9]), Q(128, [8, 6], [0.1, 0.9]), Q(128, [8], [1])),
    (Q(128, [8], [1]),) * 3,
]



def mlp_options(gated: bool) -> list[tuple[QParams, ...]]:
    """The MLP candidates; a plain MLP (no gate: Starcoder 2, Phi-2) gives its in and out projections the
    parameters a gated one gives up and down."""
    return MLP_OPTIONS if gated else [option[1:] for option in MLP_OPTIONS]


def moe_options(num_experts: int, shared_expert: bool) -> list[tuple[QParams, ...]]:
    """Candidates for a mixture-of-experts MLP: each MLP candidate for every expert (gate, up, down in expert
    order), then for the shared expert if there is one. Experts share a candidate, as upstream measures them."""
    return [option * (num_experts + int(shared_expert)) for option in MLP_OPTIONS]


def parallel_options(gated: bool) -> list[tuple[QParams, ...]]:
    """Candidates for a parallel block (attention and MLP in one module): each attention candidate with the
    MLP candidate at the same place in the cheap-to-precise order."""
    mlp = mlp_options(gated)
    steps = len(ATTN_OPTIONS) - 1
    return [attn + mlp[round(i * (len(mlp) - 1) / steps)] for i, attn in enumerate(ATTN_OPTIONS)]


# -hb choices for the output head (upstream's set of head bit rates)
HEAD_OPTIONS: dict[int, QParams] = {
    2: Q(32, [4, 2], [0.3, 0.7]),
    3: Q(32, [4, 3], [0.15, 0.85]),
    4: Q(32, [6, 4], [0.15, 0.85]),
    5: Q(128, [6, 5], [0.15, 0.85]),
    6: Q(128, [8, 6], [0.15, 0.85]),
    8: Q(128, [8], [1.0]),
}
