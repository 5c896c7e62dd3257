"""Token embedding. Kept in system memory as upstream does: it is a lookup, not a matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .module import ExLlamaV2Module, TensorShapeError
from ..errors import InputError

EMBEDDING_INDEX = 1_000_000_000   # ids at or above this index refer to supplied embeddings (upstream)


class ExLlamaV2Embedding(ExLlamaV2Module):
    name = "Embedding"

    def __init__(self, model, key: str, pos_key: str | None = None) -> None:
        super().__init__(model, key)
        self.pos_key = pos_key        # learned position embeddings (GPT-2, GPTBigCode)
        self.weight = self.pos_weight = None

    def checkpoint_keys(self) -> dict[str, tuple[str, ...]]:
        return {k: ("weight",) for k in (self.key, self.pos_key) if k}

    def load(self) -> None:
        cfg = self.model.config
        self.weight = _half(self.load_tensor(f"{self.key}.weight", (cfg.vocab_size, cfg.hidden_size)), self.device)
        if self.pos_key:
            w = self.load_tensor(f"{self.pos_key}.weight")
            if w.dim() != 2 or w.shape[1] != cfg.hidden_size:
                raise TensorShapeError(f"tensor '{self.pos_key}.weight' has shape {tuple(w.shape)}, but config.json "
                                       f"implies (positions, {cfg.hidden_size}): config.json and the weights disagree")
            self.pos_weight = _half(w, self.device)

    def unload(self) -> None:
        self.weight = self.pos_weight = None

    def weight_footprint(self) -> int:
        return 0   # lives in system memory, never on a GPU

    def forward(self, input_ids: torch.Tensor, indexed_embeddings: torch.Tensor | None = None, attn_params=None,
                **kwargs) -> torch.Tensor:
        ids = input_ids.to(self.weight.device)
        dtype = self.model.dtype
        extra = ids >= EMBEDDING_INDEX if indexed_embeddings is not None else None
        plain = ids if extra is None else ids.masked_fill(extra, 0)
        x = self._lookup(plain).to(dtype)
        scale = self.model.config.embed_scale
        if scale != 1.0:
            # Gemma's sqrt(hidden), Granite's embedding_multiplier: rounded to the activation dtype, as the
            # reference implementations do
            x = x * torch.tensor(scale, dtype=dtype)
        if extra is not None and bool(extra.any()):
            # supplied embeddings (image features) go in as they are: transformers puts them in place of the
            # scaled token embeddings, unscaled
            x[extra] = indexed_embeddings.to(x.device, dtype).view(-1, x.shape[-1])[ids[extra] - EMBEDDING_INDEX]
        if self.pos_weight is not None:
            positions = attn_params.positions_on(self.pos_weight.device)
            if int(positions.max()) >= self.pos_weight.shape[0]:
                raise InputError(f"position {int(positions.max())} is past the {self.pos_weight.shape[0]} learned "
                                 f"positions of this model (max_position_embeddings)")
            x = x + self.pos_weight[positions].to(x.device, dtype)
        return x

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The ids' rows; an id outside the vocabulary is refused, naming it (the lookup checks the range itself:
        a decode step pays no separate min/max)."""
        try:
            return F.embedding(ids, self.weight)
        except IndexError:
            vocab = self.weight.shape[0]
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise InputError(f"token id {bad} is outside the vocabulary (size {vocab}); check the tokenizer matches "
                             f"the model") from None


def _half(w: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Kept at 16 bits even when the model computes in fp32 on the CPU: rows are cast on lookup."""
    return w.to(device, torch.float16 if w.dtype == torch.float32 else w.dtype)
