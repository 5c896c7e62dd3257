"""CPU smoke tests of benchmarks/bench_gpu.py and benchmarks/make_bench_model.py: everything that
runs without a GPU (model creation at tiny shapes, arguments, roofline arithmetic, the decode-window
logic, and a --dry-run end to end on the CPU)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_gpu  # noqa: E402
import make_bench_model as mbm  # noqa: E402

ONE_LAYER = replace(mbm.TINY, num_hidden_layers=1)


# roofline arithmetic, against numbers worked out by hand ------------------------------------------------


def test_kv_bytes_per_position_llama3_8b():
    # 32 layers x 8 kv heads x 128 dims x (K and V) x 2 bytes = 131072 = 128 KiB
    assert bench_gpu.kv_bytes_per_position(32, 8, 128) == 131072


def test_decode_bytes_and_roofline_by_hand():
    # 3.9 GB of weights, 2048 positions of 128 KiB KV: batch 1 reads 3.9e9 + 268435456 bytes a token
    assert bench_gpu.decode_bytes_per_token(3_900_000_000, 131072, 2048, 1) == 4_168_435_456
    # batch 8 shares the weights: 487500000 + 268435456
    assert bench_gpu.decode_bytes_per_token(3_900_000_000, 131072, 2048, 8) == 755_935_456
    # 1008 GB/s over 3.9 GB a token = 258.46 tokens/s (the RTX 4090 ceiling of the reference notes)
    assert bench_gpu.roofline_tokens_per_s(1008e9, 3.9e9) == pytest.approx(258.4615, abs=1e-3)
    # a 1 GiB copy in 1 ms moves 2 GiB (read + write): 2147483648000 bytes/s
    assert bench_gpu.copy_bandwidth(2**30, 0.001) == pytest.approx(2_147_483_648_000)
    assert bench_gpu.round_up(2049, 256) == 2304 and bench_gpu.round_up(2048, 256) == 2048


def test_add_roofline_fills_decode_measurements_only():
    run = {"measurements": {
        "prefill": {"status": "ok", "tokens_per_s": 5000.0},
        "decode_b1": {"status": "ok", "batch": 1, "tokens_per_s": 100.0, "mean_context": 1000},
        "generator_b8": {"status": "ok", "batch": 8, "tokens_per_s": 600.0, "mean_context": 1000},
        "generator_b2": {"status": "unsupported", "batch": 2, "reason": "x"},
    }}
    bench_gpu.add_roofline(run, weight_bytes=1_000_000_000, kv_per_position=1000, bandwidth=1e12)
    m = run["measurements"]
    # batch 1: 1e9 + 1e6 bytes a token -> 999.001 tokens/s ceiling; 100 measured is 10.01% of it
    assert m["decode_b1"]["bytes_per_token"] == 1_001_000_000
    assert m["decode_b1"]["roofline_tokens_per_s"] == pytest.approx(999.000999)
    assert m["decode_b1"]["fraction_of_roofline"] == pytest.approx(0.1001)
    # batch 8: 1.25e8 + 1e6 bytes a token -> 7936.5 tokens/s; 600 measured is 7.56%
    assert m["generator_b8"]["bytes_per_token"] == 126_000_000
    assert m["generator_b8"]["fraction_of_roofline"] == pytest.approx(600 / (1e12 / 126e6))
    assert "fraction_of_roofline" not in m["prefill"] and "fraction_of_roofline" not in m["generator_b2"]


def _run(package, backend, **tps):
    return {"package": package, "backend": backend, "status": "ok",
            "measurements": {k: {"status": "ok", "tokens_per_s": v} for k, v in tps.items()}}


def test_ratios_by_hand():
    runs = [
        _run("ours", "flash_attn", decode_b1=100.0, generator_b1=80.0, generator_b8=400.0),
        _run("ours", "sdpa", decode_b1=95.0, generator_b1=50.0, generator_b8=160.0),
        _run("ours", "xformers", decode_b1=85.0, generator_b1=60.0, generator_b8=120.0),
        _run("upstream", "flash_attn", decode_b1=90.0, generator_b1=70.0, generator_b8=300.0),
        {"package": "upstream", "backend": "sdpa", "status": "unavailable", "reason": "no"},
    ]
    ratios = {r["name"]: r for r in bench_gpu.compute_ratios(runs, [1, 8])}
    r = ratios["decode b1 ours/upstream, flash_attn"]
    assert r["value"] == pytest.approx(100 / 90) and r["meets"] is True
    assert ratios["decode b1 ours/upstream, fastest backend of each"]["value"] == pytest.approx(100 / 90)
    r = ratios["decode b1 ours/upstream, sdpa"]
    assert r["value"] is None and r["missing"] == ["denominator"] and r["meets"] is None
    assert ratios["decode_b1 sdpa/flash_attn, ours"]["value"] == pytest.approx(0.95)
    assert ratios["decode_b1 sdpa/flash_attn, ours"]["meets"] is True
    assert ratios["decode_b1 xformers/flash_attn, ours"]["meets"] is False      # 0.85 < 0.9
    assert ratios["generator_b8 sdpa/flash_attn, ours"]["value"] == pytest.approx(0.4)
    r = ratios["generator b8/b1, ours sdpa"]
    assert r["value"] == pytest.approx(3.2) and r["target"] == 3.0 and r["meets"] is True
    assert ratios["generator b8/b1, ours xformers"]["meets"] is False            # 2.0 < 3
    r = ratios["generator b8/b1, upstream flash_attn"]
    assert r["value"] == pytest.approx(300 / 70) and r["target"] is None


# the decode window ------------------------------------------------------------------------------------


class _FakeJob:
    def __init__(self, start: int, max_new: int):
        self.start, self.max_new_tokens, self.new_tokens = start, max_new, 0


class _FakeGenerator:
    """Job i gets its first token at iteration start_i, then one per iteration until max_new."""

    def __init__(self):
        self.jobs, self.step = [], 0

    def enqueue(self, jobs):
        self.jobs = list(jobs)

    def num_remaining_jobs(self):
        return sum(j.new_tokens < j.max_new_tokens for j in self.jobs)

    def iterate(self):
        results = []
        for j in self.jobs:
            if self.step >= j.start and j.new_tokens < j.max_new_tokens:
                j.new_tokens += 1
                results.append({"eos": j.new_tokens == j.max_new_tokens})
        self.step += 1
        return results


def test_decode_window_times_only_full_batch_steps(monkeypatch):
    # a clock that reads i * i after iteration i, so the seconds name the two iterations timed
    ticks = iter(range(100))
    monkeypatch.setattr(bench_gpu, "stamp", lambda device: float(next(ticks) ** 2))
    jobs = [_FakeJob(start, 10) for start in (0, 1, 2)]
    w = bench_gpu.decode_window(_FakeGenerator(), jobs, prompt_len=100, warmup_steps=2, device=torch.device("cpu"))
    # all three have a token after iteration 2; the window opens 2 later (counts 5, 4, 3) and closes
    # at iteration 9, where job 0 finishes (counts 10, 9, 8): 5 steps of 3 tokens
    assert w["steps"] == 5 and w["tokens"] == 15
    assert w["mean_context"] == pytest.approx(100 + (4 + 9) / 2)
    assert w["seconds"] == 9 ** 2 - 4 ** 2                     # from after iteration 4 to after iteration 9


def test_decode_window_too_short_is_an_error():
    jobs = [_FakeJob(start, 3) for start in (0, 1, 2)]
    with pytest.raises(RuntimeError, match="raise --decode-len"):
        bench_gpu.decode_window(_FakeGenerator(), jobs, prompt_len=10, warmup_steps=2, device=torch.device("cpu"))


# arguments and child environments ---------------------------------------------------------------------


def test_parse_args_defaults():
    args = bench_gpu.parse_args([])
    assert (args.prompt_len, args.decode_len, args.repeats, args.copy_mib) == (2048, 128, 5, 1024)
    assert args.batch_sizes == [1, 8] and args.backends == list(bench_gpu.BACKENDS)
    assert args.packages == ["ours"] and args.layers is None and args.bits == 4.0 and args.head_bits == 6


def test_parse_args_dry_run_defaults_yield_to_explicit_values():
    args = bench_gpu.parse_args(["--dry-run", "--decode-len", "3"])
    assert (args.prompt_len, args.repeats, args.decode_len) == (64, 1, 3)
    assert bench_gpu.parse_args(["--batch-sizes", "8,1,8"]).batch_sizes == [1, 8]
    assert bench_gpu.parse_args(["--backends", "sdpa, matmul"]).backends == ["sdpa", "matmul"]


@pytest.mark.parametrize("argv", [
    ["--backends", "sdpa,bogus"],
    ["--batch-sizes", "0,8"],
    ["--batch-sizes", "one"],
    ["--repeats", "0"],
    ["--packages", "upstream"],                                  # no --upstream-site
    ["--upstream-site", "/nonexistent/site"],
])
def test_parse_args_rejects(argv, capsys):
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(argv)
    assert "error" in capsys.readouterr().err


def _fake_site(tmp_path: Path) -> Path:
    (tmp_path / "site" / "exllamav2").mkdir(parents=True)
    (tmp_path / "site" / "exllamav2" / "__init__.py").write_text("")
    return tmp_path / "site"


def test_dry_run_refuses_upstream(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--dry-run", "--upstream-site", str(_fake_site(tmp_path))])
    assert "upstream" in capsys.readouterr().err


def test_worker_env_per_package(tmp_path, monkeypatch):
    site = _fake_site(tmp_path)
    monkeypatch.setenv("EXLLAMA_NO_FLASH_ATTN", "1")                 # inherited: must not leak into children
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), "/elsewhere"]))
    args = bench_gpu.parse_args(["--upstream-site", str(site)])
    assert args.packages == ["ours", "upstream"]

    ours = bench_gpu.worker_env(args, "ours", "sdpa")
    assert ours["EXLLAMA_ATTN_BACKEND"] == "sdpa" and "EXLLAMA_NO_FLASH_ATTN" not in ours
    assert ours["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/elsewhere"]

    up = bench_gpu.worker_env(args, "upstream", "sdpa")
    assert "EXLLAMA_ATTN_BACKEND" not in up
    assert up["EXLLAMA_NO_FLASH_ATTN"] == "1" and up["EXLLAMA_NO_XFORMERS"] == "1" and "EXLLAMA_NO_SDPA" not in up
    assert up["PYTHONPATH"].split(os.pathsep) == [str(site.resolve()), "/elsewhere"]   # our repo is not visible
    assert "EXLLAMA_NO_FLASH_ATTN" not in bench_gpu.worker_env(args, "upstream", "flash_attn")


# the benchmark model ----------------------------------------------------------------------------------


def test_scale_max_for_rms_by_hand():
    # 4-bit codes 0..15 less 8: mean square 344/16 = 21.5; scale codes 8..15 give (9..16)^2/256, whose
    # squares average 235076 / 8 / 65536
    assert mbm.scale_max_for_rms(4, 0.02) == pytest.approx(0.02 / math.sqrt(21.5 * 235076 / 8 / 65536))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench_model")
    return out, mbm.ensure_model(out, ONE_LAYER, "cpu")


def test_model_files_are_exl2_llama(tiny_model):
    from exllamav2.quant import load_quantized
    from exllamav2.stloader import SafetensorsIndex

    out, marker = tiny_model
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "exl2" and config["quantization_config"]["bits"] == 4.0
    assert (config["hidden_size"], config["num_key_value_heads"], config["vocab_size"]) == (256, 1, 1024)
    index = SafetensorsIndex([str(p) for p in out.glob("*.safetensors")])
    linears = [(f"model.layers.0.{m}.{role}", k, n) for m in ("self_attn", "mlp")
               for role, k, n in mbm.module_linears(ONE_LAYER, m)] + [("lm_head", 256, 1024)]
    for key, k, n in linears:
        bits = index.get(f"{key}.q_groups")[0::2].tolist()
        assert bits == sorted(bits, reverse=True), f"{key}: group widths must descend"
        w = load_quantized(key, index, k, n).dequantize().float()       # the package's own loader and checks
        rms = w.pow(2).mean().sqrt().item()
        assert abs(rms - mbm.WEIGHT_RMS) < 0.05 * mbm.WEIGHT_RMS, f"{key}: weight RMS {rms}"
    assert 3.75 <= marker["layers_bpw"] <= 4.0                             # the optimizer meets the budget


def test_weight_bytes_exclude_only_the_embedding(tiny_model):
    out, _ = tiny_model
    total = embed = 0
    for path in out.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                total += t.numel() * t.element_size()
                embed += t.numel() * t.element_size() if name == mbm.EMBED_KEY else 0
    assert embed == 1024 * 256 * 2
    assert mbm.weight_bytes_per_step(out) == total - embed


def test_tokenizer_layout(tiny_model):
    from tokenizers import Tokenizer

    out, _ = tiny_model
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == 1024
    assert tok.token_to_id("<|begin_of_text|>") == ONE_LAYER.regular_vocab == 1008
    assert tok.token_to_id("<|end_of_text|>") == 1009
    text = "Ünïcödé and ascii, 123"
    assert tok.decode(tok.encode(text).ids) == text


def test_model_is_reused_and_deterministic(tiny_model, tmp_path):
    out, marker = tiny_model
    before = (out / "output.safetensors").stat().st_mtime_ns
    assert mbm.ensure_model(out, ONE_LAYER, "cpu") == marker
    assert (out / "output.safetensors").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="another spec"):
        mbm.ensure_model(out, replace(ONE_LAYER, seed=1), "cpu")

    def digest(d: Path) -> str:
        return hashlib.sha256((d / "output.safetensors").read_bytes()).hexdigest()

    mbm.make_model(tmp_path / "again", ONE_LAYER, "cpu")
    mbm.make_model(tmp_path / "seed1", replace(ONE_LAYER, seed=1), "cpu")
    assert digest(tmp_path / "again") == digest(out)
    assert digest(tmp_path / "seed1") != digest(out)


# end to end -------------------------------------------------------------------------------------------


def test_without_gpu_it_fails_clearly(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--json", str(tmp_path / "r.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stderr and "--dry-run" in done.stderr
    assert not (tmp_path / "r.json").exists()


def test_dry_run_end_to_end(tmp_path, capsys):
    result_path = tmp_path / "r.json"
    rc = bench_gpu.main(["--dry-run", "--layers", "1", "--backends", "flash_attn,sdpa", "--decode-len", "2",
                         "--warmup", "0", "--batch-sizes", "1,2", "--model-dir", str(tmp_path / "model"),
                         "--json", str(result_path)])
    assert rc == 0
    result = json.loads(result_path.read_text())
    assert result["device"]["device"] == "cpu" and result["bandwidth"]["bytes_per_s"] > 0
    assert result["model"]["spec"]["num_hidden_layers"] == 1
    flash, sdpa = result["runs"]
    assert (flash["package"], flash["backend"], flash["status"]) == ("ours", "flash_attn", "unavailable")
    assert "needs a CUDA GPU" in flash["reason"]
    assert sdpa["status"] == "ok" and sdpa["attention"]["backend"] == "sdpa"
    assert sdpa["attention"]["paged_impl"] == "gather" and sdpa["kernels"] == "torch only (cpu)"
    m = sdpa["measurements"]
    assert m["prefill"]["tokens"] == 64 and m["decode_b1"]["tokens"] == 2
    for key, batch in (("generator_b1", 1), ("generator_b2", 2)):
        assert m[key]["batch"] == batch and m[key]["paged"] is True
        for w in m[key]["windows"]:
            assert w["steps"] >= 2 and w["tokens"] == batch * w["steps"]     # only full-batch steps timed
    for key in ("decode_b1", "generator_b1", "generator_b2"):
        assert m[key]["tokens_per_s"] > 0 and m[key]["fraction_of_roofline"] > 0
    names = {r["name"]: r for r in result["ratios"]}
    assert names["generator b2/b1, ours sdpa"]["value"] > 0
    assert names["generator b2/b1, ours sdpa"]["target"] is None      # the 3x target is for batch 8
    out = capsys.readouterr().out
    assert "needs a CUDA GPU" in out and "generator b2/b1, ours sdpa" in out
    assert (tmp_path / "r-logs" / "ours-sdpa.log").is_file()


def test_gpu_check_script_stops_clearly_without_a_gpu(tmp_path):
    """benchmarks/gpu_check.sh on a machine without a GPU: exit 2 and one line saying why, before any build."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the script would run for minutes")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    run = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")})
    assert run.returncode == 2
    assert "no CUDA device: this check needs an NVIDIA GPU" in run.stderr
    assert "build the extension" not in run.stdout
