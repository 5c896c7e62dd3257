"""CPU prefill/decode speed and peak memory: exllamav2 (FP16 and EXL2) vs transformers on the same model.

A Llama-shaped model with random weights (default ~125M parameters: hidden 768, 12 layers, GQA
12/4 heads, MLP 2048, vocab 32000) is written once as an FP16 safetensors checkpoint. Each library
then runs in its own child process (so peak memory is its own), with the same thread count:

- prefill: one forward over a prompt of --prompt-len tokens into an empty KV cache (median of
  --repeats runs), reported as prompt tokens per second;
- decode: --decode-len steps of one token each against the cache, greedy argmax, reported as
  tokens per second (median of --repeats runs);
- peak memory: the child's peak resident set size, and its growth over the size after imports.

EXL2 rows (--exl2-bpw, default 4.0) use checkpoints quantized from the same weights with this package's
round-to-nearest EXL2 quantizer (exllamav2.quant.exl2: same file format, group layout and act-order
permutation as the converter, without its calibration, which would take many minutes here), decoded through
the CPU kernels; with --before, the first width also runs with the kernels switched off (the PyTorch
dequantize-then-matmul path every earlier version ran, for --before-decode-len tokens since it is slow).
llama.cpp rows need llama-cpp-python and a GGUF export, neither of which this script sets up: it says so.

The libraries alternate over --rounds child processes each; every metric reports its best round,
since on a shared machine other load can only slow a run down. The machine's read bandwidth (a sum over a
1 GiB fp32 tensor per thread count) is printed, with each row's decode share of its roofline (bytes of
weights read per token / bandwidth).

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


def make_exl2(fp16_dir: Path, out: Path, bpw: float, seed: int) -> None:
    """An EXL2 checkpoint of every linear layer of `fp16_dir` (round to nearest, groups of 128 rows, a random
    act-order permutation), other tensors copied."""
    import torch
    from safetensors.torch import load_file, save_file

    from exllamav2.quant import exl2

    bits = {2.5: [3, 2], 4.0: [4], 6.0: [6], 8.0: [8]}.get(bpw)
    if bits is None:
        raise SystemExit(f"--exl2-bpw {bpw}: choose from 2.5, 4.0, 6.0, 8.0")
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, w in load_file(fp16_dir / "model.safetensors").items():
        if not (name.endswith("proj.weight") or name == "lm_head.weight"):
            tensors[name] = w
            continue
        k = w.shape[1]
        perm = torch.randperm(k, generator=gen)
        stored = w.T.float()[perm]
        layout = exl2.group_layout(k, bits, 128)
        codes, scale_codes, scale_max, row = [], [], [], 0
        for b, rows in layout:
            gq = exl2.fit_group(stored[row : row + rows], b, p_steps=2)    # coarse scale search: speed only
            codes.append(gq.codes(stored[row : row + rows]))
            scale_codes.append(gq.scale_codes)
            scale_max.append(gq.q_scale_max)
            row += rows
        packed = exl2.pack_exl2(torch.cat(codes), layout, torch.stack(scale_codes), torch.stack(scale_max), perm)
        tensors.update({f"{name.removesuffix('.weight')}.{k_}": v for k_, v in packed.items()})
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors")
    (out / "config.json").write_text((fp16_dir / "config.json").read_text())


def weight_bytes(model_dir: Path) -> int:
    """Bytes of the checkpoint's tensors read per decoded token: everything but the embedding table."""
    from safetensors import safe_open

    size = {"F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I16": 2, "I64": 8}
    total = 0
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for name in f.keys():
            if "embed_tokens" not in name:
                t = f.get_slice(name)
                n = 1
                for d in t.get_shape():
                    n *= d
                total += n * size.get(t.get_dtype(), 4)
    return total


def read_bandwidth(threads: int) -> float:
    """GB/s of a sum over a 1 GiB fp32 tensor (best of 5)."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(2**28)
    a.sum()
    best = min(_timed(a.sum) for _ in range(5))
    return a.nbytes / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class OursRunner:
    name = "exllamav2"

    def __init__(self, model_dir: Path, max_len: int, prompt_len: int, cpu_kernels: bool = True) -> None:
        from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
        from exllamav2.quant import QuantWeight

        QuantWeight.use_cpu_kernels = cpu_kernels

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

    def __init__(self, model_dir: Path, max_len: int, prompt_len: int, cpu_kernels: bool = True) -> None:
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
    runner = RUNNERS[args.worker](args.model_dir, args.prompt_len + args.decode_len + 8, args.prompt_len,
                                  cpu_kernels=not args.no_cpu_kernels)

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
        "cpu_isa": _cpu_isa(),
    }


def _cpu_isa() -> str:
    from exllamav2 import ext

    kernels = ext.cpu_kernels()
    return kernels.isa() if kernels is not None else "unavailable"


def run_child(args: argparse.Namespace, variant: dict) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", variant["library"], "--model-dir", str(variant["dir"]),
        "--threads", str(args.threads), "--prompt-len", str(args.prompt_len),
        "--decode-len", str(variant.get("decode_len", args.decode_len)), "--repeats", str(args.repeats),
        "--seed", str(args.seed),
    ] + (["--no-cpu-kernels"] if not variant.get("kernels", True) else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{variant['label']} benchmark failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def best_of(runs: list[dict]) -> dict:
    """Each metric's best over the rounds: on a shared machine other load only ever slows a run."""
    best = dict(runs[0])
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        best[key] = max(r[key] for r in runs)
    for key in ("peak_rss_mib", "rss_growth_mib"):
        best[key] = min(r[key] for r in runs)
    return best


def report(device: dict, n_params: int, args: argparse.Namespace, variants: list[dict], results: dict[str, dict],
           bandwidth: float) -> str:
    ref = results["transformers fp32"]
    lines = [
        f"device: {device['cpu']} ({device['logical_cores']} logical cores), {device['threads']} thread(s); "
        f"torch {device['torch']}, transformers {device['transformers']}, python {device['python']}; "
        f"CPU kernels: {device.get('cpu_isa')}",
        f"model: Llama-shaped, {n_params / 1e6:.1f}M parameters, random weights; prompt {args.prompt_len} tokens, "
        f"decode {args.decode_len} tokens; median of {args.repeats} per process, best of {args.rounds} "
        f"alternating processes per row",
        f"read bandwidth ({args.threads} thread(s), 1 GiB fp32 sum): {bandwidth:.1f} GB/s; roofline share = "
        f"decode tok/s x bytes read per token / bandwidth",
        "",
        f"{'':<34}{'prefill tok/s':>14}{'decode tok/s':>13}{'vs transf.':>11}{'roofline':>9}{'peak MiB':>9}"
        "  dtype / attention",
    ]
    for v in variants:
        r = results[v["label"]]
        share = r["decode_tokens_per_s"] * v["bytes"] / (bandwidth * 1e9)
        lines.append(
            f"{v['label']:<34}{r['prefill_tokens_per_s']:>14.1f}{r['decode_tokens_per_s']:>13.2f}"
            f"{r['decode_tokens_per_s'] / ref['decode_tokens_per_s']:>10.2f}x{share:>8.0%}"
            f"{r['peak_rss_mib']:>9.0f}  {r['dtype']} / {r['attention']}"
        )
    ours = results["exllamav2 FP16"]
    same = ours["first_greedy_tokens"] == ref["first_greedy_tokens"]
    lines.append(f"first greedy tokens agree (FP16 vs transformers): {same}")
    try:
        import llama_cpp  # noqa: F401
        lines.append("llama-cpp-python is installed, but this script has no GGUF export yet: llama.cpp rows skipped")
    except ImportError:
        lines.append("llama.cpp rows skipped: llama-cpp-python is not installed (pip install llama-cpp-python)")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads for every row")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="processes per row, alternating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exl2-bpw", type=float, nargs="*", default=[4.0], help="EXL2 rows: 2.5, 4.0, 6.0, 8.0")
    p.add_argument("--before", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the first EXL2 width without the CPU kernels")
    p.add_argument("--before-decode-len", type=int, default=8)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--no-cpu-kernels", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--setup", type=Path, help=argparse.SUPPRESS)
    return p.parse_args()


def variants_for(args: argparse.Namespace, root: Path) -> list[dict]:
    fp16 = root / "fp16"
    out = [dict(label="exllamav2 FP16", library="exllamav2", dir=fp16),
           dict(label="transformers fp32", library="transformers", dir=fp16)]
    for i, bpw in enumerate(args.exl2_bpw):
        d = root / f"exl2_{bpw}"
        log.info("quantizing EXL2 %.1f bpw ...", bpw)
        make_exl2(fp16, d, bpw, args.seed)
        out.append(dict(label=f"exllamav2 EXL2 {bpw:.1f} bpw", library="exllamav2", dir=d))
        if i == 0 and args.before:
            out.append(dict(label=f"exllamav2 EXL2 {bpw:.1f} bpw, no kernel", library="exllamav2", dir=d,
                            kernels=False, decode_len=args.before_decode_len))
    for v in out:
        v["bytes"] = weight_bytes(v["dir"])
    return out


def setup(args: argparse.Namespace, root: Path) -> dict:
    """The checkpoints and the bandwidth measurement (run in a child process)."""
    n_params = make_checkpoint(root / "fp16", args.seed)
    variants = variants_for(args, root)
    for v in variants:
        v["dir"] = str(v["dir"])
    return {"parameters": n_params, "bandwidth": read_bandwidth(args.threads), "variants": variants}


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(REPO))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.setup:
        print(json.dumps(setup(args, args.setup)))
        return
    device = device_info(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_cpu_") as tmp:
        root = Path(tmp)
        # in a child: the parent's peak RSS would be inherited by every measured child (ru_maxrss survives exec)
        cmd = [sys.executable, __file__, "--setup", str(root), "--threads", str(args.threads), "--seed", str(args.seed),
               "--exl2-bpw", *map(str, args.exl2_bpw)] + ([] if args.before else ["--no-before"])
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        if done.returncode != 0:
            raise RuntimeError(f"setup failed:\n{done.stderr[-4000:]}")
        prepared = json.loads(done.stdout.strip().splitlines()[-1])
        n_params, bandwidth, variants = prepared["parameters"], prepared["bandwidth"], prepared["variants"]
        for v in variants:
            v["dir"] = Path(v["dir"])
            if v.get("kernels") is False:
                v["decode_len"] = args.before_decode_len
        runs: dict[str, list[dict]] = {v["label"]: [] for v in variants}
        for round_ in range(args.rounds):
            for v in variants:
                log.info("round %d/%d: %s ...", round_ + 1, args.rounds, v["label"])
                runs[v["label"]].append(run_child(args, v))
        results = {label: best_of(r) for label, r in runs.items()}
    print(report(device, n_params, args, variants, results, bandwidth))
    if args.json:
        args.json.write_text(json.dumps({"device": device, "parameters": n_params, "bandwidth_gb_s": bandwidth,
            "settings": {"prompt_len": args.prompt_len, "decode_len": args.decode_len, "repeats": args.repeats,
                         "rounds": args.rounds}, "runs": runs, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
