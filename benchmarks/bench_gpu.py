"""GPU prefill/decode speed per attention backend: this exllamav2 vs upstream exllamav2 0.3.2, with
the memory-bandwidth roofline.

The model is EXL2 at 4.0 bpw with Llama-3-8B shapes and random weights (make_bench_model.py: the
converter's layouts and packer, random codes). Every (package, backend) pair runs in its own child
process, one after the other on the same GPU, so the two packages never share a process:
- ours: PYTHONPATH = this repository, EXLLAMA_ATTN_BACKEND = the backend;
- upstream: PYTHONPATH = --upstream-site (a `pip install --target` of exllamav2==0.3.2), steered the
  only way it can be: EXLLAMA_NO_FLASH_ATTN / _NO_XFORMERS / _NO_SDPA set to skip the backends it
  would prefer. A backend a package cannot run is recorded as unavailable, with the reason.

Each child measures, after warm-up runs, the median over --repeats of:
- prefill: one forward over a --prompt-len prompt into an empty cache (tokens/s);
- decode b1: --decode-len greedy steps of model.forward after that prompt (tokens/s);
- generator bN for each --batch-sizes N: N jobs of --gen-prompt-len random tokens through the
  dynamic generator (paged, i.e. batched, wherever the package can), greedy; tokens/s over the
  steps where all N jobs decode, after --warmup-steps of them.
Times come from torch.cuda.synchronize around host clocks (model work) and CUDA events (the copy).

The roofline: the GPU's bandwidth is measured by a device-to-device copy (bytes read + written);
a decode step at batch B and context L reads the weights once (every tensor but the embedding table)
and each sequence's KV (L x layers x kv_heads x head_dim x 2 x 2 bytes), so one token costs
weights/B + KV(L) bytes and the ceiling is bandwidth / that.

    python benchmarks/bench_gpu.py --upstream-site /opt/upstream-site --model-dir /data/bench8b --json out.json
    python benchmarks/bench_gpu.py --dry-run        # tiny model, CPU, exercises every code path

Without a CUDA GPU (and without --dry-run) it stops with "needs a CUDA GPU".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_gpu")

BACKENDS = ("flash_attn", "xformers", "sdpa", "matmul")
PACKAGES = ("ours", "upstream")
ATTN_VARS = ("EXLLAMA_ATTN_BACKEND", "EXLLAMA_NO_FLASH_ATTN", "EXLLAMA_NO_XFORMERS", "EXLLAMA_NO_SDPA")
# upstream tries flash-attn, xformers, SDPA, matmul in that order; its EXLLAMA_NO_* switches are
# tested for presence, so each backend is reached by disabling the ones before it
UPSTREAM_ENV = {
    "flash_attn": {},
    "xformers": {"EXLLAMA_NO_FLASH_ATTN": "1"},
    "sdpa": {"EXLLAMA_NO_FLASH_ATTN": "1", "EXLLAMA_NO_XFORMERS": "1"},
    "matmul": {"EXLLAMA_NO_FLASH_ATTN": "1", "EXLLAMA_NO_XFORMERS": "1", "EXLLAMA_NO_SDPA": "1"},
}
UPSTREAM_UNPAGED = ("upstream exllamav2 batches (pages) only through flash-attn; without it the dynamic "
                    "generator runs paged=False, one job at a time")
PAGE = 256                      # the dynamic generator's page size; cache lengths are multiples of it

TARGET_VS_UPSTREAM = 1.0        # ours / upstream decode tokens/s at batch 1
TARGET_VS_FLASH = 0.9           # sdpa or xformers / flash_attn decode tokens/s (within 10%)
TARGET_BATCH, TARGET_BATCH_GAIN = 8, 3.0   # generator batch-8 / batch-1 tokens/s, non-flash paged path

MEASUREMENT_DEFAULTS = {        # full run / --dry-run
    "prompt_len": (2048, 64),
    "decode_len": (128, 6),
    "gen_prompt_len": (512, 16),
    "repeats": (5, 1),
    "warmup": (2, 1),
    "warmup_steps": (4, 1),
    "copy_mib": (1024, 16),
}
FORWARDED = ("prompt_len", "decode_len", "gen_prompt_len", "batch_sizes", "repeats", "warmup", "warmup_steps", "seed")


# roofline arithmetic --------------------------------------------------------------------------------


def kv_bytes_per_position(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
    """Bytes of keys and values one cached position holds across all layers."""
    return layers * kv_heads * head_dim * 2 * dtype_bytes


def decode_bytes_per_token(weight_bytes: int, kv_per_position: int, context: float, batch: int) -> float:
    """Bytes a decode step reads per token it produces: the weights once per step, shared by the
    batch, plus the token's own sequence's KV at `context` positions."""
    return weight_bytes / batch + kv_per_position * context


def roofline_tokens_per_s(bandwidth: float, bytes_per_token: float) -> float:
    return bandwidth / bytes_per_token


def copy_bandwidth(nbytes: int, seconds: float) -> float:
    """Bytes/s of a copy of nbytes: it reads nbytes and writes nbytes."""
    return 2 * nbytes / seconds


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# timing -----------------------------------------------------------------------------------------------


def stamp(device) -> float:
    """A host clock reading after all queued work on `device` has finished."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(fn: Callable[[], Any], device) -> float:
    """Seconds `fn` takes, all its device work included."""
    start = stamp(device)
    fn()
    return stamp(device) - start


def event_timed(fn: Callable[[], Any], device) -> float:
    """Seconds of `fn`'s work on the current CUDA stream, from events (host clock on the CPU)."""
    import torch

    if device.type != "cuda":
        return timed(fn, device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


def measure_copy_bandwidth(device, nbytes: int, repeats: int, warmup: int = 3) -> dict:
    """Median bandwidth of copying a random nbytes buffer into another on `device`."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device, generator=gen)
    dst = torch.empty_like(src)
    seconds = [event_timed(lambda: dst.copy_(src), device) for _ in range(warmup + repeats)][warmup:]
    if not torch.equal(dst, src):
        raise RuntimeError("the bandwidth copy did not reproduce its source")
    src.set_()          # free both buffers before emptying the cache
    dst.set_()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "bytes_per_s": copy_bandwidth(nbytes, statistics.median(seconds)),
        "method": f"{'device-to-device' if device.type == 'cuda' else 'host'} copy of {nbytes} bytes, "
                  f"read + write counted, median of {repeats}",
        "samples_s": seconds,
    }


# the child: one package, one backend ------------------------------------------------------------------


def random_prompts(vocab: int, count: int, length: int, seed: int, stream: int) -> list:
    """`count` prompts (1, length) of ordinary token ids, the same for both packages."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + stream)
    return [torch.randint(0, vocab, (1, length), generator=gen) for _ in range(count)]


def greedy_token(logits):
    return logits[:, -1].argmax(-1, keepdim=True).cpu()


def measure_prefill(model, cache, prompt, args, device) -> dict:
    def run():
        cache.current_seq_len = 0
        model.forward(prompt, cache, last_id_only=True)

    seconds = [timed(run, device) for _ in range(args.warmup + args.repeats)][args.warmup:]
    tokens = prompt.shape[1]
    return {"status": "ok", "tokens": tokens, "tokens_per_s": tokens / statistics.median(seconds), "samples_s": seconds}


def measure_decode(model, cache, prompt, args, device) -> dict:
    """Batch-1 greedy decode after the prompt, one model.forward per token."""
    seconds, first = [], None
    for _ in range(args.warmup + args.repeats):
        cache.current_seq_len = 0
        token = greedy_token(model.forward(prompt, cache, last_id_only=True))
        tokens: list[int] = []

        def steps():
            nonlocal token
            for _ in range(args.decode_len):
                token = greedy_token(model.forward(token, cache))
                tokens.append(int(token))

        seconds.append(timed(steps, device))
        first = first or tokens[:16]
    seconds = seconds[args.warmup:]
    return {
        "status": "ok", "batch": 1, "tokens": args.decode_len,
        "tokens_per_s": args.decode_len / statistics.median(seconds),
        "mean_context": prompt.shape[1] + (args.decode_len + 1) / 2,
        "samples_s": seconds, "first_tokens": first,
    }


def decode_window(gen, jobs: list, prompt_len: int, warmup_steps: int, device) -> dict:
    """Run the jobs to the end; time the generator's steps from `warmup_steps` after every job has
    its first token to the first step in which a job finishes: every step between is a full batch."""
    gen.enqueue(jobs)
    marks: list[tuple[float, list[int], bool]] = []
    finished = False
    while gen.num_remaining_jobs():
        results = gen.iterate()
        finished = finished or any(r.get("eos") for r in results)
        marks.append((stamp(device), [max(j.new_tokens, 0) for j in jobs], finished))
    started = next((i for i, (_, counts, _) in enumerate(marks) if min(counts) >= 1), None)
    end = next(i for i, (_, _, done) in enumerate(marks) if done)
    if started is None or end <= started + warmup_steps:
        raise RuntimeError("no full-batch decode steps were timed; raise --decode-len")
    (t0, c0, _), (t1, c1, _) = marks[started + warmup_steps], marks[end]
    return {
        "tokens": sum(c1) - sum(c0),
        "seconds": t1 - t0,
        "steps": end - started - warmup_steps,
        "mean_context": prompt_len + (statistics.mean(c0) + statistics.mean(c1)) / 2,
    }


def measure_generator(model, tokenizer, args, vocab: int, paged: bool, unpaged_reason: str, device) -> dict:
    from exllamav2 import ExLlamaV2Cache
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

    top = max(args.batch_sizes) if paged else 1
    new_tokens = generator_new_tokens(args, top)
    cache = ExLlamaV2Cache(model, max_seq_len=top * round_up(args.gen_prompt_len + new_tokens + 1, PAGE))
    gen = ExLlamaV2DynamicGenerator(model, cache, tokenizer, max_batch_size=top, max_chunk_size=chunk_size(args),
                                    paged=paged)
    settings = ExLlamaV2Sampler.Settings.greedy()
    out: dict[str, dict] = {}
    stream = 1
    for batch in args.batch_sizes:
        key = f"generator_b{batch}"
        if batch > top:
            out[key] = {"status": "unsupported", "batch": batch, "reason": unpaged_reason}
            continue
        windows = []
        for _ in range(args.warmup + args.repeats):
            stream += 1
            prompts = random_prompts(vocab, batch, args.gen_prompt_len, args.seed, stream)
            jobs = [ExLlamaV2DynamicJob(input_ids=ids, max_new_tokens=new_tokens, gen_settings=settings,
                                        stop_conditions=[]) for ids in prompts]
            windows.append(decode_window(gen, jobs, args.gen_prompt_len, args.warmup_steps, device))
            gen.reset_page_table()
        windows = windows[args.warmup:]
        rates = [w["tokens"] / w["seconds"] for w in windows]
        out[key] = {
            "status": "ok", "batch": batch, "tokens_per_s": statistics.median(rates),
            "mean_context": statistics.median(w["mean_context"] for w in windows),
            "samples_tokens_per_s": rates, "windows": windows, "paged": paged,
        }
    del gen, cache
    return out


def chunk_size(args) -> int:
    """The generator's prefill chunk: the prompt length (the model's max_input_len), rounded down to
    whole pages as upstream's paged generator requires."""
    return args.prompt_len // PAGE * PAGE or args.prompt_len


def generator_new_tokens(args, top: int) -> int:
    """Tokens per generator job: the timed steps, the warm-up steps, and the steps the first jobs
    decode while the prompts of the later ones are still being prefilled."""
    stagger = -(-top * args.gen_prompt_len // chunk_size(args))
    return args.decode_len + args.warmup_steps + stagger + 1


def upstream_backend_problem(backend: str) -> str | None:
    """Why upstream exllamav2 (imported in this process) would not run `backend`, or None."""
    from exllamav2 import attn

    flags = {name: bool(getattr(attn, name)) for name in ("has_flash_attn", "has_xformers", "has_lower_right_sdpa")}
    usable = {"flash_attn": flags["has_flash_attn"], "xformers": flags["has_xformers"],
              "sdpa": flags["has_lower_right_sdpa"], "matmul": True}
    if usable[backend]:
        return None
    return f"upstream exllamav2 cannot use {backend} here ({', '.join(f'{k}={v}' for k, v in flags.items())})"


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("flash_attn", "xformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def worker(args: argparse.Namespace) -> dict:
    import torch

    import exllamav2
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer

    expected = REPO if args.worker == "ours" else Path(args.upstream_site).resolve()
    found = Path(exllamav2.__file__).resolve().parent
    if found.parent != expected:
        raise RuntimeError(f"{args.worker}: imported exllamav2 from {found}, expected it under {expected}")
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    spec = json.loads((args.model_dir / "bench_model.json").read_text(encoding="utf-8"))["spec"]
    vocab = spec["vocab_size"] - spec["num_special_tokens"]
    run: dict[str, Any] = {
        "package": args.worker, "backend": args.backend, "status": "ok", "exllamav2_path": str(found),
        "exllamav2_version": exllamav2.__version__, "torch": torch.__version__, "device": str(device),
        "attention_packages": package_versions(),
    }

    config = ExLlamaV2Config(str(args.model_dir))
    config.max_input_len = args.prompt_len
    config.max_attention_size = args.prompt_len**2
    gen_len = args.gen_prompt_len + generator_new_tokens(args, max(args.batch_sizes)) + 1
    config.max_seq_len = round_up(max(args.prompt_len + args.decode_len + 1, gen_len), PAGE)
    if args.worker == "ours":
        from exllamav2.attn import AttentionConfigError

        try:
            model = ExLlamaV2(config)
        except AttentionConfigError as error:
            return {**run, "status": "unavailable", "reason": str(error)}
        paged, unpaged_reason = True, ""
    else:
        problem = upstream_backend_problem(args.backend)
        if problem:
            return {**run, "status": "unavailable", "reason": problem}
        model = ExLlamaV2(config)
        from exllamav2 import attn

        paged, unpaged_reason = args.backend == "flash_attn" and attn.has_flash_attn_with_paged, UPSTREAM_UNPAGED
    model.load()
    run["attention"], run["kernels"] = describe_runtime(args, model, device)
    tokenizer = ExLlamaV2Tokenizer(config)

    with torch.inference_mode():
        prompt = random_prompts(vocab, 1, args.prompt_len, args.seed, 0)[0]
        cache = ExLlamaV2Cache(model, max_seq_len=round_up(args.prompt_len + args.decode_len + 1, PAGE))
        run["measurements"] = {
            "prefill": measure_prefill(model, cache, prompt, args, device),
            "decode_b1": measure_decode(model, cache, prompt, args, device),
        }
        del cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
        run["measurements"].update(measure_generator(model, tokenizer, args, vocab, paged, unpaged_reason, device))
    return run


def describe_runtime(args, model, device) -> tuple[dict, str]:
    """(what attention runs, whether the compiled extension loaded) for the loaded model."""
    if args.worker == "upstream":
        from exllamav2 import attn

        flags = {name: bool(getattr(attn, name)) for name in
                 ("has_flash_attn", "has_flash_attn_with_paged", "has_xformers", "has_lower_right_sdpa")}
        return {"backend": args.backend, "flags": flags}, "ext loaded"   # upstream cannot run without it
    plan = [p.as_dict() for p in model.attn_plan.devices]
    attention = {"backend": plan[0]["backend"], "paged_impl": plan[0]["paged_impl"],
                 "summary": model.attn_plan.summary()}
    if device.type != "cuda":
        return attention, "torch only (cpu)"
    from exllamav2 import ext

    return attention, "ext loaded" if ext.load_extension() else f"torch only ({ext.unavailable_reason()})"


# the parent -------------------------------------------------------------------------------------------


def worker_env(args: argparse.Namespace, package: str, backend: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ATTN_VARS}
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    if package == "ours":
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *paths])
        env["EXLLAMA_ATTN_BACKEND"] = backend
    else:
        site = Path(args.upstream_site).resolve()
        env["PYTHONPATH"] = os.pathsep.join([str(site), *paths])
        env.update(UPSTREAM_ENV[backend])
        if (site / "bin").is_dir():             # ninja installed into the target, for the JIT build
            env["PATH"] = os.pathsep.join([str(site / "bin"), env.get("PATH", "")])
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_worker(args: argparse.Namespace, package: str, backend: str, model_dir: Path, log_dir: Path) -> dict:
    name = f"{package}-{backend}"
    result_path, log_path = log_dir / f"{name}.json", log_dir / f"{name}.log"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", package, "--backend", backend,
           "--model-dir", str(model_dir), "--result", str(result_path)]
    for option in FORWARDED:
        value = getattr(args, option)
        cmd += [f"--{option.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    if args.upstream_site:
        cmd += ["--upstream-site", str(args.upstream_site)]
    log.info("%s: running (log: %s)", name, log_path)
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as out:
        try:
            rc = subprocess.run(cmd, env=worker_env(args, package, backend), stdout=out, stderr=subprocess.STDOUT,
                                timeout=args.worker_timeout).returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {args.worker_timeout} s"
    wall = round(time.perf_counter() - start, 1)
    if rc != 0 or not result_path.is_file():
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        log.warning("%s failed (%s); the end of its log:\n%s", name, rc, tail)
        return {"package": package, "backend": backend, "status": "failed", "reason": f"exit {rc}",
                "log": str(log_path), "log_tail": tail, "wall_s": wall}
    run = json.loads(result_path.read_text(encoding="utf-8"))
    run.update(log=str(log_path), wall_s=wall)
    log.info("%s: %s in %.0f s", name, run["status"], wall)
    return run


def add_roofline(run: dict, weight_bytes: int, kv_per_position: int, bandwidth: float) -> None:
    for key, m in run.get("measurements", {}).items():
        if key == "prefill" or m.get("status") != "ok":
            continue
        m["bytes_per_token"] = decode_bytes_per_token(weight_bytes, kv_per_position, m["mean_context"], m["batch"])
        m["roofline_tokens_per_s"] = roofline_tokens_per_s(bandwidth, m["bytes_per_token"])
        m["fraction_of_roofline"] = m["tokens_per_s"] / m["roofline_tokens_per_s"]


def tokens_per_s(runs: list[dict], package: str, backend: str, metric: str) -> float | None:
    for run in runs:
        if run["package"] == package and run["backend"] == backend and run["status"] == "ok":
            m = run["measurements"].get(metric, {})
            return m.get("tokens_per_s") if m.get("status") == "ok" else None
    return None


def ratio_entry(name: str, num: float | None, den: float | None, target: float | None) -> dict:
    value = num / den if num is not None and den is not None else None
    meets = None if value is None or target is None else value >= target
    missing = [side for side, v in (("numerator", num), ("denominator", den)) if v is None]
    return {"name": name, "value": value, "target": target, "meets": meets, "missing": missing}


def compute_ratios(runs: list[dict], batch_sizes: list[int]) -> list[dict]:
    """The target ratios (and where a side is missing, an entry saying which)."""
    def tps(package: str, backend: str, metric: str) -> float | None:
        return tokens_per_s(runs, package, backend, metric)

    out = []
    for backend in BACKENDS:
        out.append(ratio_entry(f"decode b1 ours/upstream, {backend}",
                               tps("ours", backend, "decode_b1"), tps("upstream", backend, "decode_b1"),
                               TARGET_VS_UPSTREAM))
    best = {p: max((v for b in BACKENDS if (v := tps(p, b, "decode_b1")) is not None), default=None) for p in PACKAGES}
    out.append(ratio_entry("decode b1 ours/upstream, fastest backend of each", best["ours"], best["upstream"],
                           TARGET_VS_UPSTREAM))
    metrics = ["decode_b1", *(f"generator_b{b}" for b in batch_sizes)]
    for backend in ("sdpa", "xformers"):
        for metric in metrics:
            out.append(ratio_entry(f"{metric} {backend}/flash_attn, ours", tps("ours", backend, metric),
                                   tps("ours", "flash_attn", metric), TARGET_VS_FLASH))
    top = max(batch_sizes)
    if top > 1 and 1 in batch_sizes:
        for package, backend in [("ours", b) for b in BACKENDS] + [("upstream", "flash_attn")]:
            gated = package == "ours" and backend != "flash_attn" and top == TARGET_BATCH
            target = TARGET_BATCH_GAIN if gated else None
            out.append(ratio_entry(f"generator b{top}/b1, {package} {backend}",
                                   tps(package, backend, f"generator_b{top}"),
                                   tps(package, backend, "generator_b1"), target))
    return out


def device_info(device) -> dict:
    import torch

    info: dict[str, Any] = {
        "device": str(device), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count, memory_bytes=props.total_memory,
                    driver=nvidia_driver())
    else:
        info.update(name=cpu_name(), capability=None, threads=torch.get_num_threads())
    return info


def nvidia_driver() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


# the report -------------------------------------------------------------------------------------------


def _cell(m: dict | None, with_roof: bool) -> str:
    if not m:
        return "-"
    if m.get("status") != "ok":
        return m.get("status", "-")
    text = f"{m['tokens_per_s']:.1f}"
    if with_roof and "fraction_of_roofline" in m:
        text += f" ({100 * m['fraction_of_roofline']:.0f}%)"
    return text


def render_table(result: dict) -> str:
    dev, model, bw, s = result["device"], result["model"], result["bandwidth"], result["settings"]
    gib = 1024**3
    where = f"{dev['name']} (CPU)"
    if dev["capability"]:
        where = (f"{dev['name']} (sm_{dev['capability'].replace('.', '')}, {dev['multiprocessors']} SMs, "
                 f"{dev['memory_bytes'] / gib:.1f} GiB, driver {dev['driver']})")
    spec = model["spec"]
    lines = [
        f"device: {where}; torch {dev['torch']}, CUDA {dev['cuda']}, python {dev['python']}",
        f"model: layers {spec['num_hidden_layers']}, hidden {spec['hidden_size']}, MLP {spec['intermediate_size']}, "
        f"heads {spec['num_attention_heads']}/{spec['num_key_value_heads']}, vocab {spec['vocab_size']}; "
        f"EXL2 {model['layers_bpw']:.3f} bpw layers (target {spec['bits']}), {spec['head_bits']}-bit head; "
        f"{model['weight_bytes'] / 1e9:.3f} GB weights per step, "
        f"KV {model['kv_bytes_per_position'] / 1024:.1f} KiB/position",
        f"bandwidth: {bw['bytes_per_s'] / 1e9:.1f} GB/s ({bw['method']})",
        f"settings: prompt {s['prompt_len']}, decode {s['decode_len']} steps, generator prompts {s['gen_prompt_len']}, "
        f"batches {s['batch_sizes']}; median of {s['repeats']} after {s['warmup']} warm-up",
        "",
    ]
    gens = [f"generator_b{b}" for b in s["batch_sizes"]]
    head = f"{'package':<9}{'backend':<11}{'kernels':<15}{'prefill t/s':>12}{'decode b1 t/s (roof)':>22}"
    head += "".join(f"{'gen b' + k.split('_b')[1] + ' t/s (roof)':>22}" for k in gens)
    lines.append(head)
    notes = []
    for run in result["runs"]:
        row = f"{run['package']:<9}{run['backend']:<11}"
        if run["status"] != "ok":
            lines.append(row + f"{run['status']}: see below")
            notes.append(f"  {run['package']} {run['backend']}: {run['status']}: {run.get('reason', '')}")
            continue
        m = run["measurements"]
        kernels = run["kernels"] if len(run["kernels"]) <= 14 else run["kernels"][:13] + "…"
        if kernels != run["kernels"]:
            notes.append(f"  {run['package']} {run['backend']} kernels: {run['kernels']}")
        row += f"{kernels:<15}{_cell(m['prefill'], False):>12}{_cell(m['decode_b1'], True):>22}"
        row += "".join(f"{_cell(m.get(k), True):>22}" for k in gens)
        lines.append(row)
        for k in gens:
            if m.get(k, {}).get("status") == "unsupported":
                notes.append(f"  {run['package']} {run['backend']} {k}: {m[k]['reason']}")
    lines.append("(roof) = measured / memory-bandwidth roofline at the run's batch and mean context")
    if notes:
        lines += ["", "notes:", *notes]
    lines += ["", "targets:"]
    for r in result["ratios"]:
        if r["value"] is None:
            lines.append(f"  {r['name']:<52} n/a ({' and '.join(r['missing'])} not measured)")
        else:
            verdict = ("" if r["target"] is None
                       else f"  target >= {r['target']:.2f}: {'met' if r['meets'] else 'MISSED'}")
            lines.append(f"  {r['name']:<52} {r['value']:6.2f}x{verdict}")
    if result["warnings"]:
        lines += ["", "warnings:", *(f"  {w}" for w in result["warnings"])]
    agree = result.get("first_tokens_agree")
    if agree:
        lines += ["", "first greedy tokens, ours vs upstream (same backend): "
                  + ", ".join(f"{b}: {'same' if v else 'differ'}" for b, v in agree.items())]
    return "\n".join(lines)


def first_tokens_agree(runs: list[dict]) -> dict[str, bool]:
    seen: dict[str, dict[str, list]] = {}
    for run in runs:
        if run["status"] == "ok":
            seen.setdefault(run["backend"], {})[run["package"]] = run["measurements"]["decode_b1"]["first_tokens"]
    return {b: p["ours"] == p["upstream"] for b, p in seen.items() if len(p) == 2}


# arguments --------------------------------------------------------------------------------------------


def _names(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{what} {', '.join(bad) or '(none)'}: choose from {', '.join(allowed)}")
    return names


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes {text!r}: give comma-separated integers, e.g. 1,8") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"batch sizes {text!r}: give positive integers, e.g. 1,8")
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="tiny model on the CPU with short runs: exercises every code path without a GPU")
    p.add_argument("--model-dir", type=Path,
                   help="make the benchmark model here, or reuse the one there (default: a temporary directory)")
    p.add_argument("--layers", type=int, help="decoder layers (default 32; 2 with --dry-run)")
    p.add_argument("--bits", type=float, default=4.0, help="target bits per weight of the layers (default 4.0)")
    p.add_argument("--head-bits", type=int, default=6, help="bits of the output head, as the converter's -hb")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the prompts")
    p.add_argument("--backends", type=lambda t: _names(t, BACKENDS, "backend"), default=list(BACKENDS),
                   help=f"attention backends to run (default {','.join(BACKENDS)})")
    p.add_argument("--packages", type=lambda t: _names(t, PACKAGES, "package"),
                   help="ours, upstream or both (default: both when --upstream-site is given, else ours)")
    p.add_argument("--upstream-site", type=Path,
                   help="directory holding upstream exllamav2==0.3.2 "
                        "(pip install --target DIR --no-deps exllamav2==0.3.2)")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=[1, 8], help="generator batch sizes (default 1,8)")
    for name, (full, dry) in MEASUREMENT_DEFAULTS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"default {full} ({dry} with --dry-run)")
    p.add_argument("--json", type=Path, default=Path("bench_gpu.json"), help="result file (default ./bench_gpu.json)")
    p.add_argument("--worker-timeout", type=int, default=3600, help="seconds one package/backend run may take")
    p.add_argument("--worker", choices=PACKAGES, help=argparse.SUPPRESS)
    p.add_argument("--backend", choices=BACKENDS, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, (full, dry) in MEASUREMENT_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, dry if args.dry_run else full)
        if getattr(args, name) < (0 if name in ("warmup", "warmup_steps") else 1):
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.packages is None:
        args.packages = ["ours", "upstream"] if args.upstream_site else ["ours"]
    if "upstream" in args.packages and not args.worker:
        if args.dry_run:
            p.error("--dry-run runs on the CPU, where upstream exllamav2 cannot run; drop --upstream-site")
        if not args.upstream_site or not (args.upstream_site / "exllamav2" / "__init__.py").is_file():
            p.error(f"upstream needs --upstream-site DIR holding exllamav2/ (got {args.upstream_site}); create it "
                    f"with: pip install --target DIR --no-deps exllamav2==0.3.2")
    return args


def model_spec(args: argparse.Namespace):
    from make_bench_model import LLAMA3_8B, TINY

    spec = replace(TINY if args.dry_run else LLAMA3_8B, bits=args.bits, head_bits=args.head_bits, seed=args.seed)
    return replace(spec, num_hidden_layers=args.layers) if args.layers else spec


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        args.result.write_text(json.dumps(worker(args), indent=2), encoding="utf-8")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(f"bench_gpu.py needs a CUDA GPU: torch {torch.__version__} (CUDA {torch.version.cuda}) sees none. "
              f"Run it on a machine with an NVIDIA GPU, or pass --dry-run to exercise it on the CPU.", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))          # the model is made with this repository's converter
    from make_bench_model import ensure_model, weight_bytes_per_step

    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    spec = model_spec(args)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_model_") as tmp:
        model_dir = (args.model_dir or Path(tmp)).resolve()
        marker = ensure_model(model_dir, spec, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model = {
            **marker, "dir": str(model_dir), "weight_bytes": weight_bytes_per_step(model_dir),
            "kv_bytes_per_position": kv_bytes_per_position(spec.num_hidden_layers, spec.num_key_value_heads,
                                                           spec.head_dim),
        }
        bandwidth = measure_copy_bandwidth(device, args.copy_mib * 2**20, max(args.repeats, 5))
        log_dir = args.json.resolve().parent / f"{args.json.stem}-logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        runs = [run_worker(args, package, backend, model_dir, log_dir)
                for backend in args.backends for package in args.packages]
    for run in runs:
        add_roofline(run, model["weight_bytes"], model["kv_bytes_per_position"], bandwidth["bytes_per_s"])
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("worker", "backend", "result")}
    # a child importing another torch (e.g. one installed into --upstream-site) would not be comparable
    warnings = [f"{r['package']} {r['backend']} ran torch {r['torch']}, this process torch {torch.__version__}"
                for r in runs if r.get("torch", torch.__version__) != torch.__version__]
    result = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "settings": settings, "device": device_info(device),
        "model": model, "bandwidth": bandwidth, "runs": runs, "warnings": warnings,
        "ratios": compute_ratios(runs, args.batch_sizes), "first_tokens_agree": first_tokens_agree(runs),
    }
    args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(render_table(result))
    print(f"\nresults: {args.json}")
    return 1 if any(run["status"] == "failed" for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
