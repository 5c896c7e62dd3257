"""GPTQ with activation order onto EXL2 layouts (shared/reference §3.10).

For a linear layer y = x·W (W [K, N]) with calibration inputs x: H = 2·E[xᵀx]; rows are processed in
order of decreasing diag(H) (that order becomes the stored permutation); H is damped by 0.12·mean(diag)
and its inverse's upper Cholesky factor U drives the error feedback. Each group's scales are fitted
(exl2.fit_group) on the weights as updated so far, then its rows are quantized one by one, pushing
each row's error onto the rows not yet quantized.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..quant import exl2
from .qparams import QParams

log = logging.getLogger(__name__)

DAMPING = 0.12


class Hessian:
    """Accumulates H = 2/n Σ xᵀx over calibration inputs of one linear layer (fp32)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.h = torch.zeros((in_features, in_features), dtype=torch.float32, device=device)
        self.samples = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.h.device, torch.float32)
        self.h.addmm_(x.T, x)
        self.samples += x.shape[0]

    def prepare(self) -> "PreparedHessian":
        if self.samples == 0:
            raise RuntimeError("no calibration inputs reached this layer")
        return PreparedHessian.of(self.h * (2.0 / self.samples))


@dataclass
class PreparedHessian:
    perm: torch.Tensor     # int64 [K]: stored row k is input feature perm[k]
    u: torch.Tensor        # [K, K] upper Cholesky factor of inv(H_damped), in stored order

    @staticmethod
    def of(h: torch.Tensor) -> "PreparedHessian":
        diag = h.diagonal()
        perm = torch.argsort(diag, descending=True)
        hp = h[perm][:, perm].clone()
        dead = hp.diagonal() == 0                      # inputs never active: keep H invertible
        hp[dead, dead] = 1.0
        damp = max(DAMPING * float(hp.diagonal().mean()), 1e-6)
        idx = torch.arange(hp.shape[0], device=hp.device)
        for attempt in range(10):
            hp[idx, idx] += damp
            chol, info = torch.linalg.cholesky_ex(hp.double())
            if int(info) == 0:
                u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
                if torch.isfinite(u).all():
                    return PreparedHessian(perm, u.float())
            log.warning("Hessian not positive definite; adding damping (attempt %d)", attempt + 1)
        raise RuntimeError("Hessian could not be made positive definite; use more or different calibration data")


@dataclass
class QuantizedLinear:
    tensors: dict[str, torch.Tensor]    # pack_exl2's dict (suffix names)
    stored_dq: torch.Tensor             # fp16 [K, N]: the dequantized weight in stored order


def quantize_linear(weight: torch.Tensor, hessian: PreparedHessian, qp: QParams,
                    bias: torch.Tensor | None = None) -> QuantizedLinear:
    """weight [K, N] (y = x·W, any float dtype) -> EXL2 tensors for the layout qp gives K."""
    perm, u = hessian.perm, hessian.u
    w = weight.to(u.device, torch.float32)[perm].clone()
    k, n = w.shape
    layout = qp.layout(k)
    codes = torch.empty((k, n), dtype=torch.int64, device=w.device)
    dq = torch.empty((k, n), dtype=torch.float16, device=w.device)
    scale_codes, scale_max = [], []
    a = 0
    for bits, rows in layout:
        e = a + rows
        gq = exl2.fit_group(w[a:e], bits)
        scale_codes.append(gq.scale_codes)
        scale_max.append(gq.q_scale_max)
        err = torch.empty((rows, n), dtype=torch.float32, device=w.device)
        for i in range(a, e):
            c = gq.codes(w[i])
            d = gq.dequantize(c)
            codes[i], dq[i] = c, d
            err[i - a] = (w[i] - d.float()) / u[i, i]
            w[i + 1 : e].addr_(u[i, i + 1 : e], err[i - a], alpha=-1.0)
        w[e:].addmm_(u[a:e, e:].T, err, alpha=-1.0)
        a = e
    tensors = exl2.pack_exl2(codes.cpu(), layout, torch.stack(scale_codes).cpu(), torch.stack(scale_max).cpu(),
                             perm.cpu(), None if bias is None else bias.cpu())
    return QuantizedLinear(tensors, dq)
