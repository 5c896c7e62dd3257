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
        dtype = self.model.dtype
        extra = ids >= EMBEDDING_INDEX if indexed_embeddings is not None else None
        plain = ids if extra is None else ids.masked_fill(extra, 0)
        if plain.numel() and (int(plain.min()) < 0 or int(plain.max()) >= vocab):
            bad = int(plain.min()) if int(plain.min()) < 0 else int(plain.max())
            raise ValueError(
                f"token id {bad} is outside the vocabulary (size {vocab}); check the tokenizer matches the model"
            )
        x = self.weight[plain].to(dtype)
        if extra is not None and bool(extra.any()):
            x[extra] = indexed_embeddings.to(x.device, dtype).view(-1, x.shape[-1])[ids[extra] - EMBEDDING_INDEX]
        # Gemma's sqrt(hidden), Granite's embedding_multiplier: rounded to the activation dtype, as the
        # reference implementations do
        return x * torch.tensor(self.model.config.embed_scale, dtype=x.dtype)
