"""xformers.ops.memory_efficient_attention written as plain PyTorch, with the input rules the real
operator enforces: BMHK layout with as many key/value heads as query heads, a tensor bias of the
query's dtype shaped (B, H, M, N) whose strides (but the last) are multiples of 16 bytes. Rows whose
bias is all -inf come out as NaN, as the worst case of the real kernels."""

import torch

from .attn_bias import LowerTriangularFromBottomRightMask


def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None, output_dtype=None):
    bsz, m, heads, d = query.shape
    n = key.shape[1]
    if key.shape[2] != heads or value.shape[2] != heads:
        raise ValueError("query, key and value must have the same number of heads in BMHK format")
    scale = d ** -0.5 if scale is None else scale
    scores = torch.einsum("bmhd,bnhd->bhmn", query.float(), key.float()) * scale
    if isinstance(attn_bias, LowerTriangularFromBottomRightMask):
        scores = scores + attn_bias.materialize((bsz, heads, m, n), device=query.device)
    elif isinstance(attn_bias, torch.Tensor):
        if attn_bias.dtype != query.dtype:
            raise ValueError(f"attn_bias dtype {attn_bias.dtype} != query dtype {query.dtype}")
        if tuple(attn_bias.shape) != (bsz, heads, m, n):
            raise ValueError(f"attn_bias shape {tuple(attn_bias.shape)} != {(bsz, heads, m, n)}")
        alignment = 128 // torch.finfo(attn_bias.dtype).bits
        for dim in range(attn_bias.ndim - 1):
            if attn_bias.stride(dim) % alignment:
                raise ValueError(f"attn_bias.stride(-2) % {alignment} != 0 (attn_bias.stride() = {attn_bias.stride()})")
        scores = scores + attn_bias.float()
    elif attn_bias is not None:
        raise NotImplementedError(f"the reference fake does not implement {type(attn_bias).__name__}")
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhmn,bnhd->bmhd", probs, value.float()).to(query.dtype)
