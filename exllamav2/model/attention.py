"""The attention layer: norm, q/k/v projections, RoPE, cache update, backend call, output projection.

It never branches on which backend runs: the model's attention plan hands it the backend for
its device, and the backend receives the same tensors and metadata whatever it is.
"""

from __future__ import annotations

import torch

from ..architecture import RopeStyle
from . import decode_blocks
from .linear import ExLlamaV2Linear, forward_many
from .module import ExLlamaV2CompositeModule, ExLlamaV2Module
from .norm import apply_norm, optional_norm
from .attn_params import PagedParams, Params


def _grouped_qkv_rows(heads: int, kv_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Rows of q, k and v in a fused qkv tensor laid out per kv group: the group's query heads, then its key head,
    then its value head (InternLM2's wqkv)."""
    group = heads // kv_heads
    block = (group + 2) * head_dim
    starts = torch.arange(kv_heads).view(-1, 1) * block
    span = torch.arange(group * head_dim)
    head = torch.arange(head_dim)
    return {"q_proj": (starts + span).flatten(), "k_proj": (starts + group * head_dim + head).flatten(),
            "v_proj": (starts + (group + 1) * head_dim + head).flatten()}


class ExLlamaV2Attention(ExLlamaV2CompositeModule):
    name = "Attention"
    Params = Params
    PagedParams = PagedParams

    def __init__(self, model, layer_key: str, layer_idx: int) -> None:
        super().__init__(model, f"{layer_key}.self_attn")      # upstream's module key
        key = layer_key
        cfg, arch = model.config, model.config.arch
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, qd, kd = cfg.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        sub = f"{key}.{arch.attn_key}"
        fused = f"{sub}.{arch.fused_qkv}" if arch.fused_qkv else None

        grouped = _grouped_qkv_rows(self.num_heads, self.num_kv_heads, self.head_dim) if arch.qkv_grouped else {}

        def proj(name: str, out: int, start: int) -> ExLlamaV2Linear:
            return ExLlamaV2Linear(model, f"{sub}.{name}", h, out, fused=fused and (fused, start, start + out),
                                   transposed=arch.transposed_weights, fused_rows=grouped.get(name))

        self.pre_norm = optional_norm(model, key, arch.attn_norm)
        self.post_norm = optional_norm(model, key, arch.post_attn_norm)
        # norms of q and k before RoPE, per head (Qwen3, Gemma 3) or over the whole projection (Olmo 2)
        full = arch.qk_norm == "full"
        self.q_norm = optional_norm(model, sub, arch.qk_norm and "q_norm", qd if full else self.head_dim)
        self.k_norm = optional_norm(model, sub, arch.qk_norm and "k_norm", kd if full else self.head_dim)
        self.q_proj = proj("q_proj", qd, 0)
        self.k_proj = proj("k_proj", kd, qd)
        self.v_proj = proj("v_proj", kd, qd + kd)
        self.o_proj = ExLlamaV2Linear(model, f"{sub}.{arch.o_proj_key}", qd, h, transposed=arch.transposed_weights)
        self.scale = cfg.attn_scale
        self.softcap = float(cfg.attn_logit_softcapping or 0.0)
        self.clip_qkv = cfg.clip_qkv
        self.window = cfg.sliding_window if cfg.swa_layers[layer_idx] else 0
        self.chunk = cfg.attention_chunk_size if cfg.chunked_layers[layer_idx] else 0
        rope = cfg.rope_layers[layer_idx]
        self.rope_style = arch.rope_style if rope else RopeStyle.NONE
        # Llama 4: q and k heads RMS-normed without weight after RoPE on the RoPE layers (use_qk_norm), queries
        # scaled by their position's temperature on the NoPE layers (attn_temperature_tuning)
        self.qk_l2_eps = cfg.norm_eps if cfg.qk_l2_norm and rope else None
        self.temperature = None if rope else cfg.attn_temperature
        self.qk_l2_weight: torch.Tensor | None = None
        self.rope_local = cfg.rope_local(layer_idx)
        self.residual_scale = cfg.residual_multiplier
        self.backend = None
        self.decode_block: decode_blocks.AttentionBlock | None = None    # built at load where the layer allows

    def submodules(self) -> list[ExLlamaV2Module]:
        parts = (self.pre_norm, self.post_norm, self.q_proj, self.k_proj, self.v_proj, self.o_proj,
                 self.q_norm, self.k_norm)
        return [m for m in parts if m]

    def load(self) -> None:
        super().load()
        self.backend = self.model.attn_plan.backend_for(self.device)
        if self.qk_l2_eps is not None:      # the weightless norm runs as the ops table's RMS norm with weight 1
            self.qk_l2_weight = torch.ones(self.head_dim, device=self.device)
        self.decode_block = decode_blocks.attention_block(self)

    def unload(self) -> None:
        super().unload()
        self.backend = self.qk_l2_weight = self.decode_block = None

    def forward(self, hidden_states: torch.Tensor, cache=None, attn_params=None, loras: list | None = None,
                **kwargs) -> torch.Tensor:
        block = self.decode_block
        if block is not None and block.takes(hidden_states, cache, attn_params, loras):
            return block.forward(hidden_states, cache, attn_params)
        o = self.attend(apply_norm(self.pre_norm, hidden_states), cache, attn_params, loras)
        return torch.add(hidden_states, apply_norm(self.post_norm, o), alpha=self.residual_scale)

    def attend(self, h: torch.Tensor, cache, attn_params, loras: list | None = None) -> torch.Tensor:
        """Attention of the normed input `h` through the cache, after the output projection (no residual)."""
        bsz, q_len, _ = h.shape
        q, k, v = forward_many((self.q_proj, self.k_proj, self.v_proj), h, loras)
        q = apply_norm(self.q_norm, q).view(bsz, q_len, self.num_heads, self.head_dim)
        k = apply_norm(self.k_norm, k).view(bsz, q_len, self.num_kv_heads, self.head_dim)
        v = v.view(bsz, q_len, self.num_kv_heads, self.head_dim)
        if self.clip_qkv is not None:           # OLMoE: q, k and v clamped after their norms
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        ops = self.ops
        q, k = ops.rotate_qk(q, k, attn_params, self.model.rope_tables(self.device, self.rope_local),
                             self.rope_style)
        q, k = self._after_rope(q, k, attn_params)
        opts = dict(scale=self.scale, window=self.window, softcap=self.softcap, chunk=self.chunk)

        if attn_params.paged:
            block_table, seqlens = attn_params.on(self.device)
            page = attn_params.page_size
            kc, vc = cache.get_kv_state(self.layer_idx, 1, 0, q_len, page, seqlens, block_table)
            k_pages = kc.view(-1, page, self.num_kv_heads, self.head_dim)
            v_pages = vc.view(-1, page, self.num_kv_heads, self.head_dim)
            out = self._attend_paged(q, k, v, k_pages, v_pages, attn_params, opts)
            cache.store_kv_state(self.layer_idx, 1, 0, q_len, page, seqlens, block_table)
        elif cache is not None:
            past = attn_params.past_len
            kc, vc = cache.get_kv_state(self.layer_idx, bsz, 0, past + q_len)
            kc[:bsz, past : past + q_len] = k
            vc[:bsz, past : past + q_len] = v
            out = self._attend_dense(q, kc[:bsz], vc[:bsz], attn_params, past, opts)
            cache.store_kv_state(self.layer_idx, bsz, past, q_len)
        else:
            out = self._attend_dense(q, k, v, attn_params, 0, opts)

        return self.o_proj.forward(out.reshape(bsz, q_len, self.num_heads * self.head_dim), loras)

    def _attend_dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_params, past: int,
                      opts: dict) -> torch.Tensor:
        """The queries over k/v (`past` cached keys, then the new ones): in one backend call, or one per query
        span (image_attention.py), each over the keys up to its end."""
        spans = attn_params.image_spans
        if spans is None:
            end = past + q.shape[1]
            return self.backend.attend(q, k[:, :end], v[:, :end], attn_params.metadata(self.device),
                                       decode_kernel=self.ops.decode_attention, **opts)
        return torch.cat([self.backend.attend(q[:, s:e], k[:, : past + e], v[:, : past + e],
                                              attn_params.metadata(self.device, (s, e, causal)), **opts)
                          for s, e, causal in spans], dim=1)

    def _attend_paged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor,
                      v_pages: torch.Tensor, attn_params, opts: dict) -> torch.Tensor:
        """Paged attention (the new keys/values written into the pages): in one call, or one per query span, each
        span written after the tokens before it."""
        block_table, seqlens = attn_params.on(self.device)
        ops = self.ops
        kernel = ops.paged_attention
        if attn_params.image_spans is None:
            return self.backend.attend_paged(q, k, v, k_pages, v_pages, block_table, seqlens,
                                             meta=attn_params.paged_metadata(self.device), kernel=kernel,
                                             decode_kernel=ops.decode_attention,
                                             paged_decode_kernel=ops.paged_decode_attention, **opts)
        out = []
        for s, e, causal in attn_params.image_spans:
            lens, meta = attn_params.span_metadata(self.device, (s, e, causal))
            # the fused decode kernel knows only causal attention
            out.append(self.backend.attend_paged(q[:, s:e], k[:, s:e], v[:, s:e], k_pages, v_pages, block_table,
                                                 lens, meta=meta, kernel=kernel if causal else None, **opts))
        return torch.cat(out, dim=1)

    def _after_rope(self, q: torch.Tensor, k: torch.Tensor, attn_params) -> tuple[torch.Tensor, torch.Tensor]:
        """Llama 4's per-layer terms after RoPE: the weightless q/k norm, the queries' temperature."""
        if self.qk_l2_eps is not None:
            q = self.ops.rms_norm(q, self.qk_l2_weight, self.qk_l2_eps)
            k = self.ops.rms_norm(k, self.qk_l2_weight, self.qk_l2_eps)
        if self.temperature is not None:
            q = (q * attn_params.query_temperature(q.device, *self.temperature)).to(q.dtype)
        return q, k
