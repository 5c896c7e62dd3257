"""Tensor parallelism: not implemented in this fork.

Upstream's entry points (`ExLlamaV2.load_tp`, `load_tp_gen`, `ExLlamaV2Cache_TP`) exist so that clients
importing them keep working; using any of them raises the error below, which names the alternative.
"""

from __future__ import annotations

TENSOR_PARALLEL_MISSING = (
    "tensor parallelism is not implemented in this fork; load the model split by layers instead, with "
    "model.load(gpu_split=[GB per GPU]) or model.load_autosplit(cache), and a regular cache class "
    "(ExLlamaV2Cache, ExLlamaV2Cache_Q4/_Q6/_Q8)"
)


def tensor_parallel_missing(what: str) -> NotImplementedError:
    """The error every tensor-parallel entry point raises, naming which one was used."""
    return NotImplementedError(f"{what}: {TENSOR_PARALLEL_MISSING}")
