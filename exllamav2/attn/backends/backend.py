"""The one interface every attention backend implements.

Shapes (B batch, Hq query heads, Hkv key/value heads, D head dim):
    q (B, q_len, Hq, D), k and v (B, k_len, Hkv, D)  ->  out (B, q_len, Hq, D)
GQA (Hq a multiple of Hkv) is handled by the backend. Masking follows `AttnMetadata`.

Paged attention (the dynamic generator's batching) stores keys and values in pages of
``page_size`` tokens: k_pages and v_pages are (num_pages, page_size, Hkv, D), ``block_table``
(B, pages_per_seq) int32 lists each sequence's pages in order, ``cache_seqlens`` (B,) int32 is the
number of tokens each sequence already holds. `attend_paged` appends the new keys/values and
attends over the whole sequence. The default here gathers pages into a dense tensor, which lets
every backend batch; flash-attn overrides it with its native block-table kernel. Where the caller's ops
table holds exllamav2_ext's paged-attention kernel (`kernel`), the default runs it instead for decode steps
it fits (q_len <= PAGED_KERNEL_MAX_Q_LEN, float16 pages it can write in place), reading the pages there.
Likewise `decode_kernel`, the CPU's decode attention from the ops table (causal attention of the keys' last
positions: decode steps, and prefills whose queries end each row's keys): the sdpa and matmul backends run it for
the calls it computes exactly (`run_decode_kernel`), the GPU backends never get one; and `paged_decode_kernel`, its
paged form, which `attend_paged` runs for the decode steps it computes exactly (`run_paged_decode_kernel`), reading
the pages in place instead of gathering them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ClassVar

import torch

from .metadata import AttnMetadata, paged_metadata

if TYPE_CHECKING:
    from ..devices import DeviceInfo
    from ..installed import InstalledBackends
    from ..selector import ModelNeeds


# what exllamav2_ext's paged_attention takes (cuda/paged_attn.h); other calls gather pages
PAGED_KERNEL_MAX_Q_LEN = 8
PAGED_KERNEL_MAX_HEAD_DIM = 256


def paged_kernel_supports(head_dim: int) -> bool:
    return head_dim % 8 == 0 and head_dim <= PAGED_KERNEL_MAX_HEAD_DIM


def paged_kernel_fits(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor) -> bool:
    """Whether exllamav2_ext's paged-attention kernel takes this call: at most PAGED_KERNEL_MAX_Q_LEN new
    tokens, a supported head dim, float16 pages it can write in place."""
    return (q.shape[1] <= PAGED_KERNEL_MAX_Q_LEN and paged_kernel_supports(q.shape[-1]) and q.dtype == torch.float16
            and k_pages.dtype == torch.float16 and k_pages.is_contiguous() and v_pages.is_contiguous())


class AttentionBackend:
    name: ClassVar[str] = "base"
    # whether `attend` runs the CPU's decode kernel for the calls it computes exactly (run_decode_kernel): the
    # model's fused decode blocks (model/decode_blocks.py) stand in for such a backend only
    runs_decode_kernel: ClassVar[bool] = False

    def __init__(self, device: torch.device | str = "cpu", **options) -> None:
        self.device = torch.device(device)
        self.options = options

    @classmethod
    def validate(cls, device: "DeviceInfo", needs: "ModelNeeds", installed: "InstalledBackends") -> list[str]:
        """Why this backend cannot serve `needs` on `device`; empty when it can. Stateless, never raises."""
        return []

    @classmethod
    def paged_mode(cls, installed: "InstalledBackends") -> str:
        """How `attend_paged` runs: 'gather' (the default below) or the name of a native kernel. The
        resolve step relabels 'gather' as 'kernel' where exllamav2_ext's paged kernel takes decode steps."""
        return "gather"

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttnMetadata,
        *,
        scale: float,
        window: int = 0,
        softcap: float = 0.0,
        chunk: int = 0,
        decode_kernel: Callable | None = None,
    ) -> torch.Tensor:
        """`chunk`: chunked local attention (metadata.py's rule), 0 for none; a backend whose `validate` refuses
        it (ModelNeeds.attention_chunk) raises `refuse_chunk` instead of ignoring it. `decode_kernel`: the
        device's decode-attention kernel (DeviceOps.decode_attention) or None; see `run_decode_kernel`."""
        raise NotImplementedError

    def attend_paged(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_table: torch.Tensor,
        cache_seqlens: torch.Tensor,
        *,
        scale: float,
        window: int = 0,
        softcap: float = 0.0,
        chunk: int = 0,
        meta: AttnMetadata | None = None,
        kernel: Callable | None = None,
        decode_kernel: Callable | None = None,
        paged_decode_kernel: Callable | None = None,
    ) -> torch.Tensor:
        """Append k_new/v_new to the pages at cache_seqlens and attend over each sequence. `meta` is the paged
        batch's metadata (PagedParams.paged_metadata, built once per forward); without it, it is built here,
        which costs a host sync for the longest sequence. `kernel` is the device's fused paged-attention kernel
        from its ops table, or None; it knows no chunks, so chunked layers gather. `paged_decode_kernel`: the
        CPU's (see `run_paged_decode_kernel`). `decode_kernel` goes to `attend` with the gathered keys."""
        if kernel is not None and not chunk and paged_kernel_fits(q, k_pages, v_pages):
            return kernel(
                q.contiguous(), k_new.contiguous(), v_new.contiguous(), k_pages, v_pages, block_table,
                cache_seqlens, scale, window, softcap,
            )
        out = run_paged_decode_kernel(paged_decode_kernel, q, k_new, v_new, k_pages, v_pages, block_table,
                                      cache_seqlens, scale, window, softcap, chunk)
        if out is not None:
            return out
        write_pages(k_pages, v_pages, k_new, v_new, block_table, cache_seqlens)
        meta = meta or paged_metadata(cache_seqlens, q.shape[1])
        k, v = gather_pages(k_pages, v_pages, block_table, meta.k_len)
        return self.attend(q, k, v, meta, scale=scale, window=window, softcap=softcap, chunk=chunk,
                           decode_kernel=decode_kernel)


def _decode_lengths(meta: AttnMetadata) -> tuple[bool, torch.Tensor | None]:
    """Whether the decode kernel computes `meta`'s visibility exactly, and the keys each row's last query sees
    (None: all). The kernel's queries are the last positions of the keys they see, each query one more than the one
    before. Query i of row b sits at position past_len[b] + i and may see every key j <= past_len[b] + i and j <
    key_lengths[b]: with one query a prefix of its keys whatever key_lengths cuts off; with several, only where
    key_lengths[b] ends at the last query (a uniform prefill, or a paged batch's: as the kernel counts). Key masks
    (left padding) and segments are not prefixes."""
    if not meta.causal or meta.segments is not None or meta.key_mask is not None:
        return False, None
    if meta.is_uniform:
        return True, None
    past = meta.past_len
    ends = past.long().cpu() + meta.q_len if isinstance(past, torch.Tensor) else \
        torch.full((meta.batch_size,), past + meta.q_len)
    if meta.key_lengths is not None:
        cut = meta.key_lengths.long().cpu()
        if meta.q_len > 1 and not torch.equal(cut, ends):
            return False, None
        ends = torch.minimum(ends, cut)
    if meta.q_len > 1 and int(ends.max()) > meta.k_len:
        return False, None
    return True, ends.clamp(0, meta.k_len).contiguous()


def run_decode_kernel(kernel: Callable | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      meta: AttnMetadata, scale: float, window: int, softcap: float, chunk: int) -> torch.Tensor | None:
    """The CPU decode-attention kernel's output where it computes this call exactly (`_decode_lengths`: one query
    position seeing a prefix of its keys, or a causal prefill whose queries end each row's keys, in one call, 2-3x
    faster than torch's CPU flash attention at 512 positions; no window, softcap or chunks, float32 or bfloat16,
    head dim a multiple of 16, keys and values with contiguous heads), else None: the backend's own path runs."""
    if kernel is None or window or softcap or chunk or q.shape[-1] % 16 or q.dtype not in _DECODE_KERNEL_DTYPES:
        return None
    if k.dtype != q.dtype or v.dtype != q.dtype or not (_heads_contiguous(k) and _heads_contiguous(v)):
        return None
    fits, lengths = meta.derived("decode_kernel_lengths", lambda: _decode_lengths(meta))
    return kernel(q, k, v, scale, lengths) if fits else None


_DECODE_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
# kKeyBlock (exllamav2_ext/cpu/qkernel.h): the CPU decode attention's key blocks, which must not cross a page
CPU_KEY_BLOCK = 32


def run_paged_decode_kernel(kernel: Callable | None, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                            k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                            cache_seqlens: torch.Tensor, scale: float, window: int, softcap: float,
                            chunk: int) -> torch.Tensor | None:
    """The CPU paged decode kernel's output (k_new/v_new written into the pages, each row's query over its
    cache_seqlens[b] + 1 keys read from the pages in place) where it computes this call exactly: one new token
    per row, causal, no window, softcap or chunks, float32 or bfloat16 throughout, head dim a multiple of 16,
    contiguous pages of a multiple of 32 positions, int32 tables; else None (the backend writes and gathers)."""
    if kernel is None or q.shape[1] != 1 or window or softcap or chunk or q.shape[-1] % 16:
        return None
    if q.dtype not in _DECODE_KERNEL_DTYPES or any(t.dtype != q.dtype for t in (k_new, v_new, k_pages, v_pages)):
        return None
    if k_pages.shape[1] % CPU_KEY_BLOCK or not (k_pages.is_contiguous() and v_pages.is_contiguous()):
        return None
    if block_table.dtype != torch.int32 or cache_seqlens.dtype != torch.int32:
        return None
    return kernel(q, k_new, v_new, k_pages, v_pages, block_table.contiguous(), cache_seqlens.contiguous(), scale)


def _heads_contiguous(t: torch.Tensor) -> bool:
    return t.stride(3) == 1 and t.stride(2) == t.shape[3]



def _slots(block_table: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """Flat slot index (page * page_size + offset) of each absolute position, (B, n)."""
    pages = torch.gather(block_table.long(), 1, positions // page_size)
    return pages * page_size + positions % page_size


def write_pages(
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
) -> None:
    """Store k_new/v_new (B, n, Hkv, D) at positions cache_seqlens[b] + i of each sequence."""
    bsz, n = k_new.shape[:2]
    page_size = k_pages.shape[1]
    pos = cache_seqlens.long().view(-1, 1).to(k_new.device) + torch.arange(n, device=k_new.device)
    slots = _slots(block_table.to(k_new.device), pos, page_size).view(-1)
    k_pages.view(-1, *k_pages.shape[2:])[slots] = k_new.reshape(bsz * n, *k_new.shape[2:])
    v_pages.view(-1, *v_pages.shape[2:])[slots] = v_new.reshape(bsz * n, *v_new.shape[2:])


def gather_pages(
    k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (B, length, Hkv, D) keys and values of each sequence's first `length` positions."""
    page_size = k_pages.shape[1]
    pos = torch.arange(length, device=k_pages.device).unsqueeze(0).expand(block_table.shape[0], -1)
    slots = _slots(block_table.to(k_pages.device), pos, page_size)
    k = k_pages.view(-1, *k_pages.shape[2:])[slots]
    v = v_pages.view(-1, *v_pages.shape[2:])[slots]
    return k, v


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, L, Hkv, D) -> (B, L, Hkv * groups, D), each kv head repeated for its query heads."""
    if groups == 1:
        return x
    return x.repeat_interleave(groups, dim=2)


def fold_query_groups(q: torch.Tensor, groups: int) -> torch.Tensor:
    """One query position (B, 1, Hkv·G, D) -> (B, G, Hkv, D): the G query heads of each kv head as G query rows.
    They share that kv head's keys and, at one position, its mask, so attention over the keys as stored gives
    the same result as over `repeat_kv` copies, without copying the whole cache G times per layer per token."""
    bsz, _, heads, dim = q.shape
    return q.reshape(bsz, heads // groups, groups, dim).transpose(1, 2)


def unfold_query_groups(out: torch.Tensor) -> torch.Tensor:
    """Inverse of `fold_query_groups`: (B, G, Hkv, D) -> (B, 1, Hkv·G, D)."""
    bsz, groups, kv_heads, dim = out.shape
    return out.transpose(1, 2).reshape(bsz, 1, kv_heads * groups, dim)


def refuse_softcap(backend: str) -> ValueError:
    """The error for a softcap reaching a backend that cannot apply it (the selector rejects such plans)."""
    return ValueError(
        f"{backend} cannot apply logit softcapping; plan attention with the model's softcap "
        f"(resolve_attention) so that a backend that can is chosen"
    )


def refuse_chunk(backend: str) -> ValueError:
    """The error for chunked local attention reaching a backend that cannot mask it (the selector rejects such
    plans)."""
    return ValueError(
        f"{backend} cannot apply chunked local attention; plan attention with the model's attention_chunk "
        f"(resolve_attention) so that a backend that can is chosen"
    )


CHUNK_REFUSAL = "cannot mask chunked local attention (attention_chunk_size)"


def nvidia_gpu_reasons(device) -> list[str]:
    """Why a backend built on NVIDIA CUDA kernels cannot run on `device` at all (a CPU, a ROCm GPU); [] otherwise."""
    if not device.is_cuda:
        return ["needs a CUDA GPU"]
    if device.rocm:
        return ["not supported on ROCm devices"]
    return []
