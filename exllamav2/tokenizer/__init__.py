from .base import ExLlamaV2TokenizerBase
from .hf import ExLlamaV2TokenizerHF
from .tokenizer import ExLlamaV2Tokenizer

__all__ = ["ExLlamaV2Tokenizer", "ExLlamaV2TokenizerBase", "ExLlamaV2TokenizerHF", "ExLlamaV2TokenizerSPM"]


def __getattr__(name: str):
    # sentencepiece is optional: import its backend only when asked for
    if name == "ExLlamaV2TokenizerSPM":
        from .spm import ExLlamaV2TokenizerSPM

        return ExLlamaV2TokenizerSPM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
