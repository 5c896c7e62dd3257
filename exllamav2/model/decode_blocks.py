"""Whole decode blocks on the CPU kernels (exllamav2_ext/cpu/decode_blocks.cpp): an attention or MLP layer of one
new token per row in one kernel call instead of about fifteen Python and dispatcher calls, which at decode sizes
cost up to a fifth of the step.

A block is built at load only for a layer whose every part it computes as the layer's own forward does (that
forward is its twin: the same kernels in the same order), and it runs only for the calls it computes exactly:
one token per row, few rows, no adapters, the plain cache (dense, or the dynamic generator's pages), no mask,
offsets, MRoPE positions or image spans. Everything else takes the layer's own path, so a block can only make a
supported call faster. Where every decoder layer has its block, the decode stack runs them all in one call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..architecture import RopeStyle
from ..attn.backends.backend import CPU_KEY_BLOCK
from ..cache.base import ExLlamaV2Cache
from ..quant.cpu_layout import MAX_GEMV_ROWS
from .linear import ExLlamaV2Linear
from .module import Intervention
from .norm import ExLlamaV2RMSNorm

if TYPE_CHECKING:
    from .attention import ExLlamaV2Attention
    from .mlp import ExLlamaV2MLP
    from .model import ExLlamaV2

_ACTIVATIONS = (torch.float32, torch.bfloat16)


def _kernels(module):
    """The CPU kernels of the module's device where they build decode blocks, else None."""
    ops = module.ops
    return ops.cpu if ops.cpu is not None and ops.dtype in _ACTIVATIONS else None


def _projections(linears: tuple[ExLlamaV2Linear, ...], kernels) -> list | None:
    """The layers as the blocks' projections: all on the quantized CPU kernels or all on the 16-bit one, else None."""
    forms = [lin.q._cpu_form() if lin.q is not None else None for lin in linears]
    if all(f is not None for f in forms):
        return [f.decode_proj(kernels) for f in forms]
    if all(lin._matvec for lin in linears):
        return [kernels.DecodeProj.dense(lin.weight, lin.bias) for lin in linears]
    return None


def _plain_norm(norm) -> bool:
    return isinstance(norm, ExLlamaV2RMSNorm)


def attention_block(attn: ExLlamaV2Attention) -> AttentionBlock | None:
    """The layer's fused decode block, or None where it has a part the block does not compute: another norm, a
    post-norm, clipping, GPT-J RoPE, a window, softcap or chunks, Llama 4's terms, a residual scale, a backend that
    does not run the CPU's decode kernel. q/k RMS norms (per head or over the projection) it computes."""
    kernels = _kernels(attn)
    qk_norms = (attn.q_norm, attn.k_norm)
    plain = (_plain_norm(attn.pre_norm) and attn.post_norm is None
             and (qk_norms == (None, None) or all(_plain_norm(n) for n in qk_norms)) and attn.clip_qkv is None
             and attn.rope_style in (RopeStyle.NEOX, RopeStyle.NONE) and not attn.window and not attn.softcap
             and not attn.chunk and attn.qk_l2_eps is None and attn.temperature is None
             and attn.residual_scale == 1 and attn.head_dim % 16 == 0
             and getattr(attn.backend, "runs_decode_kernel", False))
    if kernels is None or not plain:
        return None
    projs = _projections((attn.q_proj, attn.k_proj, attn.v_proj), kernels)
    out = _projections((attn.o_proj,), kernels)
    if projs is None or out is None:
        return None
    block = kernels.AttnDecodeBlock(attn.pre_norm.weight, attn.model.config.norm_eps, *projs, *out, attn.num_heads,
                                    attn.num_kv_heads, attn.head_dim, attn.scale,
                                    *(n and n.weight for n in qk_norms))
    return AttentionBlock(attn, block)


def mlp_block(mlp: ExLlamaV2MLP) -> MlpBlock | None:
    """The layer's fused decode block: a gated SiLU MLP after an RMS norm, no post-norm or residual scale; else
    None."""
    kernels = _kernels(mlp)
    plain = (_plain_norm(mlp.pre_norm) and mlp.post_norm is None and mlp.gate_proj is not None
             and mlp.act is F.silu and mlp.residual_scale == 1)
    if kernels is None or not plain:
        return None
    projs = _projections((mlp.gate_proj, mlp.up_proj), kernels)
    down = _projections((mlp.down_proj,), kernels)
    if projs is None or down is None:
        return None
    return MlpBlock(mlp.ops.dtype, kernels.MlpDecodeBlock(mlp.pre_norm.weight, mlp.model.config.norm_eps, *projs,
                                                          *down))


def _decode_rows(x: torch.Tensor, dtype: torch.dtype, loras) -> bool:
    """One token per row, few rows, the activations' dtype, no adapters."""
    return x.dim() == 3 and x.shape[1] == 1 and x.shape[0] <= MAX_GEMV_ROWS and x.dtype == dtype and not loras


def _plain_step(x: torch.Tensor, dtype: torch.dtype, cache, p, loras) -> bool:
    """A decode step the attention blocks compute exactly: few rows of one token, the plain cache in the activations'
    dtype (dense: no mask or offsets; paged: pages of whole key blocks of the decode attention), no MRoPE or image
    spans."""
    if not (_decode_rows(x, dtype, loras) and type(cache) is ExLlamaV2Cache and cache.dtype == dtype
            and p.mrope_positions is None and p.image_spans is None):
        return False
    if p.paged:
        return p.page_size % CPU_KEY_BLOCK == 0
    return p.input_mask is None and p.position_offsets is None


def _rope(attn: ExLlamaV2Attention, attn_params) -> tuple[torch.Tensor, torch.Tensor]:
    return attn_params.rope(attn.model.rope_tables(attn.device, attn.rope_local))


def _pools(attn: ExLlamaV2Attention, cache, attn_params) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's key and value page pools [P, page_size, Hkv, D] of a paged batch."""
    block_table, seqlens = attn_params.on(attn.device)
    page = attn_params.page_size
    kc, vc = cache.get_kv_state(attn.layer_idx, 1, 0, 1, page, seqlens, block_table)
    shape = (-1, page, attn.num_kv_heads, attn.head_dim)
    return kc.view(shape), vc.view(shape)


def _caches(attn: ExLlamaV2Attention, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's dense key and value caches [batch, S, Hkv, D]: the plain cache's whole tensors (as its
    get_kv_state gives them, without the call)."""
    return cache.key_states[attn.layer_idx], cache.value_states[attn.layer_idx]


class AttentionBlock:
    def __init__(self, attn: ExLlamaV2Attention, block) -> None:
        self.attn = attn
        self.block = block
        self.dtype = attn.ops.dtype

    def takes(self, x: torch.Tensor, cache, attn_params, loras) -> bool:
        """Whether this call is a plain decode step the block computes exactly."""
        return _plain_step(x, self.dtype, cache, attn_params, loras)

    def forward(self, x: torch.Tensor, cache, attn_params) -> torch.Tensor:
        attn = self.attn
        cos = sin = None
        if attn.rope_style == RopeStyle.NEOX:
            cos, sin = _rope(attn, attn_params)
        if attn_params.paged:
            return self.block.forward_paged(x, *_pools(attn, cache, attn_params), *attn_params.on(attn.device),
                                            cos, sin)
        return self.block.forward(x, *_caches(attn, cache), attn_params.past_len, cos, sin)


class MlpBlock:
    def __init__(self, dtype: torch.dtype, block) -> None:
        self.dtype = dtype
        self.block = block

    def takes(self, x: torch.Tensor, loras) -> bool:
        return _decode_rows(x, self.dtype, loras)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.forward(x)


def head_block(model: ExLlamaV2):
    """The final norm and the head as one kernel object for the decode stack, where the norm is a plain RMS norm and
    the head a projection the blocks compute, both on one device; else None."""
    norm, head = model.modules[-2:]
    kernels = _kernels(head)
    if kernels is None or not _plain_norm(norm) or not isinstance(head, ExLlamaV2Linear) or norm.device != head.device:
        return None
    proj = _projections((head,), kernels)
    return None if proj is None else kernels.DecodeHead(norm.weight, model.config.norm_eps, proj[0])


def decode_stack(model: ExLlamaV2) -> DecodeStack | None:
    """The decoder layers between the embedding and the final norm as one call per decode step, where every one of
    them is an attention or MLP layer with its block (not wrapped in an Intervention), all on one device, the
    rotating attention layers sharing one RoPE table; else None. The final norm and head join it where they can
    (`head_block`) and sit on the layers' device."""
    layers = model.modules[1:-2]
    blocks = [getattr(m, "decode_block", None) for m in layers]
    if not layers or any(isinstance(m, Intervention) for m in layers) or \
            not all(isinstance(b, (AttentionBlock, MlpBlock)) for b in blocks):
        return None
    attns = [b.attn for b in blocks if isinstance(b, AttentionBlock)]
    if not attns or len({m.device for m in layers}) != 1 or len({a.rope_local for a in attns}) != 1:
        return None
    head = head_block(model) if model.modules[-1].device == layers[0].device else None
    return DecodeStack(model, layers, blocks, head)


class DecodeStack:
    """What `decode_stack` builds: the layers' blocks in one kernel object, run while the model still holds those
    layers with those blocks (a layer replaced, wrapped or given another block after load stops it), and with the
    final norm and head where they joined (`head`), logits in the same call while the model holds those two."""

    def __init__(self, model: ExLlamaV2, layers: list, blocks: list, head=None) -> None:
        self.model = model
        self.layers = layers
        self.blocks = blocks
        self.tail = model.modules[-2:]
        self.has_head = head is not None
        self.attns = [b.attn for b in blocks if isinstance(b, AttentionBlock)]
        self.dtype = blocks[0].dtype
        rope = [isinstance(b, AttentionBlock) and b.attn.rope_style == RopeStyle.NEOX for b in blocks]
        self.rotates = any(rope)
        self.stack = model.ops(layers[0].device).cpu.DecodeStack([b.block for b in blocks], rope, head)

    def takes(self, x: torch.Tensor, cache, attn_params, loras) -> bool:
        # list equality tries identity first: two C loops instead of a Python one per layer
        return (_plain_step(x, self.dtype, cache, attn_params, loras) and self.model.modules[1:-2] == self.layers
                and [m.decode_block for m in self.layers] == self.blocks)

    def gives_logits(self) -> bool:
        """Whether `forward(..., logits=True)` may run: the head joined and the model still holds it and its norm."""
        return self.has_head and self.model.modules[-2:] == self.tail

    def forward(self, x: torch.Tensor, cache, attn_params, logits: bool = False) -> torch.Tensor:
        """The decoder's output for x [B, 1, H], or with logits the head's [B, 1, V] (in x's dtype)."""
        cos, sin = _rope(self.attns[0], attn_params) if self.rotates else (None, None)
        if attn_params.paged:
            keys, values = zip(*(_pools(a, cache, attn_params) for a in self.attns))
            return self.stack.forward_paged(x, list(keys), list(values), *attn_params.on(self.attns[0].device),
                                            cos, sin, logits)
        keys, values = zip(*(_caches(a, cache) for a in self.attns))
        return self.stack.forward(x, list(keys), list(values), attn_params.past_len, cos, sin, logits)
