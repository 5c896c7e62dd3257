"""Token embedding. Kept in system memory as upstream does: it is a lookup, not a matmul."""

from __future__ import annotations

import torch

from .module import ExLlamaV2Module

EMBEDDING_INDEX = 1_000_000_000   # ids at or above this index refer to supplied embeddings (upstream)


class ExLlamaV2Embedding(ExLlamaV2Module):
    name = "Embedding"

    def load(self) -> None:
        cfg = self.model.config
        w = self.load_tensor(f"{self.key}.weight", (cfg.vocab_size, cfg.hidden_size))
        # kept at 16 bits even when the model computes in fp32 on the CPU: rows are cast on lookup
        self.weight = w.to(self.device, torch.float16 if w.dtype == torch.float32 else w.dtype)

    def unload(self) -> None:
        self.weight = None

    def weight_footprint(self) -> int:
        return 0   # lives in system memory, never on a GPU

    def forward(self, input_ids: torch.Tensor, indexed_embeddings: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        vocab = self.weight.shape[0]
        ids = input_ids.to(self.weight.device)
        if ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
            if indexed_embeddings is None or int(ids.max()) < EMBEDDING_INDEX:
                raise ValueError(
                    f"token id {int(ids.max())} is outside the vocabulary (size {vocab}); check the tokenizer "
                    f"matches the model"
                )
        dtype = self.model.dtype
        if indexed_embeddings is not None and ids.numel() and int(ids.max()) >= EMBEDDING_INDEX:
            extra = ids >= EMBEDDING_INDEX
            x = self.weight[ids.masked_fill(extra, 0)].to(dtype)
            x[extra] = indexed_embeddings.to(x.device, dtype).view(-1, x.shape[-1])[ids[extra] - EMBEDDING_INDEX]
        else:
            x = self.weight[ids].to(dtype)
        if self.model.config.arch.embed_scale_sqrt_hidden:
            # the normaliser is rounded to the activation dtype, as the reference implementation does
            x = x * torch.tensor(self.model.config.hidden_size**0.5, dtype=x.dtype)
        return x
