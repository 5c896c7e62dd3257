"""Attention backends, one per module (flash-attn, xformers, SDPA, plain matmul), behind the interface in
`backend.py`; `metadata.py` describes a batch's sequences to them. Only these modules import a kernel
package (flash_attn, xformers), and only when a backend object is built."""
