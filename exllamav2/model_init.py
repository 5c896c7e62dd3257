"""Shared command-line handling for example scripts: the model flags, then config, model and tokenizer.

Same functions and flags as upstream (`add_args`, `print_options`, `check_args`, `init`,
`post_init_load`), plus ``--attn-backend NAME``, which sets EXLLAMA_ATTN_BACKEND for this process
before the model (and so its attention plan) is made. The attention flags ``-nfa``/``-nxf``/``-nsdpa``
set the config switches; the selector combines them with the EXLLAMA_NO_* variables (either one
disables a backend; see exllamav2/attn/env.py for the full precedence).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from .attn.env import VAR_BACKEND, AttentionConfigError, parse_backend
from .config import ExLlamaV2Config
from .model import ExLlamaV2
from .tokenizer import ExLlamaV2Tokenizer

log = logging.getLogger(__name__)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model_dir", type=str,
                        help="Model directory (HuggingFace layout: config.json, tokenizer, *.safetensors)")
    parser.add_argument("-gs", "--gpu_split", type=str, help='GB of VRAM to use per GPU, comma-separated, or "auto"')
    parser.add_argument("-tp", "--tensor_parallel", action="store_true", help="Load in tensor-parallel mode")
    parser.add_argument("-l", "--length", type=int, help="Maximum sequence length (default: the model's)")
    parser.add_argument("-rs", "--rope_scale", type=float, help="Linear RoPE scaling factor")
    parser.add_argument("-ra", "--rope_alpha", type=float, help="NTK RoPE alpha")
    parser.add_argument("-ry", "--rope_yarn", type=float, help="YaRN RoPE factor over the model's original context")
    parser.add_argument("-nfa", "--no_flash_attn", action="store_true", help="Do not use flash-attn")
    parser.add_argument("-nxf", "--no_xformers", action="store_true", help="Do not use xformers")
    parser.add_argument("-nsdpa", "--no_sdpa", action="store_true", help="Do not use PyTorch SDPA")
    parser.add_argument("-ng", "--no_graphs", action="store_true", help="Do not use CUDA graphs")
    parser.add_argument("-lm", "--low_mem", action="store_true", help="Smaller chunks and scratch buffers")
    parser.add_argument("-ept", "--experts_per_token", type=int,
                        help="Experts per token (sets config.num_experts_per_token)")
    parser.add_argument("-lq4", "--load_q4", action="store_true",
                        help="Load FP16 weights as Q4 (sets config.load_in_q4)")
    parser.add_argument("-fst", "--fast_safetensors", action="store_true", help="Deprecated, no effect")
    parser.add_argument("-ic", "--ignore_compatibility", action="store_true",
                        help="Only warn about architecture compatibility overrides")
    parser.add_argument("-chunk", "--chunk_size", type=int,
                        help="Prefill chunk size (max_input_len; attention size is its square)")
    parser.add_argument(
        "--attn-backend",
        dest="attn_backend",
        type=str,
        metavar="NAME",
        help="Force the attention backend (auto, flash_attn, xformers, sdpa, matmul); sets EXLLAMA_ATTN_BACKEND",
    )


def print_options(args: argparse.Namespace) -> None:
    """Print the model options in effect (this function's whole job is console output)."""
    print(f" -- Model: {args.model_dir}")
    options = []
    if args.gpu_split is not None:
        options.append(f"gpu_split: {args.gpu_split}")
    if args.tensor_parallel:
        options.append("tensor_parallel")
    if args.length is not None:
        options.append(f"length: {args.length}")
    if args.rope_scale is not None:
        options.append(f"rope_scale: {args.rope_scale}")
    if args.rope_alpha is not None:
        options.append(f"rope_alpha: {args.rope_alpha}")
    if args.rope_yarn is not None:
        options.append(f"rope_yarn: {args.rope_yarn}")
    for flag in ("no_flash_attn", "no_xformers", "no_sdpa", "no_graphs", "low_mem", "load_q4", "ignore_compatibility"):
        if getattr(args, flag):
            options.append(flag)
    if args.experts_per_token is not None:
        options.append(f"experts_per_token: {args.experts_per_token}")
    if args.chunk_size is not None:
        options.append(f"chunk_size: {args.chunk_size}")
    if args.attn_backend:
        options.append(f"attn_backend: {args.attn_backend}")
    print(f" -- Options: {options}")


def check_args(args: argparse.Namespace) -> None:
    """Exit with a message naming what is missing when the model directory cannot be used."""
    if not args.model_dir:
        sys.exit(" ## Error: no model directory given; pass -m /path/to/model")
    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        sys.exit(f" ## Error: model directory {model_dir} does not exist")
    problems = []
    if not (model_dir / "config.json").exists():
        problems.append("config.json")
    if not ((model_dir / "tokenizer.json").exists() or (model_dir / "tokenizer.model").exists()):
        problems.append("tokenizer.json or tokenizer.model")
    if not any(model_dir.glob("*.safetensors")):
        problems.append("*.safetensors weights")
    if problems:
        sys.exit(f" ## Error: {model_dir} has no {', no '.join(problems)}; "
                 f"point -m at a HuggingFace-layout model directory")
    try:
        parse_backend("--attn-backend", args.attn_backend)
    except AttentionConfigError as e:
        sys.exit(f" ## Error: {e}")
    if args.gpu_split is not None:
        try:
            parse_gpu_split(args.gpu_split)
        except ValueError as e:
            sys.exit(f" ## Error: {e}")


def parse_gpu_split(text: str | None) -> list[float] | None | str:
    """'auto' -> 'auto'; '20,24' -> [20.0, 24.0]; None -> None (everything on the first device)."""
    if text is None:
        return None
    if text.strip().lower() == "auto":
        return "auto"
    try:
        split = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(
            f"-gs {text!r}: give GB per GPU as comma-separated numbers, e.g. -gs 20,24, or -gs auto"
        ) from None
    if any(x <= 0 for x in split):
        raise ValueError(f"-gs {text!r}: every GPU's share must be a positive number of GB")
    return split


def apply_attn_backend(name: str | None) -> None:
    """Set EXLLAMA_ATTN_BACKEND for this process; the attention plan reads it when the model is made."""
    if not name:
        return
    backend = parse_backend("--attn-backend", name)
    os.environ[VAR_BACKEND] = backend or "auto"


def init(
    args: argparse.Namespace,
    quiet: bool = False,
    allow_auto_split: bool = False,
    skip_load: bool = False,
    benchmark: bool = False,
    max_batch_size: int | None = None,
    max_input_len: int | None = None,
    max_output_len: int | None = None,
    progress: bool = False,
):
    """Config, model (loaded unless `skip_load` or -gs auto) and tokenizer from parsed args."""
    apply_attn_backend(getattr(args, "attn_backend", None))

    config = ExLlamaV2Config(args.model_dir)
    if args.length:
        config.max_seq_len = args.length
    if args.rope_scale:
        config.scale_pos_emb = args.rope_scale
    if args.rope_alpha:
        config.scale_alpha_value = args.rope_alpha
    if args.rope_yarn:
        config.rope_type = "yarn"
        config.rope_scaling = {
            "rope_type": "yarn",
            "factor": args.rope_yarn,
            "original_max_position_embeddings": config.original_max_seq_len,
        }
    config.no_flash_attn = config.no_flash_attn or args.no_flash_attn
    config.no_xformers = config.no_xformers or args.no_xformers
    config.no_sdpa = config.no_sdpa or args.no_sdpa
    config.no_graphs = config.no_graphs or args.no_graphs
    if args.low_mem:
        config.set_low_mem()
    if args.experts_per_token:
        config.num_experts_per_token = args.experts_per_token
    if args.load_q4:
        config.load_in_q4 = True
    if args.chunk_size:
        config.max_input_len = args.chunk_size
        config.max_attention_size = args.chunk_size**2
    if max_batch_size:
        config.max_batch_size = max_batch_size
    if max_input_len:
        config.max_input_len = max_input_len
    if max_output_len:
        config.max_output_len = max_output_len
    config.arch_compat_overrides(quiet=quiet, warn_only=args.ignore_compatibility)

    model = ExLlamaV2(config)
    if not skip_load:
        post_init_load(model, args, quiet=quiet, allow_auto_split=allow_auto_split,
                       benchmark=benchmark, progress=progress)
    tokenizer = ExLlamaV2Tokenizer(config)
    return model, tokenizer


def post_init_load(
    model: ExLlamaV2,
    args: argparse.Namespace,
    quiet: bool = False,
    allow_auto_split: bool = False,
    benchmark: bool = False,
    progress: bool = False,
) -> None:
    """Load the model as -gs/-tp ask; with -gs auto leave it for the caller's load_autosplit."""
    split = parse_gpu_split(args.gpu_split)
    start = time.perf_counter()
    if args.tensor_parallel:
        model.load_tp(None if split == "auto" else split, progress=progress)
    elif split == "auto":
        if not allow_auto_split:
            raise ValueError("-gs auto is not supported by this script; give GB per GPU, e.g. -gs 20,24")
        log.info("-gs auto: the model is placed and loaded with its cache by load_autosplit")
        return
    else:
        if not quiet:
            print(" -- Loading model...")
        model.load(split, progress=progress)
    if benchmark and not quiet:
        print(f" -- Loaded model in {time.perf_counter() - start:.4f} seconds")
