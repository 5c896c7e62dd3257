"""A tiny real call of a backend on its device, checked against matmul: the last word on whether a
backend that passed every static check actually works there (wrong wheel, missing kernel image,
an op xformers can't dispatch...). Any exception becomes a reason instead of a crash.
"""

from __future__ import annotations

from typing import Callable

import torch

from .backends.backend import AttentionBackend
from .backends.matmul import MatmulBackend
from .backends.metadata import AttnMetadata

_TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 6e-2, torch.float32: 1e-3}
_PROBE_WINDOW = 3      # small enough to cut into the probe's 7 keys
_PROBE_CHUNK = 4       # chunks that split the probe's keys


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _check(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> str | None:
    err = (out.float() - ref.float()).abs().max().item()
    if not err <= _TOLERANCE[dtype]:  # also catches NaN
        return f"probe {name} differs from matmul (max abs error {err:.3g})"
    return None


def probe(
    build: Callable[[], AttentionBackend],
    dtype: torch.dtype,
    head_dim: int,
    *,
    window: bool = False,
    softcap: float = 0.0,
    chunk: bool = False,
) -> str | None:
    """Build the backend and run a cached prefill, a left-padded batch and a paged decode (GQA,
    q_len < k_len) on its device. Returns None when all match matmul, else the reason."""
    try:
        backend = build()
        device = backend.device
        ref = MatmulBackend(device)
        gen = torch.Generator().manual_seed(0)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

        opts = dict(scale=head_dim**-0.5, window=_PROBE_WINDOW if window else 0, softcap=softcap,
                    chunk=_PROBE_CHUNK if chunk else 0)
        q, k, v = rand(2, 3, 4, head_dim), rand(2, 7, 2, head_dim), rand(2, 7, 2, head_dim)
        padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7], dtype=torch.bool, device=device)
        for name, meta in (
            ("attend", AttnMetadata(batch_size=2, q_len=3, k_len=7, past_len=4)),
            ("attend (padded)", AttnMetadata(batch_size=2, q_len=3, k_len=7, past_len=4, key_mask=padding)),
        ):
            failure = _check(name, backend.attend(q, k, v, meta, **opts), ref.attend(q, k, v, meta, **opts), dtype)
            if failure:
                return failure

        k_pages, v_pages = rand(2, 256, 2, head_dim), rand(2, 256, 2, head_dim)
        table = torch.tensor([[1], [0]], dtype=torch.int32, device=device)
        seqlens = torch.tensor([5, 2], dtype=torch.int32, device=device)
        k_new, v_new, q1 = rand(2, 1, 2, head_dim), rand(2, 1, 2, head_dim), rand(2, 1, 4, head_dim)
        out = backend.attend_paged(q1, k_new, v_new, k_pages.clone(), v_pages.clone(), table, seqlens, **opts)
        expect = ref.attend_paged(q1, k_new, v_new, k_pages, v_pages, table, seqlens, **opts)
        failure = _check("attend_paged", out, expect, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return failure
    except Exception as error:  # any failure of the backend is a reason to skip it, never a crash
        return f"probe failed: {_first_line(error)}"
