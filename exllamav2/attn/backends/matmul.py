"""Plain matmul attention: the reference every other backend is tested against.

Scores and softmax are computed in fp32 and the scale is applied to q before the product, so fp16
inputs with large activations cannot overflow (upstream multiplied in fp16 and scaled afterwards).
"""

from __future__ import annotations

import torch

from .backend import AttentionBackend, repeat_kv, run_decode_kernel
from .metadata import AttnMetadata


class MatmulBackend(AttentionBackend):
    name = "matmul"
    runs_decode_kernel = True

    def attend(self, q, k, v, meta: AttnMetadata, *, scale, window=0, softcap=0.0, chunk=0, decode_kernel=None):
        out = run_decode_kernel(decode_kernel, q, k, v, meta, scale, window, softcap, chunk)
        if out is not None:
            return out
        groups = q.shape[2] // k.shape[2]
        qf = q.float().transpose(1, 2) * scale                      # (B, Hq, q, D)
        kf = repeat_kv(k, groups).float().transpose(1, 2)           # (B, Hq, k, D)
        vf = repeat_kv(v, groups).float().transpose(1, 2)
        scores = qf @ kf.transpose(-1, -2)                          # (B, Hq, q, k)
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        vis = meta.visibility(q.device, window, chunk)              # (B, 1, q, k)
        scores = scores.masked_fill(~vis, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        probs = torch.nan_to_num(probs, nan=0.0)                     # rows that see no key
        out = probs @ vf                                            # (B, Hq, q, D)
        return out.transpose(1, 2).to(q.dtype)
