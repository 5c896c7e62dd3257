"""The three libraries bench_cpu.py times, behind one small interface, and the timing loop they share.

A runner holds one loaded model. `start(batch)` makes an empty KV cache for `batch` sequences; `prefill(ids)` runs
the prompt (batch x prompt_len token ids) through it and returns each sequence's greedy next token; `step(tokens)`
decodes one token per sequence against the cache and returns the next ones. Each library batches its own way: our
model.forward over a batch cache, transformers' forward over its dynamic cache, llama.cpp's llama_decode over
one sequence id per row. Greedy argmax is part of every step on every side, in the library's own array type.

Each runner also says what a decode step reads besides activations: `weight_bytes` (every weight but the
embedding table, in the form the library keeps it) and `kv_bytes_per_position` (K and V of one position of one
sequence, all layers), for the roofline in the report.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return "git " + (out.stdout.strip() or "unknown")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def safetensors_weight_bytes(model_dir: Path) -> int:
    """Bytes of the checkpoint's tensors read per decoded token: everything but the embedding table."""
    from safetensors import safe_open

    size = {"F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I16": 2, "I64": 8, "U8": 1, "I8": 1}
    total = 0
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for name in f.keys():
            if "embed_tokens" not in name:
                n = 1
                for d in f.get_slice(name).get_shape():
                    n *= d
                total += n * size.get(f.get_slice(name).get_dtype(), 4)
    return total


class Runner(Protocol):
    library: str
    version: str
    dtype: str
    attention: str
    weight_bytes: int
    kv_bytes_per_position: int

    def start(self, batch: int) -> None: ...
    def prefill(self, ids: "torch.Tensor") -> Any: ...
    def step(self, tokens: Any) -> Any: ...
    def tolist(self, tokens: Any) -> list[int]: ...


def _kv_bytes(cfg: dict, itemsize: int) -> int:
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * itemsize


class OursRunner:
    """This package: ExLlamaV2.forward over an ExLlamaV2Cache of `batch` rows, as its base generator batches."""

    library = "exllamav2"

    def __init__(self, model_dir: Path, max_len: int, max_batch: int, cpu_kernels: bool = True) -> None:
        import exllamav2
        from exllamav2 import ExLlamaV2, ExLlamaV2Config
        from exllamav2.quant import QuantWeight

        QuantWeight.use_cpu_kernels = cpu_kernels
        config = ExLlamaV2Config(str(model_dir))
        config.max_seq_len = max_len
        # one prefill chunk per forward for every batch size, as the other libraries take the whole prompt
        config.max_input_len = max_len
        config.max_batch_size = max_batch
        config.max_attention_size = max_len**2
        self.model = ExLlamaV2(config)
        self.model.load()
        self.max_len = max_len
        self.cache = None
        # the code snapshot bench_cpu.py runs (BENCH_CPU_CODE), or this checkout's commit
        self.version = f"exllamav2 {exllamav2.__version__} ({os.environ.get('BENCH_CPU_CODE') or _git_commit()})"
        self.dtype = str(self.model.dtype).removeprefix("torch.")
        self.attention = ", ".join(str(p.backend) for p in self.model.attn_plan.devices)
        self.weight_bytes = safetensors_weight_bytes(model_dir)
        self.hf_config = json.loads((model_dir / "config.json").read_text())
        self.kv_bytes_per_position = _kv_bytes(self.hf_config, self.model.dtype.itemsize)

    def start(self, batch: int) -> None:
        from exllamav2 import ExLlamaV2Cache

        self.cache = None                   # free the previous batch's cache before making the next
        self.cache = ExLlamaV2Cache(self.model, batch_size=batch, max_seq_len=self.max_len)
        # the cache's own element size: it need not be the activations' dtype
        keys = getattr(self.cache, "key_states", None)
        itemsize = keys[0].element_size() if keys and keys[0] is not None else self.model.dtype.itemsize
        self.kv_bytes_per_position = _kv_bytes(self.hf_config, itemsize)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self.cache.current_seq_len = 0
        return self.model.forward(ids, self.cache, last_id_only=True)[:, -1].argmax(-1, keepdim=True)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.forward(tokens, self.cache)[:, -1].argmax(-1, keepdim=True)

    def tolist(self, tokens: torch.Tensor) -> list[int]:
        return tokens[:, 0].tolist()


class TransformersRunner:
    """transformers' LlamaForCausalLM in one dtype and attention implementation, with its dynamic cache."""

    library = "transformers"

    def __init__(self, model_dir: Path, dtype: str, attention: str) -> None:
        import torch
        import transformers
        from transformers import LlamaForCausalLM

        self.model = LlamaForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                      attn_implementation=attention)
        self.model.eval()
        self.past = None
        self.version = f"transformers {transformers.__version__}"
        self.dtype = dtype
        self.attention = self.model.config._attn_implementation
        self.weight_bytes = sum(p.nbytes for n, p in self.model.named_parameters() if "embed_tokens" not in n)
        self.kv_bytes_per_position = _kv_bytes(self.model.config.to_dict(), self.model.dtype.itemsize)

    def start(self, batch: int) -> None:
        self.past = None

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        self.past = out.cache
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=tokens, cache=self.past, use_cache=True, logits_to_keep=1)
        self.past = out.cache
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def tolist(self, tokens: torch.Tensor) -> list[int]:
        return tokens[:, 0].tolist()


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python's low-level binding: one context of `batch` sequences (its default
    non-unified KV cache, F16 K and V, flash attention on auto), prompts and steps as one llama_batch each."""

    library = "llama.cpp"

    def __init__(self, path: Path, threads: int, max_len: int, prompt_len: int) -> None:
        import llama_cpp as lc

        lc.llama_backend_init()
        self.lc = lc
        self.model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.threads, self.max_len, self.prompt_len = threads, max_len, prompt_len
        self.ctx, self.batch, self.pos = None, None, 0
        self.version = f"llama-cpp-python {lc.__version__}"
        self.dtype = path.stem.removeprefix("model-")
        self.attention = "flash_attn auto"
        self.system_info = lc.llama_print_system_info().decode(errors="replace").strip()
        from gguf_export import weight_bytes

        self.weight_bytes = weight_bytes(path)
        head_dim = lc.llama_model_n_embd(self.model) // lc.llama_model_n_head(self.model)
        self.kv_bytes_per_position = 2 * lc.llama_model_n_layer(self.model) * lc.llama_model_n_head_kv(self.model) \
            * head_dim * 2                                 # F16 K and V: llama.cpp's default cache type

    def start(self, batch: int) -> None:
        lc = self.lc
        if self.ctx is not None:
            lc.llama_batch_free(self.batch)
            lc.llama_free(self.ctx)
        params = lc.llama_context_default_params()
        params.n_ctx = batch * self.max_len                # each sequence gets max_len cells
        params.n_batch = batch * self.prompt_len           # the whole batched prompt in one llama_decode
        params.n_seq_max = batch
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context for batch {batch}")
        self.batch = lc.llama_batch_init(batch * self.prompt_len, 0, 1)

    def _decode(self, rows: list[list[int]], pos0: int) -> list[int]:
        import numpy as np

        b, i = self.batch, 0
        for seq, row in enumerate(rows):
            for j, token in enumerate(row):
                b.token[i], b.pos[i], b.n_seq_id[i] = token, pos0 + j, 1
                b.seq_id[i][0] = seq
                b.logits[i] = j == len(row) - 1        # logits for each sequence's last token only
                i += 1
        b.n_tokens = i
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        logits = np.ctypeslib.as_array(self.lc.llama_get_logits(self.ctx), shape=(len(rows), self.n_vocab))
        return logits.argmax(-1).tolist()

    def prefill(self, ids: torch.Tensor) -> list[int]:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        rows = ids.tolist()
        self.pos = len(rows[0])
        return self._decode(rows, 0)

    def step(self, tokens: list[int]) -> list[int]:
        out = self._decode([[t] for t in tokens], self.pos)
        self.pos += 1
        return out

    def tolist(self, tokens: list[int]) -> list[int]:
        return tokens


RUNNERS = {"exllamav2": OursRunner, "transformers": TransformersRunner, "llama.cpp": LlamaCppRunner}


def timed_batch(runner: Runner, prompt: torch.Tensor, decode_len: int, repeats: int) -> dict:
    """Median prefill and decode time of `repeats` runs at the prompt's batch size; each run is a prefill into an
    empty cache followed by `decode_len` greedy steps."""
    batch, prompt_len = prompt.shape[0], prompt.shape[1]
    runner.start(batch)
    token = runner.prefill(prompt[:, :16])              # warm-up: first-call allocations and lazy repacking
    runner.step(token)
    prefill_s, decode_s, first = [], [], None
    for _ in range(repeats):
        t = time.perf_counter()
        token = runner.prefill(prompt)
        prefill_s.append(time.perf_counter() - t)
        tokens = [runner.tolist(token)[0]]
        t = time.perf_counter()
        for _ in range(decode_len):
            token = runner.step(token)
            tokens.append(runner.tolist(token)[0])
        decode_s.append(time.perf_counter() - t)
        first = first or tokens[:8]
    return {
        "prefill_tokens_per_s": batch * prompt_len / statistics.median(prefill_s),
        "decode_tokens_per_s": batch * decode_len / statistics.median(decode_s),
        "first_greedy_tokens": first,                  # sequence 0, the same prompt at every batch size
    }
