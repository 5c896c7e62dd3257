"""Linear layer: FP16/BF16/FP32 `.weight`, or a quantized format detected from the tensors present.

Formats by tensor name, as upstream: `<key>.q_weight` EXL2, `<key>.qweight` GPTQ, `<key>.weight`
unquantized (stored in the model's dtype). A bias is loaded when the checkpoint has one. Fused
checkpoints (Phi-3 qkv_proj / gate_up_proj) are split by rows when the layer's own key is absent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .module import ExLlamaV2Module, TensorShapeError
from ..errors import MissingTensorError
from ..quant import forward_many as forward_many_quantized
from ..quant import load_quantized, stored_format


_KERNEL_MAX_ROWS = 16       # rows up to which the CPU matvec kernel beats a GEMM

_TENSOR_SUFFIXES = (
    "weight", "bias", "q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm", "q_perm",
    "qweight", "qzeros", "scales", "g_idx",
)
# Derived from q_invperm and q_groups at load; some EXL2 writers store it anyway.
_DERIVED_SUFFIXES = ("q_group_map",)


class ExLlamaV2Linear(ExLlamaV2Module):
    name = "Linear"

    def __init__(
        self,
        model,
        key: str,
        in_features: int,
        out_features: int,
        prescale: float = 1.0,
        fused: tuple[str, int, int] | None = None,
        alt_key: str | None = None,
        transposed: bool = False,
        fused_rows: torch.Tensor | None = None,
    ) -> None:
        super().__init__(model, key)
        self.in_features = in_features
        self.out_features = out_features
        self.prescale = prescale
        self.fused = fused            # (fused key, first row, end row) when the checkpoint fuses projections
        self.alt_key = alt_key        # e.g. the embedding for a tied head
        self.transposed = transposed  # the checkpoint stores (in, out), as GPT-2's Conv1D layers
        # the rows of the fused tensor this layer takes where they are not one range (InternLM2's grouped wqkv)
        self.fused_rows = fused_rows
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.q: object | None = None  # quantized weight object (exllamav2.quant)
        self._matvec = False          # 16-bit weights the CPU kernel reads for few rows (see _forward_matvec)

    def _source_key(self) -> str:
        for key in (self.key, self.alt_key):
            if key and stored_format(self.index, key) is not None:
                return key
        if self.fused and self.has(f"{self.fused[0]}.weight"):
            return self.fused[0]
        raise MissingTensorError(
            f"no weights for linear layer {self.key!r} (looked for .weight, .q_weight, .qweight) in "
            f"{', '.join(self.index.files)}"
        )

    def checkpoint_keys(self) -> dict[str, tuple[str, ...]]:
        keys = (self.key, self.alt_key, self.fused and self.fused[0])
        return {k: _TENSOR_SUFFIXES + _DERIVED_SUFFIXES for k in keys if k}

    def load(self) -> None:
        key = self._source_key()
        if self.is_quant():
            self.q = load_quantized(
                key, self.index, self.in_features, self.out_features, prescale=self.prescale,
                device=self.device, gptq_v2=bool(self.model.config.checkpoint_offset_qzeros),
            ).bind(self.ops)
            return
        ops = self.ops
        w, rows, bias_shape = self._read_weight(key)
        # the CPU kernel's 16-bit weights: with float32 activations only where that is exact (an fp16 checkpoint;
        # other checkpoints keep float32 weights), with bfloat16 activations always (their precision is bf16's)
        self._matvec = ops.matvec is not None and ops.weight_dtype in (w.dtype, ops.dtype)
        dtype = ops.weight_dtype if self._matvec else self.model.dtype
        self.weight = w[rows].to(self.device, dtype).contiguous()
        if self.has(f"{key}.bias"):
            self.bias = self.load_tensor(f"{key}.bias", bias_shape)[rows].to(self.device, self.model.dtype)
        if self.prescale != 1.0:
            self.weight.mul_(self.prescale)

    def _read_weight(self, key: str) -> tuple[torch.Tensor, slice, tuple[int, ...] | None]:
        """The (out, in) weight under `key` (GPT-2's Conv1D layers store it transposed), the rows of it this
        layer takes (a slice of a fused tensor) and the bias shape to check (None for a fused tensor)."""
        name = f"{key}.weight"
        fused = self.fused is not None and key == self.fused[0]
        start, end = (self.fused[1], self.fused[2]) if fused else (0, self.out_features)
        w = self.load_tensor(name)
        if self.transposed:
            w = w.T
        if w.dim() != 2 or w.shape[1] != self.in_features or (w.shape[0] < end if fused else w.shape[0] != end):
            want = f"at least ({end}, {self.in_features})" if fused else str((self.out_features, self.in_features))
            raise TensorShapeError(
                f"tensor {name!r} in {self.index.file_of(name)} has shape {tuple(w.shape)}, but config.json implies "
                f"{want}: config.json and the weights disagree (wrong config or corrupt file)"
            )
        rows = (slice(start, end) if self.fused_rows is None else self.fused_rows) if fused else slice(None)
        return w, rows, None if fused else (self.out_features,)

    def unload(self) -> None:
        self.weight = self.bias = self.q = None

    def weight_footprint(self) -> int:
        """Bytes on a GPU once loaded: a quantized layer's packed tensors, else its weight and bias in fp16."""
        key = self._source_key()
        if self.is_quant():
            return sum(self.tensor_bytes(f"{key}.{s}") for s in _TENSOR_SUFFIXES)
        bias = self.out_features if self.has(f"{key}.bias") else 0
        return 2 * (self.out_features * self.in_features + bias)

    def is_quant(self) -> bool:
        return stored_format(self.index, self._source_key()) in ("exl2", "gptq")

    def forward(self, x: torch.Tensor, loras: list | None = None, **kwargs) -> torch.Tensor:
        if self.q is not None:
            y = self.q.forward(x)
        elif self._matvec:
            y = self._forward_matvec(x)
        else:
            y = F.linear(x, self.weight, self.bias)
        for lora in loras or ():
            y = lora.apply(self.key, x, y)
        return y

    def _forward_matvec(self, x: torch.Tensor) -> torch.Tensor:
        """On the CPU with 16-bit weights: the matvec kernel for few rows (decode, where reading the weights
        dominates; it takes and returns the activations' float32 or bf16), else one GEMM (prefill): bf16
        activations multiply the bf16 weights as they are, float32 ones multiply fp16 weights converted for the
        call."""
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] <= _KERNEL_MAX_ROWS:
            y = self.ops.matvec(x2, self.weight)
            if self.bias is not None:
                y += self.bias
        else:
            y = F.linear(x2, self.weight.to(x.dtype), self.bias)
        return y.view(*x.shape[:-1], y.shape[-1])

    def get_weight_tensor_dq(self) -> torch.Tensor:
        """The weight as (in_features, out_features), dequantized if needed (upstream's layout)."""
        if self.q is not None:
            return self.q.dequantize()
        return self.weight.T


def forward_many(linears: tuple[ExLlamaV2Linear, ...], x: torch.Tensor, loras: list | None = None
                 ) -> list[torch.Tensor]:
    """Several layers of the same input (q, k and v; gate and up): on the CPU's kernels in one call where they
    can (quantized: qlinear.forward_many; 16-bit weights: the ops table's matvec_many for decode rows), else one
    by one."""
    if not loras and all(lin.q is not None for lin in linears):
        ys = forward_many_quantized([lin.q for lin in linears], x)
        if ys is not None:
            return ys
    elif not loras and all(lin._matvec for lin in linears) and x.numel() <= _KERNEL_MAX_ROWS * x.shape[-1]:
        ys = linears[0].ops.matvec_many(x.reshape(-1, x.shape[-1]), [lin.weight for lin in linears])
        for y, lin in zip(ys, linears):
            if lin.bias is not None:
                y += lin.bias
        return [y.view(*x.shape[:-1], y.shape[-1]) for y in ys]
    return [lin.forward(x, loras) for lin in linears]
