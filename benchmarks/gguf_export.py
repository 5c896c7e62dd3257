"""GGUF copies of the CPU benchmark's FP16 Llama checkpoint, for the llama.cpp rows of bench_cpu.py.

The F16 file is written with the `gguf` package (llama.cpp's own gguf-py, on PyPI as `gguf`) the way llama.cpp's
`convert_hf_to_gguf.py` writes a Llama: tensors renamed by gguf's Llama name map, q/k rows permuted from the Hugging
Face rotary layout to llama.cpp's, 1-D tensors in F32, 2-D in F16. We do not call the converter itself: it insists on
a real tokenizer, and the benchmark's random checkpoint has none. Prompts are token ids, so the vocabulary here only
has to be well formed (a SentencePiece-type list: unk, bos, eos, the 256 byte tokens, then placeholders). The other
types are made from the F16 file by llama.cpp's own quantizer (`llama_model_quantize` in llama-cpp-python).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import gguf
    import numpy as np

log = logging.getLogger("bench_cpu.gguf")

# llama.cpp file types (enum llama_ftype) of the benchmark's llama.cpp rows
FTYPES = {"F16": 1, "Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}


def unavailable_reason() -> str | None:
    """None when GGUF rows can run, else why not (said in the report instead of the rows)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama-cpp-python is not installed ({e}); see benchmarks/README.md to build it"
    except OSError as e:            # the package is there but its shared library does not load
        return f"llama-cpp-python does not load: {e}"
    try:
        import gguf  # noqa: F401
    except ImportError:
        return "the gguf package is not installed (pip install gguf)"
    return None


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face keeps each head's rotary pairs as (first half, second half); llama.cpp's Llama rope takes them
    interleaved. The same row permutation as convert_hf_to_gguf's LlamaModel.permute."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_vocab(writer: gguf.GGUFWriter, vocab_size: int, bos: int, eos: int) -> None:
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    n_fill = vocab_size - len(tokens)
    if n_fill < 0:
        raise ValueError(f"vocab_size {vocab_size} is too small for a SentencePiece-type vocabulary (259 tokens)")
    tokens += [f"\u2581t{i}" for i in range(n_fill)]      # unique pieces; never used to tokenize
    types += [gguf.TokenType.NORMAL] * n_fill
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab_size)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)


def _add_hparams(writer: gguf.GGUFWriter, cfg: dict) -> None:
    import gguf

    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 1e4)))
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)


def export_f16(hf_dir: Path, out: Path) -> Path:
    """Write `hf_dir` (a Llama safetensors checkpoint with config.json) as an F16 GGUF file at `out`."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    if cfg.get("tie_word_embeddings"):
        raise ValueError("tied embeddings: the exporter expects a separate lm_head")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name("bench_cpu random llama")
    _add_hparams(writer, cfg)
    _add_vocab(writer, cfg["vocab_size"], cfg.get("bos_token_id", 1), cfg.get("eos_token_id", 2))
    for name, w in sorted(load_file(hf_dir / "model.safetensors").items()):
        if name.endswith("q_proj.weight"):
            w = permute_rotary(w, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = permute_rotary(w, cfg["num_key_value_heads"])
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ValueError(f"no GGUF name for tensor {name}")
        # llama.cpp's norms and other 1-D ops take F32, as the converter writes them
        writer.add_tensor(new_name, w.astype(np.float32 if w.ndim == 1 else np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def quantize(f16: Path, out: Path, ftype: str, threads: int) -> Path:
    """llama.cpp's quantizer (the library behind llama-quantize) from the F16 file to `ftype` (a FTYPES key)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize to {ftype} failed (return code {rc})")
    return out


def weight_bytes(path: Path) -> int:
    """Bytes of the file's tensors read per decoded token: all but the token embedding table (of which a step
    reads one row per sequence)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight")


def make_ggufs(hf_dir: Path, out_dir: Path, types: list[str], threads: int) -> dict[str, Path]:
    """The GGUF file of each type in `types` (FTYPES keys), under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    f16 = export_f16(hf_dir, out_dir / "model-F16.gguf")
    files = {}
    for t in types:
        log.info("GGUF %s ...", t)
        files[t] = f16 if t == "F16" else quantize(f16, out_dir / f"model-{t}.gguf", t, threads)
    return files
