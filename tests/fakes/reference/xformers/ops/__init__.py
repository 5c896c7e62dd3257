from .fmha import memory_efficient_attention  # noqa: F401
