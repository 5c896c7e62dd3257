"""The one attention bias class of xformers the backend uses, with its documented meaning."""

import torch


class LowerTriangularFromBottomRightMask:
    """Causal mask aligned bottom-right: query i (of M) sees key j (of N) iff j <= i + N - M."""

    def materialize(self, shape, dtype=torch.float32, device="cpu"):
        m, n = shape[-2:]
        i = torch.arange(m, device=device).view(-1, 1)
        j = torch.arange(n, device=device).view(1, -1)
        bias = torch.zeros(m, n, dtype=dtype, device=device).masked_fill(j > i + n - m, float("-inf"))
        return bias.expand(shape)
