"""The mixture-of-experts MLP: a router picks the top-k experts of each token, the experts (gated MLPs) run only
on the tokens routed to them, and their outputs are summed with the routing weights (Llama 4 weights their inputs
instead); an optional shared expert (Qwen2-MoE, with its sigmoid gate; Llama 4, ungated) runs on every token.

It is one more MLP kind: `ExLlamaV2MoEMLP` keeps ExLlamaV2MLP's contract (`forward` with the layer's norms and
residual, `project` without), so the model builder places it where a dense MLP goes (`make_mlp`). What differs
between families is data in the architecture row (`architecture.MoESpec`): key names, the scoring rule, whether
the top-k weights are renormalised, the shared expert.

Experts are ExLlamaV2Linear triples, so FP16, EXL2 and GPTQ experts load as any linear does. A checkpoint stores
them per expert (`<block>.experts.<n>.<proj>.weight`) or stacked, one [experts, rows, in] tensor per kind
(transformers 5's `experts.gate_up_proj` / `experts.down_proj`, Granite-MoE's `input_linear` / `output_linear`);
a stacked tensor is sliced per expert at load. The router stays FP16 (the converter quantizes only linears).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import ConfigError, TensorShapeError
from ..quant import stored_format
from .linear import ExLlamaV2Linear
from .mlp import ACTIVATION_FUNCTIONS, ExLlamaV2MLP
from .module import ExLlamaV2CompositeModule, ExLlamaV2Module
from .norm import optional_norm

log = logging.getLogger(__name__)


def _softmax_topk(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, then the top k (Mixtral, Qwen-MoE, OLMoE); optionally renormalised to sum 1."""
    weights, chosen = torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, chosen


def _topk_softmax(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k logits, then a softmax over those k (Granite-MoE): the top-k choice is made on the logits."""
    top, chosen = torch.topk(logits, k, dim=-1)
    return torch.softmax(top, dim=-1), chosen


def _topk_sigmoid(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k logits, each through a sigmoid (Llama 4): the weights need not sum to 1."""
    top, chosen = torch.topk(logits, k, dim=-1)
    return torch.sigmoid(top), chosen


# MoESpec.scoring -> (router logits in fp32 [tokens, experts], k, renormalize) -> (weights, expert ids) [tokens, k]
SCORING: dict[str, Callable[[torch.Tensor, int, bool], tuple[torch.Tensor, torch.Tensor]]] = {
    "softmax_topk": _softmax_topk,
    "topk_softmax": _topk_softmax,
    "topk_sigmoid": _topk_sigmoid,
}


class ExLlamaV2Router(ExLlamaV2Module):
    """A small unquantized projection read from `<key>.weight` (or an alternative key of another layout): the
    router, [experts, hidden], and Qwen2-MoE's shared-expert gate, [1, hidden]. Its logits are computed in fp32
    whatever the model's dtype, so that top-k choices (and ties) do not depend on fp16 rounding."""

    name = "Router"

    def __init__(self, model, key: str, out_features: int, alt_keys: tuple[str, ...] = ()) -> None:
        super().__init__(model, key)
        self.alt_keys = alt_keys
        self.out_features = out_features
        self.weight: torch.Tensor | None = None

    def _source_key(self) -> str:
        for key in (self.key, *self.alt_keys):
            if self.has(f"{key}.weight"):
                return key
        names = ", ".join(f"'{k}.weight'" for k in (self.key, *self.alt_keys))
        raise KeyError(f"no router weights: looked for {names} in {', '.join(self.index.files)}")

    def checkpoint_keys(self) -> dict[str, tuple[str, ...]]:
        return {k: ("weight",) for k in (self.key, *self.alt_keys)}

    def load(self) -> None:
        key = self._source_key()
        w = self.load_tensor(f"{key}.weight", (self.out_features, self.model.config.hidden_size))
        self.weight = w.to(self.device, torch.float32)

    def unload(self) -> None:
        self.weight = None

    def weight_footprint(self) -> int:
        return 4 * self.out_features * self.model.config.hidden_size

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return F.linear(x.float(), self.weight)


class _StackedTensors:
    """The stacked expert tensors of one MoE block, each read once per load and shared by the block's experts."""

    def __init__(self, module: ExLlamaV2Module) -> None:
        self.module = module
        self.tensors: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            t = self.module.load_tensor(name)
            # DBRX stores [experts x rows, in]: seen as [experts, rows, in]
            self.tensors[name] = t.view(self.module.num_experts, -1, t.shape[-1]) if t.dim() == 2 else t
        return self.tensors[name]

    def clear(self) -> None:
        self.tensors.clear()


class ExLlamaV2ExpertLinear(ExLlamaV2Linear):
    """One projection of one expert: its own tensors under `key` (FP16, EXL2 or GPTQ, stored (out, in)), else
    outputs [start, end) of expert `expert` in a stacked checkpoint tensor, [experts, out rows, in_features] or,
    with `stacked_transposed`, [experts, in_features, out columns]. `stacked` lists the candidate stacked layouts
    as (tensor name, first output, end output); the first present in the checkpoint is used."""

    def __init__(self, model, key: str, in_features: int, out_features: int, expert: int,
                 stacked: tuple[tuple[str, int, int], ...], source: _StackedTensors,
                 stacked_transposed: bool = False) -> None:
        super().__init__(model, key, in_features, out_features)
        self.expert = expert
        self.stacked = stacked
        self.source = source
        self.stacked_transposed = stacked_transposed

    def stacked_source(self) -> tuple[str, int, int] | None:
        """The stacked tensor this expert is read from, or None when the checkpoint has the expert's own keys."""
        if stored_format(self.index, self.key) is not None:
            return None
        return next((s for s in self.stacked if self.has(s[0])), None)

    def _source_key(self) -> str:
        if self.stacked_source() is not None:
            return self.key
        try:
            return super()._source_key()
        except KeyError as e:
            names = ", ".join(repr(s[0]) for s in self.stacked)
            raise KeyError(f"{e.args[0]}; nor a stacked expert tensor ({names})") from None

    def checkpoint_keys(self) -> dict[str, tuple[str, ...]]:
        keys = dict(super().checkpoint_keys())
        for name, _, _ in self.stacked:
            key, _, suffix = name.rpartition(".")
            keys[key] = tuple(dict.fromkeys(keys.get(key, ()) + (suffix,)))
        return keys

    def load_tensor(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        stacked = self.stacked_source() if name == f"{self.key}.weight" else None
        if stacked is None:
            return super().load_tensor(name, shape)
        tensor_name, start, end = stacked
        w = self.source.get(tensor_name)
        out_dim, in_dim = (2, 1) if self.stacked_transposed else (1, 2)
        if w.dim() != 3 or self.expert >= w.shape[0] or w.shape[out_dim] < end or w.shape[in_dim] != self.in_features:
            want = ((f">={end}", self.in_features) if out_dim == 1 else (self.in_features, f">={end}"))
            raise TensorShapeError(
                f"tensor {tensor_name!r} in {self.index.file_of(tensor_name)} has shape {tuple(w.shape)}; expert "
                f"{self.expert} needs (>{self.expert}, {want[0]}, {want[1]}): config.json and the weights "
                f"disagree (num_experts, intermediate size or hidden size)"
            )
        return w[self.expert, :, start:end].T if self.stacked_transposed else w[self.expert, start:end]


class _Expert:
    """A gated MLP, down(act(gate(x)) * up(x)), made of three linears (an expert or the shared expert)."""

    def __init__(self, gate: ExLlamaV2Linear, up: ExLlamaV2Linear, down: ExLlamaV2Linear, act) -> None:
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down
        self.act = act

    def linears(self) -> list[ExLlamaV2Linear]:
        return [self.gate_proj, self.up_proj, self.down_proj]

    def project(self, x: torch.Tensor, loras: list | None = None) -> torch.Tensor:
        return self.down_proj.forward(self.act(self.gate_proj.forward(x, loras)) * self.up_proj.forward(x, loras),
                                      loras)


class ExLlamaV2MoEMLP(ExLlamaV2MLP):
    """The sparse MLP of one decoder layer (upstream's class name). `forward` (norms, residual) is the dense
    MLP's; `project` routes."""

    name = "MoEMLP"

    def __init__(self, model, layer_key: str, layer_idx: int) -> None:
        cfg, arch = model.config, model.config.arch
        spec = arch.moe
        block = f"{layer_key}.{spec.block}"
        ExLlamaV2CompositeModule.__init__(self, model, block)   # upstream's module key: <layer>.block_sparse_moe
        self.layer_idx = layer_idx
        self.spec = spec
        self.num_experts = cfg.num_experts
        self.renormalize = cfg.moe_norm_topk_prob
        self.scoring = SCORING[spec.scoring]
        self.act = ACTIVATION_FUNCTIONS[cfg.activation]
        self.residual_scale = cfg.residual_multiplier
        self.pre_norm = optional_norm(model, layer_key, arch.mlp_norm)
        self.post_norm = optional_norm(model, layer_key, arch.post_mlp_norm)
        self.gate_proj = None        # ExLlamaV2MLP's dense parts: none here
        self.router = ExLlamaV2Router(model, f"{block}.{spec.router}", cfg.num_experts,
                                      tuple(f"{layer_key}.{k}" for k in spec.alt_routers))
        self.source = _StackedTensors(self)
        self.experts = [self._expert(layer_key, e) for e in range(cfg.num_experts)]
        self.shared_expert = self.shared_gate = None
        if spec.shared_expert:
            size, h = cfg.shared_expert_intermediate_size, cfg.hidden_size
            self.shared_expert = _Expert(*(ExLlamaV2Linear(model, f"{block}.{spec.shared_expert}.{k}", i, o)
                                           for k, (i, o) in zip(spec.expert_keys, ((h, size), (h, size), (size, h)))),
                                         self.act)
        if spec.shared_gate:
            self.shared_gate = ExLlamaV2Router(model, f"{block}.{spec.shared_gate}", 1)

    def _expert(self, layer_key: str, e: int) -> _Expert:
        cfg, spec = self.model.config, self.spec
        h, i = cfg.hidden_size, cfg.moe_intermediate_size
        gate_k, up_k, down_k = (f"{self.key}.{spec.experts}.{e}.{k}" for k in spec.expert_keys)
        gate_up = tuple((f"{layer_key}.{gu}", 0, i) for gu, _ in spec.stacked)       # gate outputs first, then up
        up = tuple((f"{layer_key}.{gu}", i, 2 * i) for gu, _ in spec.stacked)
        down = tuple((f"{layer_key}.{d}", 0, h) for _, d in spec.stacked)
        gate_up += tuple((f"{layer_key}.{g}", 0, i) for g, _, _ in spec.stacked_glu)   # three separate tensors
        up += tuple((f"{layer_key}.{u}", 0, i) for _, u, _ in spec.stacked_glu)
        down += tuple((f"{layer_key}.{d}", 0, h) for _, _, d in spec.stacked_glu)
        t = spec.stacked_transposed
        return _Expert(ExLlamaV2ExpertLinear(self.model, gate_k, h, i, e, gate_up, self.source, t),
                       ExLlamaV2ExpertLinear(self.model, up_k, h, i, e, up, self.source, t),
                       ExLlamaV2ExpertLinear(self.model, down_k, i, h, e, down, self.source,
                                             t or spec.stacked_down_transposed), self.act)

    def submodules(self) -> list[ExLlamaV2Module]:
        # the linears in the converter's order (linears_of): experts 0..n-1 (gate, up, down), then the shared one
        parts = [self.pre_norm, self.post_norm, self.router, self.shared_gate]
        linears = [lin for ex in (*self.experts, self.shared_expert) if ex for lin in ex.linears()]
        return [m for m in parts if m] + linears

    def load(self) -> None:
        try:
            super().load()
        finally:
            self.source.clear()     # the stacked tensors were only needed to slice the experts from

    def top_k(self) -> int:
        """config.num_experts_per_token, read at each forward as upstream does (clients set it after loading)."""
        k = self.model.config.num_experts_per_token
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.num_experts:
            raise ConfigError(f"num_experts_per_token is {k!r}; this model ({self.model.config.architecture}) needs "
                              f"an integer from 1 to its {self.num_experts} experts (its checkpoint routes to "
                              f"{self.model.config.default_experts_per_token})")
        return k

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(routing weights in fp32, expert ids), each [tokens, k], for the flattened tokens `x`."""
        return self.scoring(self.router.forward(x), self.top_k(), self.renormalize)

    def project(self, h: torch.Tensor, loras: list | None = None) -> torch.Tensor:
        x = h.reshape(-1, h.shape[-1])
        weights, chosen = self.route(x)
        out = self.run_experts(x, weights, chosen, loras)
        if self.shared_expert is not None:
            shared = self.shared_expert.project(x, loras)
            if self.shared_gate is not None:
                shared = shared * torch.sigmoid(self.shared_gate.forward(x)).to(shared.dtype)
            out = out + shared
        return out.view(h.shape)

    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor,
                    loras: list | None = None) -> torch.Tensor:
        """Σ_k weight_k · expert_k(x) per token. The (token, k) pairs are sorted by expert so that each expert
        used runs once, one matmul per projection over all of its tokens; experts no token chose never run."""
        if x.shape[0] == 1:                         # one token (decode): its k experts in turn, nothing to group
            w = weights[0].to(x.dtype)
            out = None
            for j, e in enumerate(chosen[0].tolist()):
                y = self._weighted(self.experts[e], x, w[j], loras)
                out = y if out is None else out.add_(y)
            return out
        k = chosen.shape[-1]
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens = order // k
        w = weights.reshape(-1)[order].to(x.dtype).unsqueeze(-1)
        # each expert's weighted outputs in sorted order, then put back in (token, k) order and summed over k:
        # one scatter for the layer instead of one index_add per expert
        rows_out = x.new_empty(flat.shape[0], x.shape[-1])
        start = 0
        for e, n in enumerate(counts):
            if n:
                end = start + n
                self._weighted(self.experts[e], x[tokens[start:end]], w[start:end], loras, out=rows_out[start:end])
                start = end
        out = torch.empty_like(rows_out)
        out[order] = rows_out
        return out.view(x.shape[0], k, x.shape[-1]).sum(dim=1)

    def _weighted(self, expert: _Expert, x: torch.Tensor, w: torch.Tensor, loras: list | None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """The expert's output weighted by its routing weight `w` (per row, or one scalar), written into `out`
        when given: the weight scales the output, or the input where the spec says (Llama 4)."""
        if self.spec.weight_inputs:
            y = expert.project(x * w, loras)
            return y if out is None else out.copy_(y)
        return torch.mul(expert.project(x, loras), w, out=out)


def make_mlp(model, layer_key: str, layer_idx: int) -> ExLlamaV2MLP:
    """The MLP of decoder layer `layer_idx`: sparse where the row has an MoE layout and config.json makes the layer
    sparse (Qwen-MoE's decoder_sparse_step and mlp_only_layers keep some dense), else dense."""
    cfg = model.config
    if cfg.arch.moe is not None and cfg.moe_layers[layer_idx]:
        return ExLlamaV2MoEMLP(model, layer_key, layer_idx)
    return ExLlamaV2MLP(model, layer_key, layer_idx)
