"""CPU prefill/decode speed: exllamav2 (FP16, EXL2) vs transformers (every dtype x attention) vs llama.cpp (GGUF).

A Llama-shaped model with random weights (default ~125M parameters: hidden 768, 12 layers, GQA 12/4 heads,
MLP 2048, vocab 32000) is written once as an FP16 safetensors checkpoint, and from it:

- EXL2 checkpoints (--exl2-bpw, default 2.5 4.0 6.0 8.0) made with this package's round-to-nearest EXL2
  quantizer (exllamav2.quant.exl2: the converter's file format, group layout and act-order permutation, without
  its calibration, which would take many minutes here), decoded through the CPU kernels; --before adds the first
  width with the kernels off (dequantize on every forward, for --before-decode-len tokens since it is slow);
- GGUF files (--gguf-types, default F16 Q8_0 Q4_0 Q4_K_M) for llama.cpp through llama-cpp-python: F16 exported
  by benchmarks/gguf_export.py, the others quantized by llama.cpp's own quantizer. Without llama-cpp-python (an
  optional benchmark dependency; benchmarks/README.md says how to build it) these rows are skipped, with why.

Every row runs in its own child process, at every --threads count, for every --batch-sizes (default 1 and 8:
batch 8 is eight sequences prefilled and decoded together through each library's own batched path):
a prefill of --prompt-len tokens per sequence into an empty KV cache, then --decode-len greedy steps, median of
--repeats per child. Rows, thread counts and the bandwidth measurement alternate over --rounds; each metric
reports its best round (--aggregate median for the median): on a shared machine other load only slows runs.

The machine's read bandwidth (a sum over a 1 GiB fp32 tensor, per thread count) is printed, and each row's decode
share of that roofline: decode tokens/s x (weights read per step / batch + KV cache per sequence at the mean
decode context) / bandwidth. Each row's process measures the bandwidth again right after its runs, and a second
share reads each round against that (median over rounds): on a shared machine the bandwidth swings by half.
Ratios against llama.cpp (the GGUF type nearest in size) and transformers' fastest configuration per metric
follow, then the issue-16 targets, met or missed by how much. The CPU, its flags, the load average and every
row's library version are printed, and written to --json when given.

    .venv/bin/python benchmarks/bench_cpu.py --json bench_cpu.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cpu_runners import Runner

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))     # the helper modules beside this script

import cpu_report  # noqa: E402
import gguf_export  # noqa: E402

log = logging.getLogger("bench_cpu")

SHAPE = dict(
    vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
    num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=4096,
    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)
# for the tests: small enough that a child is mostly import time, big enough for every format's block sizes
TINY_SHAPE = dict(SHAPE, vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
EXL2_BITS = {2.5: [3, 2], 4.0: [4], 6.0: [6], 8.0: [8]}


# the checkpoints (made in a setup child) ----------------------------------------------------------


def make_checkpoint(out: Path, seed: int, shape: dict) -> int:
    """Random-weight Llama checkpoint (FP16 safetensors + config.json); returns the parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**shape))
    n_params = sum(p.numel() for p in model.parameters())
    model.to(torch.float16).save_pretrained(out)
    return n_params


# the linears that read one input: the converter gives them one act-order permutation (one Hessian)
SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def make_exl2(fp16_dir: Path, out: Path, bpw: float, seed: int) -> None:
    """An EXL2 checkpoint of every linear layer of `fp16_dir` (round to nearest, groups of 128 rows, a random
    act-order permutation per input, as the converter's), other tensors copied."""
    import torch
    from safetensors.torch import load_file, save_file

    from exllamav2.quant import exl2

    bits = EXL2_BITS.get(bpw)
    if bits is None:
        raise SystemExit(f"--exl2-bpw {bpw}: choose from {', '.join(map(str, EXL2_BITS))}")
    gen = torch.Generator().manual_seed(seed)
    tensors, perms = {}, {}
    for name, w in load_file(fp16_dir / "model.safetensors").items():
        if not (name.endswith("proj.weight") or name == "lm_head.weight"):
            tensors[name] = w
            continue
        k = w.shape[1]
        prefix, _, layer = name.removesuffix(".weight").rpartition(".")
        key = f"{prefix}.{SHARED_INPUT.get(layer, layer)}"
        perm = perms.setdefault(key, torch.randperm(k, generator=gen))
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


def variants_for(args: argparse.Namespace, root: Path, gguf_files: dict[str, Path]) -> list[dict]:
    """Every row of the table: (label, library, model path, the runner's options)."""
    fp16 = root / "fp16"
    out = [dict(label="exllamav2 FP16", library="exllamav2", path=str(fp16))]
    for i, bpw in enumerate(args.exl2_bpw):
        d = root / f"exl2_{bpw}"
        out.append(dict(label=f"exllamav2 EXL2 {bpw:.1f} bpw", library="exllamav2", path=str(d), bpw=bpw))
        if i == 0 and args.before:
            out.append(dict(label=f"exllamav2 EXL2 {bpw:.1f} bpw, no kernel", library="exllamav2", path=str(d),
                            kernels=False, decode_len=args.before_decode_len))
    for t, path in gguf_files.items():
        out.append(dict(label=f"llama.cpp {t}", library="llama.cpp", path=str(path), gguf_type=t))
    for dtype in args.transformers_dtypes:
        for attn in args.attention:
            out.append(dict(label=f"transformers {dtype} {attn}", library="transformers", path=str(fp16),
                            dtype=dtype, attention=attn))
    return out


def setup(args: argparse.Namespace, root: Path) -> dict:
    """The checkpoints and GGUF files (run in a child process, so that no measured child inherits its memory)."""
    shape = TINY_SHAPE if args.tiny else SHAPE
    n_params = make_checkpoint(root / "fp16", args.seed, shape)
    for bpw in args.exl2_bpw:
        log.info("quantizing EXL2 %.1f bpw ...", bpw)
        make_exl2(root / "fp16", root / f"exl2_{bpw}", bpw, args.seed)
    skipped = gguf_export.unavailable_reason() if args.gguf_types else None
    gguf_files = {}
    if args.gguf_types and skipped is None:
        gguf_files = gguf_export.make_ggufs(root / "fp16", root / "gguf", args.gguf_types, max(args.threads))
    return {"parameters": n_params, "llama_cpp_skipped": skipped,
            "variants": variants_for(args, root, {k: str(v) for k, v in gguf_files.items()})}


# the children -------------------------------------------------------------------------------------


def read_bandwidth(threads: int, numel: int = 2**28) -> float:
    """GB/s of a sum over a 1 GiB fp32 tensor (best of 5)."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(numel)
    a.sum()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def make_runner(args: argparse.Namespace, max_len: int) -> Runner:
    from cpu_runners import LlamaCppRunner, OursRunner, TransformersRunner

    if args.worker == "exllamav2":
        return OursRunner(args.model_dir, max_len, max(args.batch_sizes), cpu_kernels=not args.no_cpu_kernels)
    if args.worker == "transformers":
        return TransformersRunner(args.model_dir, args.dtype, args.attn)
    return LlamaCppRunner(args.model_dir, args.threads[0], max_len, args.prompt_len)


def worker(args: argparse.Namespace) -> dict:
    """One row at one thread count, every batch size (in a child process of its own)."""
    import torch

    from cpu_runners import timed_batch

    threads = args.threads[0]
    torch.set_num_threads(threads)
    if args.worker == "bandwidth":
        return {"bandwidth_gb_s": read_bandwidth(threads, 2**22 if args.tiny else 2**28)}
    vocab = (TINY_SHAPE if args.tiny else SHAPE)["vocab_size"]
    gen = torch.Generator().manual_seed(args.seed)
    # the same prompts for every row; sequence 0 is the same at every batch size
    prompts = torch.randint(3, vocab, (max(args.batch_sizes), args.prompt_len), generator=gen)
    runner = make_runner(args, args.prompt_len + args.decode_len + 8)
    batches = {}
    with torch.inference_mode():
        for b in args.batch_sizes:
            batches[str(b)] = timed_batch(runner, prompts[:b], args.decode_len, args.repeats)
            batches[str(b)]["kv_bytes_per_position"] = runner.kv_bytes_per_position
    out = {
        "library": runner.library, "version": runner.version, "dtype": runner.dtype, "attention": runner.attention,
        "threads": torch.get_num_threads() if runner.library != "llama.cpp" else threads,
        "weight_bytes": runner.weight_bytes, "system_info": getattr(runner, "system_info", None),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "batches": batches,
        "load_average": os.getloadavg()[0],             # how busy the machine was: for reading the figures
    }
    del runner
    # the bandwidth right after this row's runs, at its thread count: on a shared machine the bandwidth other jobs
    # leave swings between minutes, so each round's roofline share is also read against its own measurement
    out["bandwidth_gb_s"] = read_bandwidth(threads, 2**22 if args.tiny else 2**28)
    return out


def run_child(args: argparse.Namespace, variant: dict, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant["library"], "--model-dir", variant["path"],
           "--threads", str(threads), "--batch-sizes", *map(str, args.batch_sizes),
           "--prompt-len", str(args.prompt_len), "--decode-len", str(variant.get("decode_len", args.decode_len)),
           "--repeats", str(args.repeats), "--seed", str(args.seed)]
    cmd += ["--dtype", variant["dtype"], "--attn", variant["attention"]] if "dtype" in variant else []
    cmd += ["--no-cpu-kernels"] if variant.get("kernels") is False else []
    cmd += ["--tiny"] if args.tiny else []
    done = subprocess.run(cmd, capture_output=True, text=True, env=child_env(threads))
    if done.returncode != 0:
        raise RuntimeError(f"{variant['label']} at {threads} thread(s) failed (exit {done.returncode}):\n"
                           f"{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    src = env.get("BENCH_CPU_SRC", str(REPO))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    return env


def snapshot_package(root: Path, commit: str | None = None) -> tuple[Path, str]:
    """A copy of the exllamav2 package (this checkout's, or `commit`'s), imported by every child: a long run in a
    working tree that others edit would otherwise measure different code in different rounds. Returns (its
    directory, a name for the code: the git commit, whether the package differed from it, a hash of the copy)."""
    dest, git = root / "src", ["git", "-C", str(REPO)]
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    if commit:
        archive = subprocess.run([*git, "archive", commit, "exllamav2"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    else:
        shutil.copytree(REPO / "exllamav2", dest / "exllamav2", ignore=shutil.ignore_patterns("__pycache__"))
    digest = hashlib.sha256()
    for f in sorted(p for p in (dest / "exllamav2").rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(dest)).encode() + f.read_bytes())
    rev = subprocess.run([*git, "rev-parse", "--short", commit or "HEAD"], capture_output=True, text=True).stdout
    dirty = "" if commit else subprocess.run([*git, "status", "--porcelain", "--", "exllamav2"],
                                             capture_output=True, text=True).stdout
    state = "+uncommitted" if dirty.strip() else ""
    return dest, f"git {rev.strip() or 'unknown'}{state}, tree {digest.hexdigest()[:10]}"


# the parent ---------------------------------------------------------------------------------------


def aggregate(runs: list[dict], how: str) -> dict:
    """Each metric over the rounds: the best (other load on a shared machine only slows a run) or the median."""
    pick = max if how == "best" else statistics.median
    versions = sorted({r["version"] for r in runs})
    out = dict(runs[0], peak_rss_mib=min(r["peak_rss_mib"] for r in runs), batches={},
               load_averages=[r.get("load_average", 0.0) for r in runs])
    if len(versions) > 1:                   # should not happen with the package snapshot; never hide it
        out["version"] = "MIXED: " + " | ".join(versions)
    for b, first in runs[0]["batches"].items():
        out["batches"][b] = dict(first, **{k: pick([r["batches"][b][k] for r in runs])
                                           for k in ("prefill_tokens_per_s", "decode_tokens_per_s")})
        # decode tok/s per GB/s of the bandwidth measured beside it: the median over rounds, whatever `how` is
        # (the best of a ratio of two noisy readings would favour a round whose bandwidth reading was low)
        per_round = [r["batches"][b]["decode_tokens_per_s"] / r["bandwidth_gb_s"]
                     for r in runs if "bandwidth_gb_s" in r]
        out["batches"][b]["decode_per_beside_gb_s"] = statistics.median(per_round) if per_round else None
    return out


def measure(args: argparse.Namespace, variants: list[dict]) -> tuple[dict, dict]:
    """All rows at all thread counts, interleaved: rounds, then thread counts, then rows."""
    runs: dict[tuple[str, int], list[dict]] = {}
    bandwidth: dict[int, list[float]] = {t: [] for t in args.threads}
    total = args.rounds * len(args.threads) * len(variants)
    n = 0
    for round_ in range(args.rounds):
        for threads in args.threads:
            bw = run_child(args, dict(label="bandwidth", library="bandwidth", path="-"), threads)
            bandwidth[threads].append(bw["bandwidth_gb_s"])
            for v in variants:
                n += 1
                log.info("[%d/%d] round %d, %d thread(s): %s", n, total, round_ + 1, threads, v["label"])
                t = time.perf_counter()
                runs.setdefault((v["label"], threads), []).append(run_child(args, v, threads))
                log.info("    %.0f s", time.perf_counter() - t)
    bw_best = {t: max(b) if args.aggregate == "best" else statistics.median(b) for t, b in bandwidth.items()}
    return {k: aggregate(r, args.aggregate) for k, r in runs.items()}, {"runs": runs, "bandwidth": bw_best}


def prepare(args: argparse.Namespace, root: Path) -> dict:
    # in a child: the parent's peak RSS would be inherited by every measured child (ru_maxrss survives exec)
    cmd = [sys.executable, __file__, "--setup", str(root), "--threads", *map(str, args.threads),
           "--seed", str(args.seed), "--exl2-bpw", *map(str, args.exl2_bpw),
           "--gguf-types", *args.gguf_types, "--transformers-dtypes", *args.transformers_dtypes,
           "--attention", *args.attention, "--before-decode-len", str(args.before_decode_len)]
    cmd += (["--before"] if args.before else []) + (["--tiny"] if args.tiny else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env=child_env(max(args.threads)))
    if done.returncode != 0:
        raise RuntimeError(f"setup failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace, root: Path) -> None:
    src, code = snapshot_package(root, args.commit)
    os.environ.update(BENCH_CPU_SRC=str(src), BENCH_CPU_CODE=code)     # read by every child
    sys.path.insert(0, str(src))
    device = cpu_report.device_info()
    prepared = prepare(args, root)
    variants = [v for v in prepared["variants"] if not args.rows or any(s in v["label"] for s in args.rows)]
    results, extra = measure(args, variants)
    device["load_average_at_end"] = os.getloadavg()
    print(cpu_report.report(device, prepared, args, variants, results, extra["bandwidth"]))
    if args.json:
        args.json.write_text(json.dumps({
            "device": device, "parameters": prepared["parameters"], "bandwidth_gb_s": extra["bandwidth"],
            "llama_cpp_skipped": prepared["llama_cpp_skipped"], "settings": cpu_report.settings(args),
            "variants": variants, "runs": {f"{label} @ {t}": r for (label, t), r in extra["runs"].items()},
            "results": {f"{label} @ {t}": r for (label, t), r in results.items()},
        }, indent=2) + "\n")


def report_from(path: Path) -> str:
    """The report of a run saved with --json, printed again (after a change to the report, without rerunning)."""
    data = json.loads(path.read_text())
    args = argparse.Namespace(**data["settings"])
    results = {}
    for key, r in data["results"].items():
        label, threads = key.rsplit(" @ ", 1)
        results[(label, int(threads))] = r
    bandwidth = {int(t): bw for t, bw in data["bandwidth_gb_s"].items()}
    prepared = {"parameters": data["parameters"], "llama_cpp_skipped": data["llama_cpp_skipped"]}
    return cpu_report.report(data["device"], prepared, args, data["variants"], results, bandwidth)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch / llama.cpp threads, each a run")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="runs per child (their median)")
    p.add_argument("--rounds", type=int, default=2, help="children per row and thread count, interleaved")
    p.add_argument("--aggregate", choices=["best", "median"], default="best", help="over the rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exl2-bpw", type=float, nargs="*", default=[2.5, 4.0, 6.0, 8.0])
    p.add_argument("--gguf-types", nargs="*", default=list(gguf_export.FTYPES), choices=list(gguf_export.FTYPES))
    p.add_argument("--transformers-dtypes", nargs="*", default=["float32", "bfloat16", "float16"])
    p.add_argument("--attention", nargs="*", default=["eager", "sdpa"], help="transformers attn_implementation")
    p.add_argument("--before", action=argparse.BooleanOptionalAction, default=False,
                   help="also run the first EXL2 width without the CPU kernels")
    p.add_argument("--before-decode-len", type=int, default=8)
    p.add_argument("--rows", nargs="*", help="only the rows whose label contains one of these")
    p.add_argument("--commit", help="measure the exllamav2 package of this git commit (default: the working tree)")
    p.add_argument("--work-dir", type=Path, help="keep the checkpoints here (default: a temporary directory)")
    p.add_argument("--tiny", action="store_true", help="a tiny model (for the tests; the numbers mean nothing)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--report-from", type=Path, help="print the report of a run saved with --json, run nothing")
    p.add_argument("--worker", choices=["exllamav2", "transformers", "llama.cpp", "bandwidth"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--attn", help=argparse.SUPPRESS)
    p.add_argument("--no-cpu-kernels", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--setup", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    sys.path.insert(0, os.environ.get("BENCH_CPU_SRC", str(REPO)))     # children: the parent's package snapshot
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.report_from:
        print(report_from(args.report_from))
    elif args.worker:
        print(json.dumps(worker(args)))
    elif args.setup:
        print(json.dumps(setup(args, args.setup)))
    elif args.work_dir:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        run(args, args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_cpu_") as tmp:
            run(args, Path(tmp))


if __name__ == "__main__":
    main()
