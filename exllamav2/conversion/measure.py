"""Quantizing one module's linears, and the measurement pass: how much each candidate hurts.

A candidate's accuracy is 1 - ‖y_q - y‖ / ‖y‖ over the calibration rows, where y is the module's
FP16 output (residual included, as upstream measures it) and y_q its output with quantized linears.
"""

from __future__ import annotations

import logging

import torch
from tqdm import tqdm

from ..model.module import ExLlamaV2Module
from ..quant import load_quantized
from .layers import forward_rows, linears_of, module_name, record_hessians, role
from .qparams import QParams
from .quantizer import Hessian, PreparedHessian, QuantizedLinear, quantize_linear

log = logging.getLogger(__name__)


class _Tensors(dict):
    """A TensorSource over a dict of full tensor names."""

    def has(self, name: str) -> bool:
        return name in self

    def get(self, name: str) -> torch.Tensor:
        return self[name]


def quantize_module_linear(lin, hessian: PreparedHessian, qp: QParams) -> QuantizedLinear:
    """GPTQ-quantize a loaded linear's weight (without its prescale, which the loader reapplies)."""
    w = lin.weight.T.float()
    if lin.prescale != 1.0:
        w = w / lin.prescale
    return quantize_linear(w, hessian, qp, lin.bias)


def attach(lin, ql: QuantizedLinear, device: torch.device) -> None:
    """Make the linear run on its quantized weights, loaded exactly as a converted model's would be,
    and check that they reproduce the quantizer's own result bit for bit."""
    source = _Tensors({f"{lin.key}.{name}": t for name, t in ql.tensors.items()})
    plain = load_quantized(lin.key, source, lin.in_features, lin.out_features, 1.0, device)
    perm = torch.argsort(ql.tensors["q_invperm"].long()).to(device)
    if not torch.equal(plain.dequantize()[perm], ql.stored_dq.to(device)):
        raise RuntimeError(f"{lin.key}: packed weights do not reload to the quantized values (converter bug)")
    lin.q = plain if lin.prescale == 1.0 else load_quantized(
        lin.key, source, lin.in_features, lin.out_features, lin.prescale, device)


def detach(module: ExLlamaV2Module) -> None:
    for lin in linears_of(module):
        lin.q = None


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return float(torch.linalg.vector_norm(y.float() - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-20))


def prepare_all(hessians: dict[str, Hessian]) -> dict[str, PreparedHessian]:
    """Prepare each distinct Hessian once (q/k/v and gate/up share theirs)."""
    done: dict[int, PreparedHessian] = {}
    out = {}
    for name, h in hessians.items():
        if id(h) not in done:
            done[id(h)] = h.prepare()
        out[name] = done[id(h)]
    return out


def measure_module(module: ExLlamaV2Module, states: torch.Tensor, device: torch.device,
                   options: list[tuple[QParams, ...]]) -> tuple[list[dict], torch.Tensor]:
    """Try every candidate on a loaded module. Returns the measurement records (upstream's format)
    and the module's FP16 output, the next module's input."""
    with record_hessians(module, device) as hessians:
        ref = forward_rows(module, states, device)
    prepared = prepare_all(hessians)
    linears = linears_of(module)
    cache: dict[tuple[str, QParams], QuantizedLinear] = {}
    records = []
    name = module_name(module)
    for option in tqdm(options, desc=f"  {name}", unit="option", leave=False):
        if len(option) != len(linears):
            raise ValueError(f"{name}: candidate lists {len(option)} linears, the module has {len(linears)}")
        bits = 0
        record: dict = {}
        for lin, qp in zip(linears, option):
            r = role(lin)
            if (r, qp) not in cache:
                cache[(r, qp)] = quantize_module_linear(lin, prepared[r], qp)
            attach(lin, cache[(r, qp)], device)
            bits += qp.total_bits(lin.in_features, lin.out_features)
            record[r] = qp.to_dict()
        err = relative_error(forward_rows(module, states, device), ref)
        records.append({"accuracy": 1.0 - err, "total_bits": bits, **record})
        detach(module)
    best = max(records, key=lambda r: r["accuracy"])
    log.info("%s: accuracy %.5f at %.2f bpw (best candidate)", name, best["accuracy"],
             best["total_bits"] / sum(lin.in_features * lin.out_features for lin in linears))
    return records, ref
