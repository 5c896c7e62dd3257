"""CPU prefill and decode speed of a mixture-of-experts model: exllamav2 vs transformers' fastest configuration.

A Mixtral-shaped model with random weights (8 experts, top-2; default hidden 512, 4 layers, expert MLP 1024,
GQA 8/2 heads, vocab 8192: ~60M parameters, ~20M active per token) is written once as an FP16 checkpoint. In
one process, at each thread count:

1. transformers is screened in every configuration it runs on the CPU: dtype (float32, bfloat16, float16) x
   attention (eager, sdpa) x experts implementation (eager, batched_mm, grouped_mm); a configuration that
   fails is listed with its error. The fastest for prefill and the fastest for decode are kept.
2. exllamav2 and those configurations then alternate over --rounds rounds; each metric reports its best
   round (on a shared machine other load only slows a run down).

prefill: one forward over --prompt-len tokens into an empty cache, prompt tokens per second.
decode: --decode-len greedy steps of one token against the cache, tokens per second.
Both sides run the bare model forward with a KV cache (no sampler, no generator).

    .venv/bin/python benchmarks/bench_moe.py --threads 1 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_gpu import cpu_name  # noqa: E402  (a script beside this one; its module level is stdlib only)

SHAPE = dict(vocab_size=8192, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
             bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
HF_DTYPES = ("float32", "bfloat16", "float16")
HF_ATTN = ("eager", "sdpa")
HF_EXPERTS = ("eager", "batched_mm", "grouped_mm")


def make_checkpoint(out: Path) -> int:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**SHAPE))
    model.to(torch.float16).save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


class ExLlama:
    label = "exllamav2 (fp32 activations, fp16 weights)"

    def __init__(self, model_dir: Path) -> None:
        from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config

        self.model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
        self.model.load()
        self.cache_class = ExLlamaV2Cache

    def run(self, ids: torch.Tensor, steps: int) -> tuple[float, float]:
        cache = self.cache_class(self.model, max_seq_len=ids.shape[1] + steps + 1)
        t0 = time.perf_counter()
        logits = self.model.forward(ids, cache, last_id_only=True)
        t1 = time.perf_counter()
        tok = logits[:, -1:].argmax(-1)
        for _ in range(steps):
            tok = self.model.forward(tok, cache, last_id_only=True)[:, -1:].argmax(-1)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1


class Transformers:
    def __init__(self, model_dir: Path, dtype: str, attn: str, experts: str) -> None:
        from transformers import AutoModelForCausalLM

        self.label = f"transformers {dtype}/{attn}/experts={experts}"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                          attn_implementation=attn, experts_implementation=experts)
        self.model.eval()

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, steps: int) -> tuple[float, float]:
        from transformers import DynamicCache

        cache = DynamicCache()
        t0 = time.perf_counter()
        out = self.model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = self.model(tok, past_key_values=out.past_key_values, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1


def rates(runner, ids: torch.Tensor, steps: int) -> tuple[float, float]:
    prefill, decode = runner.run(ids, steps)
    return ids.shape[1] / prefill, steps / decode


def screen(model_dir: Path, ids: torch.Tensor, steps: int) -> tuple[dict, list[dict]]:
    """Every transformers configuration once (after a warm-up); the fastest for prefill and for decode."""
    rows, best = [], {}
    for dtype, attn, experts in itertools.product(HF_DTYPES, HF_ATTN, HF_EXPERTS):
        try:
            runner = Transformers(model_dir, dtype, attn, experts)
            runner.run(ids[:, :8], 2)
            p, d = rates(runner, ids, steps)
        except Exception as e:  # noqa: BLE001  (a configuration transformers does not run on this CPU)
            rows.append({"config": (dtype, attn, experts), "error": f"{type(e).__name__}: {e}"[:120]})
            continue
        rows.append({"config": (dtype, attn, experts), "prefill": p, "decode": d})
        for metric, v in (("prefill", p), ("decode", d)):
            if metric not in best or v > best[metric][1]:
                best[metric] = ((dtype, attn, experts), v)
    return best, rows


def measure(model_dir: Path, threads: int, args) -> dict:
    torch.set_num_threads(threads)
    ids = torch.randint(3, SHAPE["vocab_size"], (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    best, screened = screen(model_dir, ids, max(4, args.decode_len // 4))
    runners = {"exllamav2": ExLlama(model_dir)}
    for metric in ("prefill", "decode"):
        cfg = best[metric][0]
        runners.setdefault(f"transformers {'/'.join(cfg)}", Transformers(model_dir, *cfg))
    for r in runners.values():
        r.run(ids[:, :8], 2)                                        # warm-up
    results = {name: {"prefill": 0.0, "decode": 0.0} for name in runners}
    for _ in range(args.rounds):                                    # interleaved: each round runs every side
        for name, r in runners.items():
            p, d = rates(r, ids, args.decode_len)
            results[name]["prefill"] = max(results[name]["prefill"], p)
            results[name]["decode"] = max(results[name]["decode"], d)
    return {"threads": threads, "screened": screened, "best": {k: v[0] for k, v in best.items()},
            "results": results}


def report(run: dict) -> None:
    print(f"\n== {run['threads']} thread(s)")
    print("transformers screening (tokens/s, one run each):")
    for row in run["screened"]:
        cfg = "/".join(row["config"])
        if "error" in row:
            print(f"  {cfg:34s} fails: {row['error']}")
        else:
            print(f"  {cfg:34s} prefill {row['prefill']:8.1f}  decode {row['decode']:7.1f}")
    print("interleaved rounds, best of each (tokens/s):")
    for name, r in run["results"].items():
        print(f"  {name:40s} prefill {r['prefill']:8.1f}  decode {r['decode']:7.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        n = make_checkpoint(Path(tmp))
        print(f"CPU: {cpu_name()}; torch {torch.__version__}, transformers {transformers.__version__}")
        print(f"model: Mixtral-shaped, {n / 1e6:.1f}M parameters, {SHAPE['num_local_experts']} experts, "
              f"top-{SHAPE['num_experts_per_tok']}; prompt {args.prompt_len}, decode {args.decode_len}")
        runs = [measure(Path(tmp), t, args) for t in args.threads]
    for run in runs:
        report(run)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "shape": SHAPE, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
