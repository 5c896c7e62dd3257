"""Tests of benchmarks/bench_cpu.py and its helpers (no timing assertions): the GGUF export's rotary permutation,
the report's roofline and ratio arithmetic, aggregation over rounds, a tiny end-to-end run, and, where
llama-cpp-python is installed, that llama.cpp reads the exported F16 file as transformers reads the checkpoint."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_cpu  # noqa: E402
import cpu_report  # noqa: E402
import gguf_export  # noqa: E402


def test_permute_rotary_interleaves_each_heads_halves():
    # one head of dim 4, rows (a0, a1 | b0, b1) in Hugging Face's half-split order -> llama.cpp's (a0, b0, a1, b1)
    w = np.arange(8).reshape(4, 2)
    out = gguf_export.permute_rotary(w, n_head=1)
    assert out.tolist() == [w[0].tolist(), w[2].tolist(), w[1].tolist(), w[3].tolist()]
    two_heads = gguf_export.permute_rotary(np.arange(8).reshape(8, 1), n_head=2)
    assert two_heads[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def _args(**kw) -> argparse.Namespace:
    return bench_cpu.parse_args([]) if not kw else argparse.Namespace(**{**vars(bench_cpu.parse_args([])), **kw})


def _result(library: str, decode: float, prefill: float, weight_bytes: int = 1000, kv: int = 10) -> dict:
    batch = {"prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode, "kv_bytes_per_position": kv,
             "first_greedy_tokens": [1, 2]}
    return {"library": library, "version": f"{library} 1", "dtype": "x", "attention": "y",
            "weight_bytes": weight_bytes, "peak_rss_mib": 1.0, "batches": {"1": batch, "8": dict(batch)}}


def _table() -> cpu_report.Table:
    variants = [dict(label="exllamav2 FP16", library="exllamav2"),
                dict(label="exllamav2 EXL2 2.5 bpw", library="exllamav2", bpw=2.5),
                dict(label="exllamav2 EXL2 6.0 bpw", library="exllamav2", bpw=6.0),
                dict(label="llama.cpp F16", library="llama.cpp"), dict(label="llama.cpp Q4_0", library="llama.cpp"),
                dict(label="transformers float32 eager", library="transformers"),
                dict(label="transformers bfloat16 sdpa", library="transformers")]
    results = {("exllamav2 FP16", 1): _result("exllamav2", 30.0, 300.0),
               ("llama.cpp F16", 1): _result("llama.cpp", 40.0, 400.0),
               ("transformers float32 eager", 1): _result("transformers", 20.0, 600.0),
               ("transformers bfloat16 sdpa", 1): _result("transformers", 25.0, 500.0)}
    return cpu_report.Table(_args(threads=[1], prompt_len=100, decode_len=20), variants, results, {1: 1e-3})


def test_roofline_by_hand():
    # batch 1: 30 steps/s x (1000 weight bytes + 10 B x 110 positions) / 1e6 B/s = 0.063
    tab = _table()
    assert tab.roofline("exllamav2 FP16", 1, 1) == pytest.approx(30 * 2100 / 1e6)
    # batch 8: 30 tok/s is 3.75 steps/s, each reading the weights once and 8 sequences' KV
    assert tab.roofline("exllamav2 FP16", 1, 8) == pytest.approx(30 / 8 * (1000 + 8 * 1100) / 1e6)
    assert tab.roofline("exllamav2 FP16", 2, 1) is None


def test_roofline_beside_each_row_is_the_median_of_the_rounds_shares():
    # rounds: 30 tok/s beside 2e-3 GB/s, 10 tok/s beside 1e-3 GB/s; their best decode is 30 tok/s, but the
    # share against the bandwidth measured beside each is the median of 30/2e-3 and 10/1e-3 tok/s per GB/s
    runs = [dict(_result("exllamav2", 30.0, 300.0), bandwidth_gb_s=2e-3),
            dict(_result("exllamav2", 10.0, 300.0), bandwidth_gb_s=1e-3)]
    tab = _table()
    tab.results[("exllamav2 FP16", 1)] = bench_cpu.aggregate(runs, "best")
    assert tab.get("exllamav2 FP16", 1, 1, "decode_tokens_per_s") == 30.0
    assert tab.roofline_beside("exllamav2 FP16", 1, 1) == pytest.approx((15000 + 10000) / 2 * 2100 / 1e9)
    assert tab.roofline_beside("llama.cpp F16", 1, 1) is None       # rounds without the measurement


def test_fastest_counterpart_and_ratios():
    tab = _table()
    assert tab.fastest(1, 1, "decode_tokens_per_s") == (25.0, "transformers bfloat16 sdpa")
    assert tab.fastest(1, 1, "prefill_tokens_per_s") == (600.0, "transformers float32 eager")
    assert tab.counterpart("exllamav2 FP16") == "llama.cpp F16"
    assert tab.counterpart("exllamav2 EXL2 2.5 bpw") == "llama.cpp Q4_0"
    assert tab.counterpart("exllamav2 EXL2 6.0 bpw") is None            # no Q8_0 row measured
    assert tab.counterpart("llama.cpp F16") is None
    assert tab.ratio("exllamav2 FP16", "llama.cpp F16", 1, 1, "decode_tokens_per_s") == pytest.approx(0.75)


def test_report_names_the_fastest_configuration_and_the_targets():
    tab = _table()
    table = "\n".join(cpu_report.batch_table(tab, 1))
    assert "| transformers, fastest per column | transformers 1 | 25.0 (bf16 sdpa) | 600 (fp32 eager) |" in table
    assert "| exllamav2 FP16 | exllamav2 1 | 30.0 | 300 | 6% | - | 0.75 (F16) | 1.20 | 0.50 |" in table
    lines = "\n".join(cpu_report.targets(tab))
    assert "exllamav2 FP16 decode ≥ llama.cpp F16: b1 1t 0.75 (missed by 25%)" in lines
    assert "exllamav2 FP16 decode ≥ 1.5× transformers' fastest: b1 1t 1.20 (missed by 20%)" in lines


def test_aggregate_best_and_median():
    runs = [_result("x", d, p) for d, p in ((10.0, 100.0), (30.0, 50.0), (20.0, 70.0))]
    best = bench_cpu.aggregate(runs, "best")["batches"]["1"]
    median = bench_cpu.aggregate(runs, "median")["batches"]["1"]
    assert (best["decode_tokens_per_s"], best["prefill_tokens_per_s"]) == (30.0, 100.0)
    assert (median["decode_tokens_per_s"], median["prefill_tokens_per_s"]) == (20.0, 70.0)
    runs[1]["version"] = "x 2"                      # code that changed between rounds is shown, never hidden
    assert bench_cpu.aggregate(runs, "best")["version"] == "MIXED: x 1 | x 2"


def test_tiny_end_to_end(tmp_path):
    gguf = ["F16"] if gguf_export.unavailable_reason() is None else []
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_cpu.py"), "--tiny", "--threads", "1",
           "--batch-sizes", "1", "2", "--prompt-len", "12", "--decode-len", "3", "--rounds", "1",
           "--exl2-bpw", "4.0", "--transformers-dtypes", "float32", "--attention", "eager",
           "--gguf-types", "F16", "--json", str(out)]      # without llama-cpp-python: reported as skipped
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    labels = {"exllamav2 FP16", "exllamav2 EXL2 4.0 bpw", "transformers float32 eager"}
    labels |= {"llama.cpp F16"} if gguf else set()
    assert set(data["results"]) == {f"{label} @ 1" for label in labels}
    for r in data["results"].values():
        assert set(r["batches"]) == {"1", "2"} and r["weight_bytes"] > 0 and r["version"]
        assert all(b["decode_tokens_per_s"] > 0 and b["prefill_tokens_per_s"] > 0 for b in r["batches"].values())
    assert "### batch 2" in done.stdout and "transformers, fastest per column" in done.stdout
    # every exllamav2 child ran the package copy the parent took at the start, named by its hash
    assert "tree " in data["results"]["exllamav2 FP16 @ 1"]["version"]
    assert ("llama.cpp rows skipped" in done.stdout) == (not gguf)
    again = subprocess.run([*cmd[:2], "--report-from", str(out)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout == done.stdout, again.stderr[-3000:]


@pytest.mark.skipif(gguf_export.unavailable_reason() is not None, reason="llama-cpp-python or gguf not installed")
def test_gguf_export_reads_as_transformers(tmp_path):
    """llama.cpp's last-position logits from the exported F16 file match transformers' on the same FP16 weights
    (a wrong rotary permutation or tensor name would not): within 1% of the largest logit."""
    import llama_cpp as lc
    from transformers import LlamaForCausalLM

    from cpu_runners import LlamaCppRunner

    bench_cpu.make_checkpoint(tmp_path / "fp16", 0, bench_cpu.TINY_SHAPE)
    path = gguf_export.export_f16(tmp_path / "fp16", tmp_path / "model-F16.gguf")
    ids = torch.randint(3, bench_cpu.TINY_SHAPE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    runner = LlamaCppRunner(path, 1, 32, 24)
    runner.start(2)
    runner.prefill(ids)
    got = np.ctypeslib.as_array(lc.llama_get_logits(runner.ctx), shape=(2, runner.n_vocab)).copy()
    model = LlamaForCausalLM.from_pretrained(tmp_path / "fp16", dtype=torch.float32)
    with torch.inference_mode():
        want = model(input_ids=ids).logits[:, -1].numpy()
    # measured: 0.1% of the largest logit; 5.7% with the q/k rows left unpermuted
    assert np.abs(got - want).max() < 0.01 * np.abs(want).max()
    assert runner.weight_bytes == sum(p.numel() * 2 for n, p in model.named_parameters()
                                      if "embed" not in n and p.ndim == 2) + sum(
        p.numel() * 4 for p in model.parameters() if p.ndim == 1)


def test_snapshot_of_a_commit_is_that_commits_package(tmp_path):
    src, code = bench_cpu.snapshot_package(tmp_path, "HEAD")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    assert code.startswith(f"git {head.stdout.strip()}, tree ")
    committed = subprocess.run(["git", "-C", str(REPO), "show", "HEAD:exllamav2/__init__.py"], capture_output=True)
    assert (src / "exllamav2" / "__init__.py").read_bytes() == committed.stdout
