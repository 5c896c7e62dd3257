"""`python -m exllamav2.attn`: the attention plan for this machine (or an assumed rig), with reasons.

    python -m exllamav2.attn                          # this machine's GPUs (probed) or the CPU
    python -m exllamav2.attn --assume-capability 7.5  # plan for a Turing card without having one
    python -m exllamav2.attn --assume-capability 8.6,7.5 --json

--no-flash-attn/--no-xformers/--no-sdpa mirror the config flags; --backend mirrors
EXLLAMA_ATTN_BACKEND (and overrides it); the EXLLAMA_* variables are read as the model reads them.
"""

from __future__ import annotations

import argparse
import sys

from .devices import assumed_devices, visible_devices
from .env import BACKEND_NAMES, VAR_BACKEND, AttentionConfigError, attn_environ
from .installed import find_installed
from .resolve import resolve_plan
from .selector import AttnFlags, ModelNeeds, normalize_dtype, plan_attention


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m exllamav2.attn", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument(
        "--assume-capability",
        metavar="CAPS",
        help="plan for an imagined rig instead of this machine: '7.5', or '8.6,7.5' (one per GPU; 'cpu' allowed)",
    )
    parser.add_argument("--backend", choices=("auto", *BACKEND_NAMES), help=f"force a backend (as {VAR_BACKEND})")
    parser.add_argument("--no-flash-attn", "--no-flash-attention", action="store_true", help="as config.no_flash_attn")
    parser.add_argument("--no-xformers", action="store_true", help="as config.no_xformers")
    parser.add_argument("--no-sdpa", action="store_true", help="as config.no_sdpa")
    parser.add_argument("--head-dim", type=int, default=128, help="model head dimension (default 128)")
    parser.add_argument("--dtype", default="float16", help="model dtype: float16, bfloat16 or float32")
    parser.add_argument("--softcap", type=float, default=0.0, help="attention logit softcap (default none)")
    parser.add_argument("--sliding-window", type=int, default=0, help="sliding window length (default none)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    environ = attn_environ()
    if args.backend:
        environ[VAR_BACKEND] = args.backend
    flags = AttnFlags(no_flash_attn=args.no_flash_attn, no_xformers=args.no_xformers, no_sdpa=args.no_sdpa)
    try:
        needs = ModelNeeds(
            head_dim=args.head_dim,
            dtype=normalize_dtype(args.dtype),
            softcap=args.softcap,
            sliding_window=args.sliding_window,
        )
        if args.assume_capability:
            devices = assumed_devices(args.assume_capability)
            plan = plan_attention(devices, flags, environ, find_installed(), needs)
        else:
            plan = resolve_plan(visible_devices(), flags, environ, needs)
    except AttentionConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(plan.to_json() if args.json else plan.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
