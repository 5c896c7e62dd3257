"""bench_cpu.py's report: the machine, one markdown table per batch size, the issue-16 targets, greedy agreement.

`results` maps (row label, threads) to that row's aggregated child result (see bench_cpu.worker); every number in
the tables comes from it and from the measured read bandwidth per thread count.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path
from typing import Callable

FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16")
REFERENCE = "transformers float32 eager"       # greedy agreement is checked against this row


def cpu_flags() -> tuple[str, list[str]]:
    """(CPU model name, the FLAGS it has)."""
    name, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name is None:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name or platform.processor() or "unknown cpu", [f for f in FLAGS if f in flags]


def device_info() -> dict:
    import torch

    name, flags = cpu_flags()
    try:
        from exllamav2 import ext          # internal module: the report still runs if it has moved

        kernels = ext.cpu_kernels()
        isa = kernels.isa() if kernels is not None else "unavailable"
    except Exception as e:                  # noqa: BLE001  (any failure here only loses one header field)
        isa = f"unknown ({type(e).__name__})"
    return {"device": "cpu", "cpu": name, "cpu_flags": flags, "logical_cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "our_cpu_kernels": isa,
            "load_average_at_start": os.getloadavg()}


def settings(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in ("threads", "batch_sizes", "prompt_len", "decode_len", "repeats", "rounds",
                                          "aggregate", "seed", "tiny")}


class Table:
    """Lookups over the aggregated results: metrics, roofline shares, transformers' fastest, llama.cpp pairs."""

    def __init__(self, args: argparse.Namespace, variants: list[dict], results: dict, bandwidth: dict) -> None:
        self.args, self.results, self.bandwidth = args, results, bandwidth
        self.variants = {v["label"]: v for v in variants}
        self.transformers = [v["label"] for v in variants if v["library"] == "transformers"]

    def get(self, label: str, threads: int, batch: int, key: str) -> float | None:
        r = self.results.get((label, threads))
        return r["batches"][str(batch)].get(key) if r else None

    def step_bytes(self, label: str, threads: int, batch: int) -> float | None:
        """Bytes a decode step reads: the weights once for the whole batch and each sequence's KV cache at the
        mean decode context."""
        r = self.results.get((label, threads))
        if r is None:
            return None
        context = self.args.prompt_len + self.variants[label].get("decode_len", self.args.decode_len) / 2
        return r["weight_bytes"] + batch * r["batches"][str(batch)]["kv_bytes_per_position"] * context

    def roofline(self, label: str, threads: int, batch: int) -> float | None:
        """Decode's share of the bandwidth ceiling: steps/s x bytes a step reads / the run's read bandwidth."""
        step_bytes, tok_s = self.step_bytes(label, threads, batch), self.get(label, threads, batch,
                                                                             "decode_tokens_per_s")
        if step_bytes is None or threads not in self.bandwidth:
            return None
        return tok_s / batch * step_bytes / (self.bandwidth[threads] * 1e9)

    def roofline_beside(self, label: str, threads: int, batch: int) -> float | None:
        """The same share, each round against the bandwidth measured in the row's own process right after its
        runs (the median over rounds): what other jobs on a shared machine left at the time."""
        step_bytes = self.step_bytes(label, threads, batch)
        per_gb_s = self.get(label, threads, batch, "decode_per_beside_gb_s") if step_bytes else None
        return per_gb_s / batch * step_bytes / 1e9 if per_gb_s else None

    def fastest(self, threads: int, batch: int, key: str) -> tuple[float, str] | None:
        """transformers' fastest configuration for one metric: (value, its label)."""
        got = [(self.get(lb, threads, batch, key), lb) for lb in self.transformers]
        got = [g for g in got if g[0] is not None]
        return max(got) if got else None

    def counterpart(self, label: str) -> str | None:
        """The llama.cpp row nearest in size to one of ours: FP16 - F16, 6 and 8 bpw - Q8_0, below - Q4_0."""
        v = self.variants[label]
        if v["library"] != "exllamav2":
            return None
        gguf_type = "F16" if "bpw" not in v else ("Q8_0" if v["bpw"] >= 6 else "Q4_0")
        return f"llama.cpp {gguf_type}" if f"llama.cpp {gguf_type}" in self.variants else None

    def ratio(self, label: str, other: str | None, threads: int, batch: int, key: str) -> float | None:
        a = self.get(label, threads, batch, key)
        b = self.get(other, threads, batch, key) if other else None
        return a / b if a is not None and b else None


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def _short(label: str) -> str:
    return label.removeprefix("transformers ").replace("float32", "fp32").replace("bfloat16", "bf16") \
        .replace("float16", "fp16")


def _row(tab: Table, label: str, batch: int, name: str | None = None) -> str:
    ts, r = tab.args.threads, tab.results.get((label, tab.args.threads[0]), {})
    other = tab.counterpart(label)
    cells = [name or label, r.get("version", "-")]
    cells += [_num(tab.get(label, t, batch, "decode_tokens_per_s")) for t in ts]
    cells += [_num(tab.get(label, t, batch, "prefill_tokens_per_s"), ".0f") for t in ts]
    cells += [_num(tab.roofline(label, t, batch), ".0%") for t in ts]
    cells += [_num(tab.roofline_beside(label, t, batch), ".0%") for t in ts]
    llama = " / ".join(_num(tab.ratio(label, other, t, batch, "decode_tokens_per_s"), ".2f") for t in ts)
    cells.append(f"{llama} ({other.removeprefix('llama.cpp ')})" if other else "-")
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s"):
        ratios = []
        for t in ts:
            best = tab.fastest(t, batch, key)
            ratios.append(_num(tab.ratio(label, best[1] if best else None, t, batch, key), ".2f"))
        cells.append(" / ".join(ratios))
    cells += [_num(max((tab.results.get((label, t)) or {}).get("peak_rss_mib", 0) for t in ts), ".0f"),
              f"{r.get('dtype', '-')} / {r.get('attention', '-')}"]
    return "| " + " | ".join(cells) + " |"


def _fastest_row(tab: Table, batch: int) -> str:
    """transformers' fastest per column, each cell naming the configuration that gave it."""
    ts = tab.args.threads
    cells = ["transformers, fastest per column", tab.results[(tab.transformers[0], ts[0])]["version"]]
    for key, fmt in (("decode_tokens_per_s", ".1f"), ("prefill_tokens_per_s", ".0f")):
        for t in ts:
            best = tab.fastest(t, batch, key)
            cells.append(f"{best[0]:{fmt}} ({_short(best[1])})" if best else "-")
    for share in (tab.roofline, tab.roofline_beside):
        for t in ts:
            best = tab.fastest(t, batch, "decode_tokens_per_s")
            cells.append(_num(share(best[1], t, batch), ".0%") if best else "-")
    ones = " / ".join("1.00" for _ in ts)
    cells += ["-", ones, ones, "-", "-"]
    return "| " + " | ".join(cells) + " |"


def batch_table(tab: Table, batch: int) -> list[str]:
    ts = "/".join(f"{t}t" for t in tab.args.threads)
    per_t = [f"{what} {t}t" for what in ("decode tok/s", "prefill tok/s", "roofline", "roofline beside")
             for t in tab.args.threads]
    head = (["system", "version"] + per_t + [f"decode ÷ llama.cpp ({ts})", f"decode ÷ transformers fastest ({ts})",
            f"prefill ÷ transformers fastest ({ts})", "peak RSS MiB", "dtype / attention"])
    lines = [f"### batch {batch}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in tab.variants:
        if tab.variants[label]["library"] != "transformers" and (label, tab.args.threads[0]) in tab.results:
            lines.append(_row(tab, label, batch))
    if tab.transformers and (tab.transformers[0], tab.args.threads[0]) in tab.results:
        lines.append(_fastest_row(tab, batch))
        lines += [_row(tab, label, batch) for label in tab.transformers]
    return lines + [""]


def _verdict(ratio: float | None, goal: float, fmt: str = ".2f") -> str:
    if ratio is None:
        return "n/a"
    if ratio >= goal:
        return f"{ratio:{fmt}} (met)"
    short = 1 - ratio / goal
    return f"{ratio:{fmt}} (missed by {'<1%' if short < 0.005 else format(short, '.0%')})"


def targets(tab: Table) -> list[str]:
    """Issue 16's targets at every batch size and thread count measured: each a ratio and its goal."""
    where = [(b, t) for b in tab.args.batch_sizes for t in tab.args.threads]
    checks = []

    def fastest(key: str) -> Callable[[int, int], str | None]:
        return lambda b, t: (tab.fastest(t, b, key) or (None, None))[1]

    for bpw, gguf_type in ((4.0, "Q4_0"), (8.0, "Q8_0")):
        ours = f"exllamav2 EXL2 {bpw:.1f} bpw"
        checks.append((f"{ours} decode ≥ llama.cpp {gguf_type}", ours, lambda b, t, g=gguf_type: f"llama.cpp {g}",
                       "decode_tokens_per_s", 1.0))
    checks.append(("exllamav2 FP16 decode ≥ llama.cpp F16", "exllamav2 FP16", lambda b, t: "llama.cpp F16",
                   "decode_tokens_per_s", 1.0))
    checks.append(("exllamav2 FP16 decode ≥ 1.5× transformers' fastest", "exllamav2 FP16",
                   fastest("decode_tokens_per_s"), "decode_tokens_per_s", 1.5))
    for label in [lb for lb, v in tab.variants.items() if v["library"] == "exllamav2" and v.get("kernels", True)]:
        checks.append((f"{label} prefill ≥ transformers' fastest", label, fastest("prefill_tokens_per_s"),
                       "prefill_tokens_per_s", 1.0))
    lines = ["### targets (issue 16): ratio per batch size and thread count", ""]
    for text, ours, other, key, goal in checks:
        if ours not in tab.variants:
            continue
        cells = [f"b{b} {t}t {_verdict(tab.ratio(ours, other(b, t), t, b, key), goal)}" for b, t in where]
        lines.append(f"- {text}: " + ", ".join(cells))
    for what, share in (("the run's read bandwidth", tab.roofline),
                        ("the bandwidth beside each row", tab.roofline_beside)):
        roof = [f"b{b} {t}t {_verdict(share('exllamav2 EXL2 4.0 bpw', t, b), 0.6, '.0%')}" for b, t in where]
        if "exllamav2 EXL2 4.0 bpw" in tab.variants:
            lines.append(f"- exllamav2 EXL2 4.0 bpw decode ≥ 60% of the roofline ({what}): " + ", ".join(roof))
    return lines + [""]


def agreement(tab: Table) -> list[str]:
    """Greedy tokens of sequence 0 against transformers fp32 eager, and each row's batch-8 sequence 0 against its
    own batch 1 (the same prompt): a check that every batched path decodes what its single path does."""
    t, batches = tab.args.threads[0], [str(b) for b in tab.args.batch_sizes]
    ref = tab.results.get((REFERENCE, t))
    same, differ, unbatched = [], [], []
    for label in tab.variants:
        r = tab.results.get((label, t))
        if r is None:
            continue
        first = r["batches"][batches[0]]["first_greedy_tokens"]
        if ref is not None and label != REFERENCE:
            (same if first == ref["batches"][batches[0]]["first_greedy_tokens"] else differ).append(_short(label))
        if any(r["batches"][b]["first_greedy_tokens"] != first for b in batches[1:]):
            unbatched.append(_short(label))
    lines = []
    if ref is not None:
        lines.append(f"first 8 greedy tokens ({t} thread(s), batch {batches[0]}, sequence 0) equal to {REFERENCE}'s: "
                     f"{', '.join(same) or 'none'}; differ (expected for quantized weights and 16-bit "
                     f"arithmetic on random weights): {', '.join(differ) or 'none'}")
    if len(batches) > 1:
        lines.append(f"sequence 0 decodes the same at batch {', '.join(batches)}: "
                     + ("every row" if not unbatched else f"every row but {', '.join(unbatched)}"))
    return lines


def header(device: dict, prepared: dict, args: argparse.Namespace, results: dict, bandwidth: dict) -> list[str]:
    versions = sorted({r["version"] for r in results.values()})
    info = next((r["system_info"] for r in results.values() if r.get("system_info")), None)
    bw = ", ".join(f"{bandwidth[t]:.1f} GB/s at {t} thread(s)" for t in sorted(bandwidth))
    loads = [x for r in results.values() for x in r.get("load_averages", [0.0])]
    lines = [
        f"CPU: {device['cpu']} ({device['logical_cores']} logical cores; {', '.join(device['cpu_flags'])}); "
        f"our CPU kernels: {device['our_cpu_kernels']}; load average {device['load_average_at_start'][0]:.1f} at "
        f"start, {device['load_average_at_end'][0]:.1f} at end, {min(loads):.1f}-{max(loads):.1f} at the end "
        f"of the rows' processes (on 2 cores, load from other jobs slows every figure it overlaps)",
        f"python {device['python']}, torch {device['torch']}; rows: {'; '.join(versions)}",
        f"model: Llama-shaped, {prepared['parameters'] / 1e6:.1f}M parameters, random weights; prompt "
        f"{args.prompt_len} tokens per sequence, {args.decode_len} new tokens; median of {args.repeats} per "
        f"process, {args.aggregate} of {args.rounds} interleaved rounds",
        f"read bandwidth (1 GiB fp32 sum, best of one process per round): {bw}. roofline = decode tok/s / batch "
        f"x (weights + batch x KV at the mean context) / that bandwidth; roofline beside: the same against the "
        f"bandwidth measured in each row's process right after its runs, median over rounds",
    ]
    if info:
        lines.append(f"llama.cpp system info: {info}")
    if prepared.get("llama_cpp_skipped"):
        lines.append(f"llama.cpp rows skipped: {prepared['llama_cpp_skipped']}")
    return lines + [""]


def report(device: dict, prepared: dict, args: argparse.Namespace, variants: list[dict], results: dict,
           bandwidth: dict) -> str:
    tab = Table(args, variants, results, bandwidth)
    lines = header(device, prepared, args, results, bandwidth)
    for b in args.batch_sizes:
        lines += batch_table(tab, b)
    return "\n".join(lines + targets(tab) + agreement(tab))
