"""The model kit: one module per part (embedding, norms, RoPE, linear, attention layer, MLP kinds, decoder
blocks, head) and `ExLlamaV2` (`model.py`), which builds them from the config's architecture row, loads
them and runs the forward pass."""

from .model import ExLlamaV2

__all__ = ["ExLlamaV2"]
