"""Quantized weights of one linear layer (EXL2 or GPTQ), kept packed as loaded.

`forward` dequantizes into a scratch buffer shared by all layers on a device (as upstream's temp_dq
on the prefill path) and multiplies, so resident memory stays close to the packed size (issue 4).
Layers wider than `MAX_DQ_ELEMENTS / K` columns are dequantized and multiplied in column chunks.
Which kernels a layer may use comes from its device's ops table (`bind`). On a CUDA device with
exllamav2_ext loaded, float16 inputs and `dequantize()` go through the extension's QMatrix instead (built once
per layer, see qmatrix.py); layouts it cannot run stay on this PyTorch path.
On the CPU, where the CPU kernels load, the first float32 forward repacks the layer into
their layout (cpu_layout.py) and drops the file's packed tensors: forward then multiplies straight from the
packed codes, never dequantizing the whole weight, and `dequantize()` decodes the same layout (bit-exact with
the twin). A layer already prepared for the extension's QMatrix keeps that form instead.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

import torch

from ..errors import CheckpointError, ExLlamaV2Error
from ..ops import DeviceOps, build_ops
from . import cpu_layout, exl2, gptq, qmatrix

log = logging.getLogger(__name__)

MAX_DQ_ELEMENTS = 1 << 24        # scratch size cap (elements); wider layers go in column chunks

_scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
_cpu_form_lock = threading.Lock()
_CPU_ACTIVATIONS = (torch.float32, torch.bfloat16)   # the model's CPU dtypes, which the CPU kernels serve


def scratch(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A flat buffer of at least `numel` elements, shared per (device, dtype) and grown as needed."""
    buf = _scratch.get((device, dtype))
    if buf is None or buf.numel() < numel:
        # a normal tensor even when first asked for inside model.forward's inference mode: the buffer outlives
        # that call, and an inference tensor could not be written to outside inference mode later
        with torch.inference_mode(False):
            buf = torch.empty(numel, dtype=dtype, device=device)
        _scratch[(device, dtype)] = buf
    return buf[:numel]


def release_scratch() -> None:
    """Drop all scratch buffers (e.g. after unloading a model)."""
    _scratch.clear()


class TensorSource(Protocol):
    def has(self, name: str) -> bool: ...

    def get(self, name: str) -> torch.Tensor: ...


class QuantWeight:
    """Common forward/dequantize logic. Subclasses fill columns of W [K, N] in `_dequantize_cols`."""

    format: str
    # False keeps CPU layers on the PyTorch twin (tests compare the kernels against it)
    use_cpu_kernels: bool = True

    def __init__(self, key: str, in_features: int, out_features: int, bias: torch.Tensor | None, device: torch.device):
        self.key = key
        self.in_features = in_features
        self.out_features = out_features
        self.bias = bias
        self.device = device
        self.max_dq_elements = MAX_DQ_ELEMENTS
        self._kernel_matrix_built = False
        self._kernel_matrix = None
        self._cpu: cpu_layout.CpuQMatrix | None = None
        self._cpu_kernels = None
        self._cpu_checked = False
        self.ops: DeviceOps | None = None     # set by bind(); the kernels this layer may use on its device
        self._packed_bits = 0

    # subclass interface -------------------------------------------------------------------------

    @property
    def stored_columns(self) -> int:
        """Columns held in the packed tensors (N, or N padded to a multiple of 32)."""
        raise NotImplementedError

    def _dequantize_cols(self, out: torch.Tensor, col_start: int) -> None:
        raise NotImplementedError

    def _file_tensors(self) -> list[torch.Tensor | None]:
        """The file's tensors as kept (None once dropped for the CPU layout)."""
        raise NotImplementedError

    def _file_bits(self) -> int:
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this object keeps resident."""
        own = [t for t in self._file_tensors() if t is not None]
        return own + (self._cpu.tensors() if self._cpu is not None else [])

    def packed_bits(self) -> int:
        """Bits of the quantized tensors as stored in the file."""
        return self._packed_bits

    # public -------------------------------------------------------------------------------------

    def _chunk_columns(self) -> int:
        c = self.max_dq_elements // self.in_features // 32 * 32
        return min(max(32, c), self.stored_columns)     # narrow layers (GPTQ N < 32) in one chunk

    def bind(self, ops: DeviceOps) -> "QuantWeight":
        """Use `ops` (its device's table) for the kernels: the extension's QMatrix on a GPU, the CPU kernels'
        layout on the CPU, else the PyTorch twin. Each form is built on first use, then kept."""
        self.ops = ops
        return self

    def _table(self) -> DeviceOps:
        if self.ops is None:     # a weight used on its own (tests, converter): its device's default table
            self.ops = build_ops(self.device, torch.float32 if self.device.type == "cpu" else torch.float16)
        return self.ops

    def kernel_form(self) -> qmatrix.PreparedQMatrix:
        """The tensors exllamav2_ext's QMatrix reads. Raises ValueError for a layout the kernels cannot run."""
        raise NotImplementedError

    def _cpu_form(self) -> cpu_layout.CpuQMatrix | None:
        """The CPU kernels' layout, built on first use on the CPU where the kernels load; then the file's packed
        tensors are dropped (the layout replaces them, so resident memory stays near the packed size)."""
        if not self._cpu_checked:
            with _cpu_form_lock:      # two threads' first forwards: one builds, neither sees half-released tensors
                if not self._cpu_checked and self.device.type == "cpu" and self.use_cpu_kernels \
                        and self._kernel_matrix is None:
                    kernels = self._table().cpu
                    if kernels is not None:
                        # bf16 activations on a CPU with AVX512-BF16: the pair layout and its dot-product kernel
                        self._cpu = self._cpu_layout(self._table().dtype == torch.bfloat16
                                                     and kernels.has_pair_kernels())
                        self._cpu_kernels = kernels
                        self._release_packed()
                self._cpu_checked = True
        return self._cpu

    def _cpu_layout(self, pairs: bool) -> cpu_layout.CpuQMatrix:
        raise NotImplementedError

    def _release_packed(self) -> None:
        raise NotImplementedError

    def cpu_matrix(self) -> cpu_layout.CpuQMatrix | None:
        """The CPU kernels' form of this layer, or None where it runs on the PyTorch twin."""
        return self._cpu

    def kernel_matrix(self):
        """The extension's QMatrix for this layer when it lives on a CUDA device where exllamav2_ext is loaded,
        else None (also for a layout the kernels cannot address). Prepared on first use, then kept."""
        if not self._kernel_matrix_built and self._cpu is None:
            self._kernel_matrix_built = True
            kernels = self._table().cuda
            if kernels is not None:
                try:
                    self._kernel_matrix = qmatrix.make_qmatrix(self, kernels)
                except (ValueError, RuntimeError) as exc:    # layout refused here or by the binding's checks
                    log.debug("%s runs on the PyTorch path: %s", self.key, exc)
        return self._kernel_matrix

    def dequantize(self) -> torch.Tensor:
        """W as fp16 [K, N] (upstream's get_weight_tensor_dq layout), padded columns dropped."""
        if self._cpu is not None:
            return self._cpu.dequantize(self._cpu_kernels).to(torch.float16)   # exact: fp16 values
        qm = self.kernel_matrix()
        if qm is not None:
            out = torch.empty((self.in_features, self.out_features), dtype=torch.float16, device=self.device)
            qm.reconstruct(out, 0)
            return out
        out = torch.empty((self.in_features, self.stored_columns), dtype=torch.float16, device=self.device)
        self._dequantize_cols(out, 0)
        return out[:, : self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in x's dtype, bias included."""
        k, n = self.in_features, self.out_features
        if x.shape[-1] != k:
            raise ValueError(f"{self.key}: input has {x.shape[-1]} features, layer expects {k}")
        if self._cpu is not None or (x.dtype in _CPU_ACTIVATIONS and self._cpu_form() is not None):
            return self._forward_cpu(x)
        qm = self.kernel_matrix() if x.dtype == torch.float16 else None
        if qm is not None:
            return qm.forward(x, qmatrix.MAX_FUSED_ROWS, self.max_dq_elements)
        x2 = x.reshape(-1, k)
        chunk = self._chunk_columns()
        buf = scratch(x.device, x.dtype, k * chunk)
        if chunk >= self.stored_columns:
            w = buf.view(k, chunk)
            self._dequantize_cols(w, 0)
            y = x2 @ w[:, :n]
        else:
            y = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
            for c0 in range(0, n, chunk):
                c = min(chunk, self.stored_columns - c0)
                w = buf[: k * c].view(k, c)
                self._dequantize_cols(w, c0)
                c1 = min(c0 + c, n)
                y[:, c0:c1] = x2 @ w[:, : c1 - c0]
        if self.bias is not None:
            y += self.bias[:n].to(y.dtype)
        return y.view(*x.shape[:-1], n)

    __call__ = forward

    def _forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        """Through the CPU kernels: float32 and bfloat16 activations straight from the packed codes (decode rows) or
        through tiles of the decoded weight and a GEMM in their dtype (prefill: a bf16 GEMM on bf16 tiles); other
        dtypes multiply the decoded weight in their own dtype, as the twin does."""
        x2 = x.reshape(-1, self.in_features)
        if x.dtype in _CPU_ACTIVATIONS:
            y = self._cpu.matmul(self._cpu_kernels, x2)
        else:
            y = x2 @ self.dequantize().to(x.dtype)
            if self.bias is not None:
                y += self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def bits_per_weight(self) -> float:
        return self._packed_bits / (self.in_features * self.out_features)


def forward_many(weights: list[QuantWeight], x: torch.Tensor) -> list[torch.Tensor] | None:
    """x through several quantized layers of the same input in one CPU kernel call (decode rows, every layer on
    the CPU kernels: q, k and v, or gate and up, cost one call and one parallel region instead of three or two),
    else None (the caller runs them one by one)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] > cpu_layout.MAX_GEMV_ROWS or x.dtype not in _CPU_ACTIVATIONS:
        return None
    layers = [w._cpu_form() for w in weights]
    if any(m is None or (m.pairs and x.dtype != torch.bfloat16) or w.in_features != x2.shape[1]
           for m, w in zip(layers, weights)):
        return None
    ys = cpu_layout.matmul_many(weights[0]._cpu_kernels, x2, layers)
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in ys]


class Exl2Weight(QuantWeight):
    format = "exl2"

    def __init__(self, key: str, t: dict[str, torch.Tensor], in_features: int, out_features: int,
                 prescale: float, device: torch.device):
        _check_exl2(key, t, in_features, out_features)
        super().__init__(key, in_features, out_features, _load_bias(key, t, out_features, device), device)
        self.groups = exl2.parse_groups(key, t["q_groups"], t["q_weight"].shape[0], in_features)
        self.q_weight = t["q_weight"].to(device)
        self.q_scale = t["q_scale"].to(device)
        self.q_groups = t["q_groups"]
        self.scale_max = exl2.scale_max_prescaled(t["q_scale_max"].to(device), prescale)
        self.perm = torch.argsort(t["q_invperm"].to(torch.int64)).to(device)
        self._packed_bits = self._file_bits()

    def kernel_form(self) -> qmatrix.PreparedQMatrix:
        return qmatrix.prepare_exl2(self)

    def _cpu_layout(self, pairs):
        return cpu_layout.from_exl2(self.q_weight, self.q_scale, self.scale_max, self.groups, self.perm, self.bias,
                                    self.in_features, self.out_features, pairs)

    def _release_packed(self):
        self.q_weight = self.q_scale = self.perm = None

    @property
    def stored_columns(self) -> int:
        return self.q_weight.shape[1]

    def _dequantize_cols(self, out, col_start):
        exl2.dequantize_into(out, self.q_weight, self.q_scale, self.scale_max, self.groups, self.perm, col_start)

    def _file_tensors(self):
        return [self.q_weight, self.q_scale, self.scale_max, self.perm, self.bias]

    def _file_bits(self):
        return 8 * (self.q_weight.nbytes + self.q_scale.nbytes + self.scale_max.nbytes
                    + self.q_groups.nbytes + 4 * self.in_features)


class GptqWeight(QuantWeight):
    format = "gptq"

    def __init__(self, key: str, t: dict[str, torch.Tensor], in_features: int, out_features: int,
                 prescale: float, device: torch.device, gptq_v2: bool):
        _check_gptq(key, t, in_features, out_features)
        super().__init__(key, in_features, out_features, _load_bias(key, t, out_features, device), device)
        self.qweight = t["qweight"].to(device)
        qzeros = t["qzeros"]
        self.qzeros = (gptq.offset_qzeros_v2(qzeros) if gptq_v2 else qzeros).to(device)
        scales = t["scales"].to(device, torch.float16)
        # upstream does not prescale GPTQ weights; we scale them like EXL2 so prescaled layers work
        self.scales = scales * prescale if prescale != 1.0 else scales
        self.groups = gptq.row_groups(in_features, scales.shape[0], t.get("g_idx")).to(device)
        if int(self.groups.min()) < 0 or int(self.groups.max()) >= scales.shape[0]:
            raise ValueError(
                f"{key}.g_idx: group indices must lie in 0..{scales.shape[0] - 1} (scales has "
                f"{scales.shape[0]} groups), got {int(self.groups.min())}..{int(self.groups.max())}"
            )
        self._packed_bits = self._file_bits()

    def kernel_form(self) -> qmatrix.PreparedQMatrix:
        return qmatrix.prepare_gptq(self)

    def _cpu_layout(self, pairs):
        return cpu_layout.from_gptq(self.qweight, self.qzeros, self.scales, self.groups, self.bias,
                                    self.in_features, self.out_features, pairs)

    def _release_packed(self):
        self.qweight = self.qzeros = self.scales = self.groups = None

    @property
    def stored_columns(self) -> int:
        return self.qweight.shape[1]

    def _dequantize_cols(self, out, col_start):
        gptq.dequantize_into(out, self.qweight, self.qzeros, self.scales, self.groups, col_start)

    def _file_tensors(self):
        return [self.qweight, self.qzeros, self.scales, self.groups, self.bias]

    def _file_bits(self):
        return 8 * (self.qweight.nbytes + self.qzeros.nbytes + self.scales.nbytes)


# loading ----------------------------------------------------------------------------------------

_EXL2_NAMES = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")
_GPTQ_NAMES = ("qweight", "qzeros", "scales")


def _gather(key: str, tensors: TensorSource, required: tuple[str, ...], optional: tuple[str, ...]) -> dict[str, torch.Tensor]:
    missing = [n for n in required if not tensors.has(f"{key}.{n}")]
    if missing:
        raise ValueError(
            f"{key}: quantized layer is missing tensor(s) {', '.join(f'{key}.{n}' for n in missing)}; "
            f"the model files are incomplete or damaged"
        )
    t = {n: tensors.get(f"{key}.{n}") for n in required}
    t.update({n: tensors.get(f"{key}.{n}") for n in optional if tensors.has(f"{key}.{n}")})
    return t


def _expect(key: str, name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...]) -> None:
    if t.dtype not in dtypes:
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{key}.{name}: dtype {str(t.dtype).removeprefix('torch.')}, expected {want}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{key}.{name}: shape {tuple(t.shape)}, expected {shape} for this layer")


_INTS = (torch.int16, torch.int32, torch.int64)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _check_exl2(key: str, t: dict[str, torch.Tensor], k: int, n: int) -> None:
    qw = t["q_weight"]
    np_ = exl2.padded_columns(n)
    if qw.dim() != 2 or qw.shape[1] != np_:
        raise ValueError(
            f"{key}.q_weight: shape {tuple(qw.shape)}, expected [Q, {np_}] (out_features {n} padded to "
            f"a multiple of 32)"
        )
    _expect(key, "q_weight", qw, (torch.int32,), tuple(qw.shape))
    g = t["q_scale_max"].numel()
    _expect(key, "q_scale_max", t["q_scale_max"], _FLOATS, (g,))
    _expect(key, "q_scale", t["q_scale"], (torch.int32,), (g, np_ // 8))
    _expect(key, "q_groups", t["q_groups"], _INTS, (2 * g,))
    if k > exl2.MAX_IN_FEATURES:
        exl2.parse_groups(key, t["q_groups"], qw.shape[0], k)   # raises the K > 65535 error
    _expect(key, "q_invperm", t["q_invperm"], _INTS, (k,))
    inv = t["q_invperm"].to(torch.int64)
    if not torch.equal(torch.sort(inv).values, torch.arange(k, device=inv.device)):
        raise ValueError(f"{key}.q_invperm: not a permutation of 0..{k - 1}; the file is damaged")


def _check_gptq(key: str, t: dict[str, torch.Tensor], k: int, n: int) -> None:
    if k % 8 or n % 8:
        raise ValueError(f"{key}: GPTQ needs in_features ({k}) and out_features ({n}) divisible by 8")
    qw = t["qweight"]
    if qw.dtype == torch.int32 and qw.dim() == 2 and qw.shape[0] * 8 != k:
        raise ValueError(
            f"{key}.qweight: {qw.shape[0]} rows pack {qw.shape[0] * 8} input features, layer has {k}; "
            f"only 4-bit GPTQ is supported"
        )
    _expect(key, "qweight", qw, (torch.int32,), (k // 8, n))
    s = t["scales"]
    if s.dim() != 2 or s.shape[0] == 0:
        raise ValueError(f"{key}.scales: shape {tuple(s.shape)}, expected [groups, {n}]")
    g = s.shape[0]
    _expect(key, "scales", s, _FLOATS, (g, n))
    _expect(key, "qzeros", t["qzeros"], (torch.int32,), (g, n // 8))
    if "g_idx" in t:
        _expect(key, "g_idx", t["g_idx"], _INTS, (k,))
    elif gptq.default_group_size(k, g) * (g - 1) >= k:
        raise ValueError(f"{key}: {g} groups do not fit {k} input features without a g_idx")


def _load_bias(key: str, t: dict[str, torch.Tensor], n: int, device: torch.device) -> torch.Tensor | None:
    b = t.get("bias")
    if b is None:
        return None
    if b.dim() != 1 or b.shape[0] not in (n, exl2.padded_columns(n)):
        raise ValueError(f"{key}.bias: shape {tuple(b.shape)}, expected [{n}]")
    if not b.is_floating_point():
        raise ValueError(f"{key}.bias: dtype {b.dtype}, expected a float type")
    return b[:n].to(device, torch.float16)


# the tensor that marks each stored form of a linear layer's weight, in the order they are looked for
FORMAT_MARKERS = {"exl2": "q_weight", "gptq": "qweight", "fp16": "weight"}
QUANTIZED_SUFFIXES = ("q_weight", "qweight", "qzeros")


def stored_format(tensors: TensorSource, key: str) -> str | None:
    """How the linear layer under `key` stores its weight: 'exl2', 'gptq', 'fp16' (any float dtype), or None
    when no weight is there. The one place a weight format is told from tensor names."""
    return next((fmt for fmt, suffix in FORMAT_MARKERS.items() if tensors.has(f"{key}.{suffix}")), None)


def is_quantized_tensor(name: str) -> bool:
    """Whether the checkpoint tensor `name` belongs to an EXL2 or GPTQ layer."""
    return name.rsplit(".", 1)[-1] in QUANTIZED_SUFFIXES


def load_quantized(
    key: str,
    tensors: TensorSource,
    in_features: int,
    out_features: int,
    prescale: float = 1.0,
    device: torch.device = torch.device("cpu"),
    gptq_v2: bool = False,
) -> QuantWeight | None:
    """The quantized weight stored under `key` (EXL2 if `<key>.q_weight` exists, GPTQ if
    `<key>.qweight` does), or None when the layer is not quantized."""
    device = torch.device(device)
    fmt = stored_format(tensors, key)
    try:
        if fmt == "exl2":
            t = _gather(key, tensors, _EXL2_NAMES, ("bias",))
            return Exl2Weight(key, t, in_features, out_features, prescale, device)
        if fmt == "gptq":
            t = _gather(key, tensors, _GPTQ_NAMES, ("g_idx", "bias"))
            return GptqWeight(key, t, in_features, out_features, prescale, device, gptq_v2)
    except ValueError as e:
        if isinstance(e, ExLlamaV2Error):
            raise
        # The format checks (here and in exl2.parse_groups) name the tensor and the fix: to callers they
        # are checkpoint errors, one line in the CLIs (issue 18), and still ValueErrors.
        raise CheckpointError(str(e)) from e
    return None
