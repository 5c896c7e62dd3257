"""Shared command-line handling for example scripts: the model flags, then config, model and tokenizer.

Same functions and flags as upstream (`add_args`, `print_options`, `check_args`, `init`,
`post_init_load`), plus ``--attn-backend NAME``, which sets EXLLAMA_ATTN_BACKEND for this process
before the model (and so its attention plan) is made, and ``-v``/``--debug``.

Errors: any of the project's errors (exllamav2.errors.ExLlamaV2Error) or a missing file is printed as
one line, `` ## Error: ...`` on stderr, in the words the user used (the flag they typed, or the
variable they set), and the process exits with status 1. ``-v``/``--debug`` shows the traceback instead. The attention flags ``-nfa``/``-nxf``/``-nsdpa``
set the config switches; the selector combines them with the EXLLAMA_NO_* variables (either one
disables a backend; see exllamav2/attn/env.py for the full precedence).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .attn.env import VAR_BACKEND, VAR_NO, AttentionConfigError, attn_environ, parse_backend, parse_env
from .errors import ExLlamaV2Error, UsageError
from .config import ExLlamaV2Config
from .model.model import ExLlamaV2
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
    parser.add_argument("-v", "--debug", action="store_true",
                        help="Show the full traceback of an error instead of one line")


# what the user can fix; anything else is a bug and keeps its traceback
USER_ERRORS = (ExLlamaV2Error, FileNotFoundError)

# attention flag -> (the config switch it sets, the backend it disables)
_ATTN_FLAGS = (("-nfa", "no_flash_attn", "flash_attn"), ("-nxf", "no_xformers", "xformers"),
               ("-nsdpa", "no_sdpa", "sdpa"))


def in_user_words(message: str, args: argparse.Namespace | None) -> str:
    """Rewrite the attention plan's wording into the flags the user typed.

    --attn-backend works by setting config.attn_backend and -nsdpa by setting config.no_sdpa, so the
    selector's messages name those; a user who typed the flag should read the flag."""
    if args is None:
        return message
    typed = getattr(args, "attn_backend", None)
    try:
        forced = parse_backend("--attn-backend", typed)
    except AttentionConfigError:
        forced = None
    if forced:
        message = message.replace("set config.attn_backend to auto (or to one of those)",
                                  "drop --attn-backend (or give it one of those)")
        message = message.replace(f"config.attn_backend={forced}", f"--attn-backend {typed}")
    for flag, attr, _ in _ATTN_FLAGS:
        if getattr(args, attr, False):
            message = message.replace(f"config {attr}", flag)
    return message


@contextlib.contextmanager
def one_line_errors(args: argparse.Namespace | None = None) -> Iterator[None]:
    """Print the project's errors (and a missing file) as one ' ## Error: ...' line and exit 1;
    with -v/--debug let them through with their traceback."""
    try:
        yield
    except USER_ERRORS as e:
        if getattr(args, "debug", False):
            raise
        log.debug("error", exc_info=True)
        print(f" ## Error: {in_user_words(str(e), args)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


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
    with one_line_errors(args):
        check_attn_args(args)
        check_number_args(args)
        if args.tensor_parallel:
            raise UsageError("-tp: tensor parallelism is not implemented in this fork; drop -tp "
                             "(-gs splits the layers across GPUs instead)")
        if args.gpu_split is not None:
            parse_gpu_split(args.gpu_split)


# flag -> (args attribute, what it is): values that must be positive (0 or less would fail deep in the load)
_POSITIVE_FLAGS = (("-l", "length", "tokens of context"), ("-chunk", "chunk_size", "tokens per prefill chunk"),
                   ("-rs", "rope_scale", "a RoPE scaling factor"), ("-ra", "rope_alpha", "an NTK alpha"),
                   ("-ry", "rope_yarn", "a YaRN factor"), ("-ept", "experts_per_token", "experts per token"))


def check_number_args(args: argparse.Namespace) -> None:
    for flag, attr, what in _POSITIVE_FLAGS:
        value = getattr(args, attr, None)
        if value is not None and not value > 0:
            raise UsageError(f"{flag} {value}: must be a positive number ({what}); leave it out for the model's default")


def check_attn_args(args: argparse.Namespace) -> None:
    """--attn-backend, the -n* flags and the EXLLAMA_* variables, checked together before any work: the
    flag's value, a forced backend that a flag or variable also disables, an unparseable variable."""
    environ = attn_environ()
    forced = parse_backend("--attn-backend", args.attn_backend)
    if args.attn_backend:
        environ.pop(VAR_BACKEND, None)        # the flag replaces the variable
    env = parse_env(environ)
    forced = forced or env.backend
    for flag, attr, backend in _ATTN_FLAGS:
        if forced == backend and getattr(args, attr, False):
            by = f"--attn-backend {args.attn_backend}" if args.attn_backend else f"{VAR_BACKEND}={environ[VAR_BACKEND]}"
            raise UsageError(f"{by} forces {backend}, but {flag} disables it; remove one of the two")
        if forced == backend and args.attn_backend and env.disables(backend):
            raise UsageError(f"--attn-backend {args.attn_backend} forces {backend}, but "
                             f"{VAR_NO[backend]}={environ[VAR_NO[backend]]} disables it; remove one of the two")


def parse_gpu_split(text: str | None) -> list[float] | None | str:
    """'auto' -> 'auto'; '20,24' -> [20.0, 24.0]; None -> None (everything on the first device)."""
    if text is None:
        return None
    if text.strip().lower() == "auto":
        return "auto"
    try:
        split = [float(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(
            f"-gs {text!r}: give GB per GPU as comma-separated numbers, e.g. -gs 20,24, or -gs auto"
        ) from None
    if any(x <= 0 for x in split):
        raise UsageError(f"-gs {text!r}: every GPU's share must be a positive number of GB")
    return split


def apply_attn_backend(config: ExLlamaV2Config, name: str | None) -> None:
    """--attn-backend into config.attn_backend, which the attention plan reads in place of EXLLAMA_ATTN_BACKEND."""
    if name:
        config.attn_backend = parse_backend("--attn-backend", name) or "auto"


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
) -> tuple[ExLlamaV2, ExLlamaV2Tokenizer]:
    """Config, model (loaded unless `skip_load` or -gs auto) and tokenizer from parsed args. A bad model
    directory, config or flag exits with one line (see one_line_errors)."""
    with one_line_errors(args):
        return _init(args, quiet, allow_auto_split, skip_load, benchmark, max_batch_size, max_input_len,
                     max_output_len, progress)


def _apply_config_args(config: ExLlamaV2Config, args: argparse.Namespace) -> None:
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


def _init(args: argparse.Namespace, quiet: bool, allow_auto_split: bool, skip_load: bool, benchmark: bool,
          max_batch_size: int | None, max_input_len: int | None, max_output_len: int | None,
          progress: bool) -> tuple[ExLlamaV2, ExLlamaV2Tokenizer]:
    config = ExLlamaV2Config(args.model_dir)
    apply_attn_backend(config, getattr(args, "attn_backend", None))
    _apply_config_args(config, args)
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
    with one_line_errors(args):
        _post_init_load(model, args, quiet, allow_auto_split, benchmark, progress)


def _post_init_load(model: ExLlamaV2, args: argparse.Namespace, quiet: bool, allow_auto_split: bool,
                    benchmark: bool, progress: bool) -> None:
    split = parse_gpu_split(args.gpu_split)
    start = time.perf_counter()
    if args.tensor_parallel:
        model.load_tp(None if split == "auto" else split, progress=progress)
    elif split == "auto":
        if not allow_auto_split:
            raise UsageError("-gs auto is not supported by this script; give GB per GPU, e.g. -gs 20,24")
        log.info("-gs auto: the model is placed and loaded with its cache by load_autosplit")
        return
    else:
        if not quiet:
            print(" -- Loading model...")
        model.load(split, progress=progress)
    if benchmark and not quiet:
        print(f" -- Loaded model in {time.perf_counter() - start:.4f} seconds")
