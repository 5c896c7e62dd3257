"""Running the model's modules one at a time on calibration states, and watching their linears.

The converter walks `model.modules` (embedding, attention and MLP per layer, norm, head) like the
model's forward does, but module by module over all calibration rows, so that only one module's
weights and the hidden states need to be resident.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch

from ..model.attention import ExLlamaV2Attention
from ..model.attn_params import Params
from ..model.embedding import ExLlamaV2Embedding
from ..model.linear import ExLlamaV2Linear
from ..model.mlp import ExLlamaV2MLP
from ..model.moe import ExLlamaV2MoEMLP
from ..model.module import ExLlamaV2Module
from ..model.parallel import ExLlamaV2ParallelDecoder
from .qparams import ATTN_OPTIONS, QParams, mlp_options, moe_options, parallel_options
from .quantizer import Hessian

log = logging.getLogger(__name__)

TOKENS_PER_BATCH = 4096


def is_layer(module: ExLlamaV2Module) -> bool:
    """Modules whose linears the measurement pass chooses parameters for."""
    return isinstance(module, (ExLlamaV2Attention, ExLlamaV2MLP, ExLlamaV2ParallelDecoder))


def options_for(module: ExLlamaV2Module) -> list[tuple[QParams, ...]]:
    """The measurement candidates of a layer, one QParams per linear in linears_of's order."""
    if isinstance(module, ExLlamaV2Attention):
        return ATTN_OPTIONS
    if isinstance(module, ExLlamaV2MoEMLP):
        return moe_options(len(module.experts), module.shared_expert is not None)
    if isinstance(module, ExLlamaV2MLP):
        return mlp_options(module.gate_proj is not None)
    return parallel_options(module.mlp.gate_proj is not None)


def module_name(module: ExLlamaV2Module) -> str:
    """The module's key in measurement.json (upstream's: <layer>.self_attn, <layer>.mlp, <layer>.block_sparse_moe)."""
    if isinstance(module, ExLlamaV2MoEMLP):
        return module.key
    suffix = ".self_attn" if isinstance(module, ExLlamaV2Attention) else ".mlp" if isinstance(module, ExLlamaV2MLP) else ""
    return module.key if not suffix or module.key.endswith(suffix) else module.key + suffix


def linears_of(module: ExLlamaV2Module) -> list[ExLlamaV2Linear]:
    if isinstance(module, ExLlamaV2Linear):
        return [module]
    return [m for m in getattr(module, "submodules", list)() if isinstance(m, ExLlamaV2Linear)]


def role(linear: ExLlamaV2Linear) -> str:
    """q_proj, down_proj, lm_head, ...: the name measurement.json uses for a linear; an expert's projections are
    <proj>.<expert> (w1.0, w3.0, w2.0, ...), as upstream names them."""
    name = linear.key.rsplit(".", 1)[-1]
    expert = getattr(linear, "expert", None)
    return name if expert is None else f"{name}.{expert}"


def forward_rows(module: ExLlamaV2Module, states: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The module's output for every row of `states` ([rows, length, ...]), returned on the CPU
    (calibration states stay in system memory; one batch at a time visits the device)."""
    rows, length = states.shape[:2]
    per_batch = max(1, TOKENS_PER_BATCH // length)
    params = None
    out = []
    for r in range(0, rows, per_batch):
        x = states[r : r + per_batch].to(device)
        if isinstance(module, ExLlamaV2Embedding):      # positions for learned position embeddings
            y = module.forward(x, attn_params=Params(x.shape[0], length, 0))
        elif is_layer(module):
            if params is None or params.batch_size != x.shape[0]:
                params = Params(x.shape[0], length, 0)
            y = module.forward(x, cache=None, attn_params=params)
        else:
            y = module.forward(x)
        out.append(y.cpu())
    return torch.cat(out)


@contextmanager
def record_hessians(module: ExLlamaV2Module, device: torch.device) -> Iterator[dict[str, Hessian]]:
    """While active, every call of one of the module's linears adds its input to a Hessian, keyed by
    the linear's role. Linears fed the same tensor (q/k/v, gate/up) share one Hessian, hence one
    activation order, as upstream does."""
    hessians: dict[str, Hessian] = {}
    last: list = [None, None]                       # (last input tensor, its Hessian)
    linears = linears_of(module)

    def wrap(lin: ExLlamaV2Linear):
        inner = type(lin).forward.__get__(lin)

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            name = role(lin)
            if last[0] is x:
                hessians.setdefault(name, last[1])
            else:
                h = hessians.get(name)
                if h is None:
                    h = hessians[name] = Hessian(x.shape[-1], device)
                h.add(x)
                last[0], last[1] = x, h
            return inner(x, *args, **kwargs)

        return forward

    for lin in linears:
        lin.forward = wrap(lin)
    try:
        yield hessians
        _unrouted_experts(linears, hessians, device)
    finally:
        for lin in linears:
            del lin.forward
        last[0] = last[1] = None


def _unrouted_experts(linears: list[ExLlamaV2Linear], hessians: dict[str, Hessian], device: torch.device) -> None:
    """Experts the calibration data never routed to still get a quantization (other text may route to them), as
    upstream gives them: with an identity Hessian, i.e. error-compensated rounding without activation statistics."""
    for lin in linears:
        if getattr(lin, "expert", None) is not None and role(lin) not in hessians:
            h = hessians[role(lin)] = Hessian(lin.in_features, device)
            h.h.fill_diagonal_(1.0)
            h.samples = 2           # prepare() scales by 2 / samples: H = I
            log.info("%s: no calibration token was routed to this expert; quantized with an identity Hessian", lin.key)
