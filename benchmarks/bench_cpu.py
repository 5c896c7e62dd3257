"""CPU prefill/decode speed and peak memory: exllamav2 vs transformers on the same model.

A Llama-shaped model with random weights (default ~125M parameters: hidden 768, 12 layers, GQA
12/4 heads, MLP 2048, vocab 32000) is written once as an FP16 safetensors checkpoint. Each library
then runs in its own child process (so peak memory is its own), with the same thread count:

- prefill: one forward over a prompt of --prompt-len tokens into an empty KV cache (median of
  --repeats runs), reported as prompt tokens per second;
- decode: --decode-len steps of one token each against the cache, greedy argmax, reported as
  tokens per second (median of --repeats runs);
- peak memory: the child's peak resident set size, and its growth over the size after imports.

The libraries alternate over --rounds child processes each; every metric reports its best round,
since on a shared machine other load can only slow a run down.

Both sides run the bare model forward with a KV cache (no sampler, no generator), in the dtype each
uses on the CPU (recorded). The device (CPU model, cores, threads, library versions) is printed
with the results and written to --json when given.

    .venv/bin/python benchmarks/bench_cpu.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_cpu")

SHAPE = dict(
    vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
    num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=4096,
    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)


# the shared checkpoint ----------------------------------------------------------------------


def make_checkpoint(out: Path, seed: int) -> int:
    """Random-weight Llama checkpoint (FP16 safetensors + config.json); returns the parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    n_params = sum(p.numel() for p in model.parameters())
    model.to(torch.float16).save_pretrained(out)
    return n_params


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


# the two runners (each in its own process) -------------------------------------------------


class OursRunner:
    name = "exllamav2"

    def __init__(self, model_dir: Path, max_len: int, prompt_len: int) -> None:
        from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config

        config = ExLlamaV2Config(str(model_dir))
        config.max_seq_len = max_len
        config.max_input_len = prompt_len   # one prefill chunk, as the transformers side does
        config.max_attention_size = prompt_len**2
        self.model = ExLlamaV2(config)
        self.model.load()
        self.cache = ExLlamaV2Cache(self.model, max_seq_len=max_len)
        self.dtype = str(self.model.dtype)
        self.attention = ", ".join(f"{p.device.label}: {p.backend}" for p in self.model.attn_plan.devices)

    def prefill(self, ids):
        self.cache.current_seq_len = 0
        return self.model.forward(ids, self.cache, last_id_only=True)[:, -1]

    def step(self, token):
        return self.model.forward(token, self.cache)[:, -1]


class TransformersRunner:
    name = "transformers"

    def __init__(self, model_dir: Path, max_len: int, prompt_len: int) -> None:
        import torch
        from transformers import LlamaForCausalLM

        self.model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model.eval()
        self.past = None
        self.dtype = str(self.model.dtype)
        self.attention = self.model.config._attn_implementation

    def prefill(self, ids):
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        self.past = out.cache
        return out.logits[:, -1]

    def step(self, token):
        out = self.model(input_ids=token, cache=self.past, use_cache=True, logits_to_keep=1)
        self.past = out.cache
        return out.logits[:, -1]


RUNNERS = {r.name: r for r in (OursRunner, TransformersRunner)}


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    base_rss = rss_bytes()
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(3, SHAPE["vocab_size"], (1, args.prompt_len), generator=gen)
    runner = RUNNERS[args.worker](args.model_dir, args.prompt_len + args.decode_len + 8, args.prompt_len)

    with torch.inference_mode():
        runner.prefill(prompt[:, :16])                                     # warm-up
        prefill_s = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            logits = runner.prefill(prompt)
            prefill_s.append(time.perf_counter() - t)
        decode_s = []
        first_tokens = None
        for _ in range(args.repeats):
            logits = runner.prefill(prompt)
            token = logits.argmax(-1, keepdim=True)
            tokens = []
            t = time.perf_counter()
            for _ in range(args.decode_len):
                token = runner.step(token).argmax(-1, keepdim=True)
                tokens.append(int(token))
            decode_s.append(time.perf_counter() - t)
            first_tokens = first_tokens or tokens[:8]

    return {
        "library": runner.name,
        "dtype": runner.dtype,
        "attention": runner.attention,
        "threads": torch.get_num_threads(),
        "prefill_tokens_per_s": args.prompt_len / statistics.median(prefill_s),
        "decode_tokens_per_s": args.decode_len / statistics.median(decode_s),
        "peak_rss_mib": peak_rss_bytes() / 2**20,
        "rss_growth_mib": (peak_rss_bytes() - base_rss) / 2**20,
        "first_greedy_tokens": first_tokens,
    }


# the parent: device, children, table -------------------------------------------------------


def device_info(threads: int) -> dict:
    import torch
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "device": "cpu",
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_at_start": os.getloadavg(),
    }


def run_child(args: argparse.Namespace, library: str, model_dir: Path) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", library, "--model-dir", str(model_dir),
        "--threads", str(args.threads), "--prompt-len", str(args.prompt_len),
        "--decode-len", str(args.decode_len), "--repeats", str(args.repeats), "--seed", str(args.seed),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{library} benchmark failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def best_of(runs: list[dict]) -> dict:
    """Each metric's best over the rounds: on a shared machine other load only ever slows a run."""
    best = dict(runs[0])
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        best[key] = max(r[key] for r in runs)
    for key in ("peak_rss_mib", "rss_growth_mib"):
        best[key] = min(r[key] for r in runs)
    return best


def report(device: dict, n_params: int, args: argparse.Namespace, results: dict[str, dict]) -> str:
    ours, ref = results["exllamav2"], results["transformers"]
    lines = [
        f"device: {device['cpu']} ({device['logical_cores']} logical cores), {device['threads']} thread(s); "
        f"torch {device['torch']}, transformers {device['transformers']}, python {device['python']}",
        f"model: Llama-shaped, {n_params / 1e6:.1f}M parameters, random FP16 weights; "
        f"prompt {args.prompt_len} tokens, decode {args.decode_len} tokens; median of {args.repeats} per "
        f"process, best of {args.rounds} alternating processes per library",
        "",
        f"{'':<14}{'prefill tok/s':>15}{'decode tok/s':>15}{'peak RSS MiB':>15}{'RSS growth MiB':>16}"
        "  dtype / attention",
    ]
    for r in (ours, ref):
        lines.append(
            f"{r['library']:<14}{r['prefill_tokens_per_s']:>15.1f}{r['decode_tokens_per_s']:>15.2f}"
            f"{r['peak_rss_mib']:>15.0f}{r['rss_growth_mib']:>16.0f}  {r['dtype']} / {r['attention']}"
        )
    lines.append(
        f"{'ratio':<14}{ours['prefill_tokens_per_s'] / ref['prefill_tokens_per_s']:>14.2f}x"
        f"{ours['decode_tokens_per_s'] / ref['decode_tokens_per_s']:>14.2f}x"
        f"{ours['peak_rss_mib'] / ref['peak_rss_mib']:>14.2f}x{ours['rss_growth_mib'] / ref['rss_growth_mib']:>15.2f}x"
        "  (exllamav2 / transformers)"
    )
    same = ours["first_greedy_tokens"] == ref["first_greedy_tokens"]
    lines.append(f"first greedy tokens agree: {same} ({ours['first_greedy_tokens']} vs {ref['first_greedy_tokens']})")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads for both libraries")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="processes per library, alternating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = device_info(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_cpu_") as tmp:
        model_dir = Path(tmp)
        n_params = make_checkpoint(model_dir, args.seed)
        runs: dict[str, list[dict]] = {"transformers": [], "exllamav2": []}
        for round_ in range(args.rounds):
            for library in runs:
                log.info("round %d/%d: %s ...", round_ + 1, args.rounds, library)
                runs[library].append(run_child(args, library, model_dir))
        results = {library: best_of(r) for library, r in runs.items()}
    print(report(device, n_params, args, results))
    if args.json:
        args.json.write_text(json.dumps({"device": device, "parameters": n_params, "settings": {
            "prompt_len": args.prompt_len, "decode_len": args.decode_len, "repeats": args.repeats,
            "rounds": args.rounds}, "runs": runs,
            "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
