"""ExLlamaV2: builds the module list from the config and attention plan, places it, loads it, runs it.

Data flows one way: config -> attention plan (made once, before any module exists) -> modules ->
device placement -> load -> forward. Modules are upstream's: embedding, then attention and MLP per
layer, final norm, head.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Generator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .accounting import check_tensors_accounted
from ..attn import resolve_attention
from .attention import ExLlamaV2Attention
from .attn_params import PagedParams, Params
from .decode_blocks import DecodeStack, decode_stack
from ..cache.base import ExLlamaV2CacheBase
from ..config import ExLlamaV2Config
from .device import ExLlamaV2DeviceContext
from .embedding import ExLlamaV2Embedding
from .forward_args import check_forward_kwargs
from .image_attention import attention_spans, check_input_end, chunk_end, image_mask
from ..inputs import check_input_ids
from .lora import as_lora_list
from .linear import ExLlamaV2Linear
from .moe import make_mlp
from .module import ExLlamaV2Module, checkpoint_keys_of
from .multicache import forward_per_row_caches
from .norm import make_norm
from ..ops import DeviceOps, activation_dtype, build_ops
from .parallel import ExLlamaV2ParallelDecoder
from .rope import RopeTables
from ..tensor_p import tensor_parallel_missing
from ..errors import InputError

log = logging.getLogger(__name__)

_GB = 1024**3
_PAD_LOGIT = -65504.0   # logits of the vocabulary padding, as upstream
_AUTOSPLIT_RESERVE = 96 * 1024**2   # bytes left free on each GPU by load_autosplit unless told otherwise


def attention_of(module: ExLlamaV2Module) -> ExLlamaV2Attention | None:
    """The attention layer a module of the model's list is or holds (a parallel decoder holds one)."""
    if isinstance(module, ExLlamaV2Attention):
        return module
    return module.attn if isinstance(module, ExLlamaV2ParallelDecoder) else None


def _visible_devices() -> list[torch.device]:
    if torch.cuda.is_available():
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [torch.device("cpu")]


def autosplit_budgets(free: list[int], reserve_vram: list[int] | int | None) -> list[int]:
    """Bytes load_autosplit may fill on each GPU: its free memory less the reserve. `reserve_vram` is bytes for
    every GPU (an int), per GPU (a list), or None (_AUTOSPLIT_RESERVE each). A list shorter than the GPUs leaves
    _AUTOSPLIT_RESERVE on the rest: clients pass one entry on multi-GPU machines (TabbyAPI's default
    autosplit_reserve is [96] MB), which upstream accepts because it reads an entry only on reaching its GPU."""
    if reserve_vram is None or isinstance(reserve_vram, int):
        reserve = [reserve_vram or _AUTOSPLIT_RESERVE] * len(free)
    else:
        reserve = list(reserve_vram)[: len(free)]
        reserve += [_AUTOSPLIT_RESERVE] * (len(free) - len(reserve))
    return [max(0, f - r) for f, r in zip(free, reserve)]


class ExLlamaV2:
    def __init__(self, config: ExLlamaV2Config, lazy_load: bool = False, archparams=None) -> None:
        if config.arch is None:
            raise ValueError("ExLlamaV2Config was not prepared: pass model_dir or call config.prepare()")
        self.config = config
        self.archparams = archparams or config.arch
        self.devices = _visible_devices()
        self.dtype = activation_dtype(self.devices[0], config.cpu_dtype)
        # Planned for every visible device so that bad flags fail before anything is built, but provisionally:
        # probing each GPU would give every visible GPU a CUDA context (hundreds of MB), even ones gpu_split
        # leaves out. Placement plans again, with probes, for the devices the model really uses.
        self.attn_plan = resolve_attention(config, self.devices, dtype=self.dtype, probe_gpus=False)
        self.modules: list[ExLlamaV2Module] = self._build()
        if config.index is not None:     # before any weight is read: refuse tensors the layout leaves unread
            check_tensors_accounted(config.index.keys(), checkpoint_keys_of(self.modules), config.architecture,
                                    config.index.files, config.arch.vision_prefixes)
        # by checkpoint key, as upstream: the layers and every linear and norm inside them
        self.modules_dict = {s.key: s for m in self.modules for s in (m, *getattr(m, "submodules", list)())}
        self.head_layer_idx = len(self.modules) - 1
        self.attention_layers = [a for m in self.modules if (a := attention_of(m))]   # by layer index
        self.last_kv_layer_idx = max(i for i, m in enumerate(self.modules) if attention_of(m))
        self.loaded = False
        self.decode_stack: DecodeStack | None = None     # the CPU's decoder in one call per decode step, where it can
        self.tp_context = None
        self.cache_map: dict[int, str] = {}      # layer index -> device of its attention (and cache), as upstream
        self.loras: weakref.WeakSet = weakref.WeakSet()   # adapters made for this model; see update_loras()
        self._rope: dict[tuple[torch.device, bool], RopeTables] = {}
        self._ops: dict[tuple[torch.device, torch.dtype], DeviceOps] = {}
        self._device_contexts: dict[int, ExLlamaV2DeviceContext] = {}

    def _build(self) -> list[ExLlamaV2Module]:
        cfg, keys = self.config, self.config.arch.keys
        mods: list[ExLlamaV2Module] = [ExLlamaV2Embedding(self, keys["embed"], keys.get("pos_embed"))]
        for i in range(cfg.num_hidden_layers):
            prefix = f"{keys['layers']}.{i}"
            if cfg.arch.parallel_block:
                mods.append(ExLlamaV2ParallelDecoder(self, prefix, i))
            else:
                mods += [ExLlamaV2Attention(self, prefix, i), make_mlp(self, prefix, i)]
        mods.append(make_norm(self, keys["norm"]))
        mods.append(ExLlamaV2Linear(self, keys["head"], cfg.hidden_size, cfg.vocab_size,
                                    alt_key=keys["embed"] if cfg.tie_word_embeddings else None))
        return mods

    # placement -----------------------------------------------------------------------------

    def _place(self, budgets: list[int] | None, cache_bytes_per_layer: int = 0, device_reserve: int = 0,
               head_reserve: int = 0) -> list[int] | None:
        """Assign devices (embedding on the CPU, the rest filling GPUs in order within their budgets),
        then plan attention for exactly the devices used, before any weight is read. Returns the bytes
        left of each budget (None without budgets)."""
        left = self._assign_devices(budgets, cache_bytes_per_layer, device_reserve, head_reserve)
        self.cache_map = {i: str(self.layer_device(i)) for i in range(self.config.num_hidden_layers)}
        self._device_contexts = {}
        used = sorted({m.device for m in self.modules[1:]}, key=str)
        self.attn_plan = resolve_attention(self.config, used, dtype=self.dtype)    # probes are cached per device
        return left

    def _assign_devices(self, budgets: list[int] | None, cache_bytes_per_layer: int, device_reserve: int = 0,
                        head_reserve: int = 0) -> list[int] | None:
        """Fill GPUs in order. Each module needs its weights, an attention layer also its cache; every GPU
        that holds modules keeps `device_reserve` free and the head's GPU `head_reserve` more (load_autosplit
        counts a forward's working memory this way; a manual gpu_split counts weights and cache only)."""
        self.modules[0].set_device(torch.device("cpu"))
        if self.devices[0].type == "cpu" or budgets is None:
            for m in self.modules[1:]:
                m.set_device(self.devices[0])
            return None if budgets is None else list(budgets)
        remaining = list(budgets)      # a GPU left without modules keeps its whole budget
        gpu, left = 0, budgets[0] - device_reserve
        for m in self.modules[1:]:
            need = m.weight_footprint() + (cache_bytes_per_layer if attention_of(m) else 0)
            need += head_reserve if m is self.modules[-1] else 0
            while need > left and gpu + 1 < len(budgets):
                gpu += 1
                left = budgets[gpu] - device_reserve
            if need > left:
                reserved = f" after keeping {device_reserve / _GB:.2f} GB for a forward's working memory" \
                    if device_reserve else ""
                raise RuntimeError(
                    f"model does not fit: module {m.key} needs {need / _GB:.2f} GB but only "
                    f"{max(0, left) / _GB:.2f} GB is left on cuda:{gpu}{reserved}; give a larger gpu_split, a "
                    f"shorter max_seq_len or max_input_len, or a smaller cache"
                )
            left -= need
            remaining[gpu] = left
            m.set_device(torch.device("cuda", gpu))
        return remaining

    def _forward_reserve(self, cache: ExLlamaV2CacheBase, last_id_only: bool) -> tuple[int, int]:
        """(bytes every GPU holding layers needs for one forward chunk, bytes the head's GPU needs besides).
        A chunk is max_input_len x max_batch_size tokens; inside a layer it keeps alive, in fp16, the residual,
        the normed input, the projections' inputs and outputs and the MLP's gate, up and activation; a quantized
        cache adds its full-precision working tensors. The head adds the chunk's logits, in fp16 and fp32
        (one row per sequence with last_id_only)."""
        cfg = self.config
        tokens = cfg.max_input_len * cfg.max_batch_size
        per_token = (4 * cfg.hidden_size + 2 * cfg.num_attention_heads * cfg.head_dim
                     + 2 * cfg.num_key_value_heads * cfg.head_dim + 3 * cfg.intermediate_size)
        activations = tokens * per_token * self.dtype.itemsize
        rows = cache.batch_size if last_id_only else tokens
        logits = rows * cfg.vocab_size * (self.dtype.itemsize + 4)
        return activations + cache.working_footprint(), logits

    def set_device_map(self, allocation: list[float], embed_cpu: bool = True) -> list[float]:
        """Assign every module a device within `allocation` (GB per GPU) without loading anything; returns
        the GB left unassigned per GPU. With embed_cpu=False the embedding joins the first layer's device."""
        left = self._place([int(a * _GB) for a in allocation])
        if not embed_cpu:
            emb, dev = self.modules[0], self.modules[1].device
            emb.set_device(dev)
            if dev.type == "cuda":
                left[dev.index] -= emb.tensor_bytes(f"{emb.key}.weight")
        return [b / _GB for b in left]

    def get_device_context(self, device_idx: int, scratch: bool = True) -> ExLlamaV2DeviceContext | None:
        """The context of GPU `device_idx` (RoPE tables, attention backend), prepared on first use;
        None for -1, the CPU, as upstream."""
        if device_idx == -1:
            return None
        if not any(d.type == "cuda" and d.index == device_idx for d in self.devices):
            raise ValueError(
                f"no CUDA device {device_idx} (this model runs on {', '.join(map(str, self.devices))}); "
                f"pass -1 for the CPU"
            )
        if device_idx not in self._device_contexts:
            self._device_contexts[device_idx] = ExLlamaV2DeviceContext(self, device_idx)
        ctx = self._device_contexts[device_idx]
        if not ctx.ready:
            ctx.prepare(scratch)
        return ctx

    def load(self, gpu_split: list[float] | None = None, lazy: bool = False, stats: bool = False,
             callback: Callable | None = None, callback_gen: Callable | None = None,
             progress: bool = False) -> None:
        for _ in self.load_gen(gpu_split, lazy, stats, callback, callback_gen, progress):
            pass

    def load_gen(self, gpu_split: list[float] | None = None, lazy: bool = False, stats: bool = False,
                 callback: Callable | None = None, callback_gen: Callable | None = None,
                 progress: bool = False) -> Generator:
        """Generator form of load(): yields what `callback_gen` yields. With lazy=True modules are only
        placed (for loading one by one); an empty gpu_split means None (GPU 0 only), as upstream."""
        if gpu_split and self.devices[0].type == "cpu":
            log.info("gpu_split given but no CUDA device is present: loading on the CPU")
        budgets = [int(g * _GB) for g in gpu_split] if gpu_split else None
        if budgets is None and self.devices[0].type == "cuda":
            budgets = [torch.cuda.mem_get_info(0)[0]]
        self._place(budgets)
        if lazy:
            return
        yield from self._load_modules(callback, callback_gen, progress)

    def load_tp(self, gpu_split: list[float] | None = None, callback: Callable | None = None,
                callback_gen: Callable | None = None, progress: bool = False, expect_cache_tokens: int = 0,
                expect_cache_base: type | None = None) -> None:
        raise tensor_parallel_missing("ExLlamaV2.load_tp")

    def load_tp_gen(self, gpu_split: list[float] | None = None, callback: Callable | None = None,
                    callback_gen: Callable | None = None, expect_cache_tokens: int = 0,
                    expect_cache_base: type | None = None) -> Generator:
        raise tensor_parallel_missing("ExLlamaV2.load_tp_gen")

    def load_autosplit(self, cache: ExLlamaV2CacheBase, reserve_vram: list[int] | int | None = None,
                       last_id_only: bool = False, callback: Callable | None = None,
                       callback_gen: Callable | None = None, progress: bool = False) -> None:
        for _ in self.load_autosplit_gen(cache, reserve_vram, last_id_only, callback, callback_gen, progress):
            pass

    def load_autosplit_gen(self, cache: ExLlamaV2CacheBase, reserve_vram: list[int] | int | None = None,
                           last_id_only: bool = False, callback: Callable | None = None,
                           callback_gen: Callable | None = None, progress: bool = False) -> Generator:
        if not cache.lazy:
            raise ValueError("load_autosplit needs a cache created with lazy=True, so it can be placed with the model")
        self.config.max_input_len = min(self.config.max_input_len, cache.max_seq_len)
        if self.devices[0].type == "cpu":
            log.info("autosplit: no CUDA device, loading the model and cache on the CPU")
            budgets = None
        else:
            budgets = autosplit_budgets([torch.cuda.mem_get_info(i)[0] for i in range(len(self.devices))], reserve_vram)
        self._place(budgets, cache.footprint_per_layer(), *self._forward_reserve(cache, last_id_only))
        cache.create_state_tensors()      # placed with the layers; allocated before the last progress report
        yield from self._load_modules(callback, callback_gen, progress)

    def _load_modules(self, callback, callback_gen, progress) -> Generator:
        total = len(self.modules)
        # the bar appears only when loading takes more than a moment (or when asked for)
        # leave=True: a bar that was shown ends at total/total with its own newline (a cleared bar left
        # the cursor on its line, and the next output was printed there)
        bar = tqdm(total=total, desc="Loading", unit="module", delay=0 if progress else 2.0,
                   disable=callback is not None or callback_gen is not None, leave=True)
        # Progress is reported as upstream does, and clients rely on: (i, total) before module i loads, then
        # (total, total) once all are loaded, so (0, total) comes first.
        try:
            for i, m in enumerate(self.modules):
                if callback is not None:
                    callback(i, total)
                if callback_gen is not None:
                    yield from callback_gen(i, total)
                m.load()
                bar.update(1)
        except BaseException:
            self.unload()
            raise
        finally:
            bar.close()
        self.update_loras()
        self.decode_stack = decode_stack(self)
        self.loaded = True
        log.info("loaded %s: %d layers on %s", self.config.architecture, self.config.num_hidden_layers,
                 ", ".join(sorted({str(m.device) for m in self.modules[1:]})))
        if callback is not None:
            callback(total, total)
        if callback_gen is not None:
            yield from callback_gen(total, total)

    def unload(self) -> None:
        for m in self.modules:
            m.unload()
        self._device_contexts = {}
        self.decode_stack = None
        self.loaded = False

    # queries -------------------------------------------------------------------------------

    def layer_device(self, layer_idx: int) -> torch.device:
        attn = self.attention_layers[layer_idx]
        return attn.device if attn.device is not None else self.devices[0]

    def get_cache_devices(self) -> list[torch.device]:
        return sorted({self.layer_device(i) for i in range(self.config.num_hidden_layers)}, key=str)

    def ops(self, device: torch.device, dtype: torch.dtype | None = None) -> DeviceOps:
        """Kernel or twin for each op on `device` (activations in `dtype`, the model's by default): chosen when
        the first module loads there, then kept."""
        key = (device, dtype or self.dtype)
        table = self._ops.get(key)
        if table is None:
            table = self._ops[key] = build_ops(*key)
            log.info("%s, %s activations: %s", device, str(table.dtype).removeprefix("torch."), table.describe())
        return table

    def rope_tables(self, device: torch.device, local: bool = False) -> RopeTables:
        """The RoPE tables on `device`: the model's, or with `local` the sliding layers' own (Gemma 3)."""
        if (device, local) not in self._rope:
            self._rope[(device, local)] = RopeTables(self.config, device, local)
        return self._rope[(device, local)]

    def update_loras(self) -> None:
        """Move every adapter made for this model onto the devices its layers occupy now (runs after each
        load; call it after moving layers by hand)."""
        for lora in list(self.loras):
            lora.update_devices()

    def is_quant(self) -> bool:
        return self.modules[-1].is_quant() or any(
            a.q_proj.is_quant() for a in self.attention_layers
        )

    # forward -------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: ExLlamaV2CacheBase | None = None,
                input_mask: torch.Tensor | None = None, preprocess_only: bool = False,
                last_id_only: bool = False, loras: list | None = None, return_last_state: bool = False,
                position_offsets: torch.Tensor | None = None, abort_event: threading.Event | None = None,
                cpu_logits: bool = False, **kwargs):
        check_forward_kwargs(self.forward, kwargs)      # an unknown keyword is an error, not ignored
        check_input_ids(input_ids)      # integer ids, (batch, length), at least one token: one clear error
        if not self.loaded:
            raise RuntimeError("model is not loaded: call model.load() (or load_autosplit) before forward()")
        loras = as_lora_list(loras, self)       # one adapter or a list, as upstream takes it
        if isinstance(cache, (list, tuple)):    # one cache per batch row (upstream's multi-cache form)
            return forward_per_row_caches(self, input_ids, cache, input_mask, preprocess_only, last_id_only, loras,
                                          return_last_state, position_offsets, abort_event, cpu_logits, **kwargs)
        attn_params = kwargs.pop("attn_params", None)
        mrope = self._check_mrope(kwargs.pop("mrope_positions", None), input_ids, cache, attn_params)
        is_image = self._image_mask(input_ids)
        if isinstance(attn_params, PagedParams):
            return self._forward_chunk(input_ids, cache, attn_params, preprocess_only, last_id_only,
                                       loras, return_last_state, cpu_logits, **kwargs)
        bsz, length = input_ids.shape
        if cache is None:
            params = Params(bsz, length, 0, input_mask, position_offsets, mrope)
            return self._forward_chunk(input_ids, None, params, preprocess_only, last_id_only,
                                       loras, return_last_state, cpu_logits, **kwargs)
        if bsz > cache.batch_size:
            raise InputError(f"batch of {bsz} sequences but the cache holds {cache.batch_size}; "
                             f"create the cache with batch_size={bsz}")
        cache.check_room(length)
        past0 = cache.current_seq_len
        if input_mask is not None and input_mask.shape[-1] == length and past0:
            input_mask = torch.cat((input_mask.new_ones(bsz, past0) if input_mask.dtype == torch.bool
                                    else input_mask.new_zeros(bsz, past0), input_mask), dim=1)
        chunk = max(1, self.config.max_input_len * self.config.max_batch_size // bsz)
        results, last_state = [], None
        start = end = 0
        while end < length:
            if abort_event is not None and abort_event.is_set():
                return None
            start, end = end, chunk_end(is_image, end, min(end + chunk, length), chunk)
            past = cache.current_seq_len
            mask = None if input_mask is None else input_mask[:, : past + end - start]
            params = Params(bsz, end - start, past, mask, position_offsets,
                            None if mrope is None else mrope[:, :, start:end])
            final = end == length
            r = self._forward_chunk(input_ids[:, start:end], cache, params,
                                    preprocess_only or (last_id_only and not final), last_id_only,
                                    loras, return_last_state, cpu_logits, **kwargs)
            cache.current_seq_len = past + end - start
            if return_last_state and r is not None:
                r, last_state = r
            if r is not None:
                results.append(r)
        if preprocess_only:
            return None
        logits = results[0] if len(results) == 1 else torch.cat(results, dim=1)
        return (logits, last_state) if return_last_state else logits

    def _image_mask(self, input_ids: torch.Tensor) -> list[bool] | None:
        """Where the input's images are, for a model whose image tokens attend bidirectionally (None for any
        other, and without images); such an input must not end inside an image."""
        if self.archparams.image_attention != "bidirectional":
            return None
        check_input_end(input_ids)
        return image_mask(input_ids)

    def _check_mrope(self, mrope: torch.Tensor | None, input_ids: torch.Tensor, cache, attn_params) -> torch.Tensor | None:
        """The forward's MRoPE positions (3, batch, length), checked; a paged batch carries its own in attn_params."""
        if mrope is None:
            return None
        if not self.config.mrope_section:
            raise InputError(f"mrope_positions were given, but {self.config.architecture} has no MRoPE "
                             f"(rope_scaling.mrope_section)")
        if isinstance(cache, (list, tuple)) or isinstance(attn_params, PagedParams):
            raise InputError("mrope_positions apply to a plain forward; a paged batch carries them in "
                             "PagedParams(mrope_positions=...), and per-row caches do not take them")
        if tuple(mrope.shape) != (3, *input_ids.shape):
            raise InputError(f"mrope_positions must be (3, batch, length) = (3, {input_ids.shape[0]}, "
                             f"{input_ids.shape[1]}), got {tuple(mrope.shape)}")
        return mrope.long().cpu()

    def _forward_chunk(self, input_ids, cache, params, preprocess_only, last_id_only, loras,
                       return_last_state, cpu_logits, **kwargs):
        if self.archparams.image_attention == "bidirectional":
            params.image_spans = attention_spans(image_mask(input_ids))
        x = self.modules[0].forward(input_ids, indexed_embeddings=kwargs.get("indexed_embeddings"), attn_params=params)
        first = 1
        stack = self.decode_stack
        if stack is not None and not preprocess_only and stack.takes(x, cache, params, loras):
            if not return_last_state and stack.gives_logits():     # the head in the same call
                return self._logits(stack.forward(x, cache, params, logits=True), cpu_logits)
            x = stack.forward(x, cache, params)
            first = len(self.modules) - 2       # the final norm
        for idx, m in enumerate(self.modules[first:-1], start=first):
            x = m.forward(x.to(m.device), cache=cache, attn_params=params, loras=loras)
            if preprocess_only and idx == self.last_kv_layer_idx:
                return None
        if last_id_only:
            x = x[:, -1:]
        head = self.modules[-1]
        logits = self._logits(head.forward(x.to(head.device), loras), cpu_logits)
        return (logits, x) if return_last_state else logits

    def _logits(self, out: torch.Tensor, cpu_logits: bool) -> torch.Tensor:
        """The head's output as the forward's float32 logits: scaled, soft-capped, padded to a multiple of 32."""
        logits = out.float()
        if self.config.logit_scale != 1.0:
            logits = logits * self.config.logit_scale
        if self.config.final_logit_softcapping:
            cap = float(self.config.final_logit_softcapping)
            logits = torch.tanh(logits / cap) * cap
        pad = -self.config.vocab_size % 32
        if pad:
            logits = F.pad(logits, (0, pad), value=_PAD_LOGIT)
        if cpu_logits:
            logits = logits.cpu()
        return logits
