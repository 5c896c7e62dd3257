"""Fuzz: bad model files and runtime misuse end in success with finite logits or in one of the project's
errors naming the culprit; never a raw KeyError/IndexError/AttributeError/TypeError, a hang or NaN logits.

Seeded (FUZZ_SEED, default 1806) and sized to run in well under two minutes on two cores: a few hundred
cases over config.json keys and values, safetensors headers and payloads, EXL2 tensors (on a copy of the
bundled EXL2 demo model), tokenizer files and runtime misuse. Model directories are hard-linked copies of
the tiny fixtures; a mutated file is unlinked first, so the fixture itself is never written.

Each case is (id, mutation, culprits): the error must name one of the culprits (a key, a file, a tensor,
an argument). A case that does something else is collected, and each test reports all of its failures
at once, with the case id and the seed to replay it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
from exllamav2.errors import ExLlamaV2Error
from tests.tiny_models import write_tokenizer

SEED = int(os.environ.get("FUZZ_SEED", "1806"))
CASE_SECONDS = 20                 # a case slower than this counts as a hang
DEMO_EXL2 = Path(__file__).resolve().parents[1] / "examples" / "demo_model" / "exl2"
RAW = (KeyError, IndexError, AttributeError, TypeError)


Mutation = Callable[[Path], None]


# helpers ------------------------------------------------------------------------------------------------


def rewrite(path: Path, data: bytes | str) -> None:
    """Replace a (possibly hard-linked) file's content without touching the other links."""
    if path.exists():
        path.unlink()
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def link_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def read_st(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_st(path: Path, header: Any, payload: bytes) -> None:
    raw = json.dumps(header).encode()
    rewrite(path, struct.pack("<Q", len(raw)) + raw + payload)


@contextmanager
def time_limit(seconds: int):
    def hang(signum, frame):
        raise TimeoutError(f"case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def load_and_run(model_dir: Path, with_tokenizer: bool) -> None:
    """Everything a user does first: config, model, load, tokenizer, one forward with a cache."""
    config = ExLlamaV2Config(str(model_dir))
    model = ExLlamaV2(config)
    model.load()
    if with_tokenizer:
        ids = ExLlamaV2Tokenizer(config).encode("The quick brown fox", add_bos=True)
    else:
        ids = torch.tensor([[1, 5, 9, 2, 7]])
    cache = ExLlamaV2Cache(model, max_seq_len=64)
    logits = model.forward(ids, cache)
    assert torch.isfinite(logits[..., : config.vocab_size]).all(), "non-finite logits"


def outcome(case_id: str, run: Callable[[], None], culprits: list[str]) -> str | None:
    """None when the case ends well; else a line saying what went wrong."""
    try:
        with time_limit(CASE_SECONDS):
            run()
        return None
    except ExLlamaV2Error as e:
        message = str(e)
        if any(c in message for c in culprits):
            return None
        return f"{case_id}: {type(e).__name__} names none of {culprits}: {message[:300]}"
    except AssertionError as e:
        return f"{case_id}: {e}"
    except (ValueError, KeyError) as e:
        frame = traceback.extract_tb(e.__traceback__)[-1]
        where = Path(frame.filename).name
        kind = "raw " if isinstance(e, RAW) else ""
        return f"{case_id}: {kind}{type(e).__name__} at {where}:{frame.lineno}: {str(e)[:300]}"
    except Exception as e:  # noqa: BLE001 (everything else is what the fuzz looks for)
        where = traceback.extract_tb(e.__traceback__)[-1]
        kind = "raw " if isinstance(e, RAW) else ""
        return (f"{case_id}: {kind}{type(e).__name__} at {Path(where.filename).name}:{where.lineno}: "
                f"{str(e)[:300]}")


def run_cases(cases: list[tuple[str, Mutation, list[str]]], base: Path, tmp: Path, with_tokenizer: bool) -> list[str]:
    problems = []
    for n, (case_id, mutate, culprits) in enumerate(cases):
        model_dir = link_copy(base, tmp / f"c{n}")
        try:
            mutate(model_dir)
        except Exception as e:  # a mutation that does not apply to this model is a bug in the fuzz
            raise AssertionError(f"{case_id}: mutation failed: {e!r}") from e
        problem = outcome(case_id, lambda: load_and_run(model_dir, with_tokenizer), culprits)
        if problem:
            problems.append(problem)
        shutil.rmtree(model_dir)
    return problems


def report(problems: list[str], count: int) -> None:
    assert not problems, f"{len(problems)} of {count} cases failed (FUZZ_SEED={SEED}):\n" + "\n".join(problems)


@pytest.fixture(scope="module")
def base_llama(tmp_path_factory, tiny_model_factory):
    """The tiny Llama with its tokenizer, as a directory the cases link-copy."""
    src, _ = tiny_model_factory("llama")
    dst = link_copy(src, tmp_path_factory.mktemp("fuzz") / "llama")
    write_tokenizer(dst)
    return dst


@pytest.fixture(autouse=True)
def pytorch_twin(monkeypatch):
    """EXL2 layers on the PyTorch path: no JIT build in the fuzz (the kernels have their own tests)."""
    from exllamav2.quant import qlinear

    monkeypatch.setattr(qlinear.QuantWeight, "use_cpu_kernels", False, raising=False)


# config.json -----------------------------------------------------------------------------------------------

CONFIG_KEYS = [
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "vocab_size", "rms_norm_eps", "tie_word_embeddings", "torch_dtype", "hidden_act",
    "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings", "sliding_window",
    "use_sliding_window", "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
    "architectures", "quantization_config", "layer_types", "no_rope_layers", "text_config",
    "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
]

ROPE_VALUES = [
    "linear", ["linear", 2.0], {"type": "linear"}, {"rope_type": "linear", "factor": "2"},
    {"rope_type": "linear", "factor": 0}, {"rope_type": "dynamic"}, {"rope_type": "yarn"},
    {"rope_type": "yarn", "factor": 2.0, "beta_fast": []}, {"rope_type": "llama3", "factor": 8.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 0},
    {"rope_type": "longrope", "short_factor": [1.0]}, {"rope_type": None, "factor": 2.0},
    {"rope_type": "linear", "factor": 2.0}, {"rope_type": "yarn", "factor": 4.0}, {"rope_type": "mystery"},
]


def value_mutations(rng: random.Random, current: Any) -> list[Any]:
    """Values of the wrong type or range for a key, plus a few plausible ones."""
    values = [None, "x", -1, 0, 1, 128.5, True, [], {}, [1, "a"], 10**12, float("nan") if rng.random() < 0.3 else -0.5]
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        values += [current * 2, current + 1, current / 3, -current]
    return values


def config_cases(rng: random.Random, raw: dict, n: int) -> list[tuple[str, Mutation, list[str]]]:
    cases = []
    for _ in range(n):
        key = rng.choice(CONFIG_KEYS)
        if key in ("rope_scaling", "rope_parameters"):
            value = rng.choice(ROPE_VALUES + [None, 3])
        else:
            value = rng.choice(value_mutations(rng, raw.get(key)))
        delete = rng.random() < 0.1

        def mutate(d: Path, key=key, value=value, delete=delete) -> None:
            cfg = json.loads((d / "config.json").read_text())
            if delete:
                cfg.pop(key, None)
            else:
                cfg[key] = value
            rewrite(d / "config.json", json.dumps(cfg))

        what = "del" if delete else repr(value)[:40]
        cases.append((f"config {key}={what}", mutate, [key, "config.json", "tensor", "token id"]))
    for text in ("[1, 2]", '"config"', "{", "", "null", '{"architectures": ["LlamaForCausalLM"]}'):
        cases.append((f"config text {text!r}", lambda d, t=text: rewrite(d / "config.json", t), ["config.json"]))
    return cases


def test_fuzz_config_json(base_llama, tmp_path):
    rng = random.Random(SEED)
    raw = json.loads((base_llama / "config.json").read_text())
    cases = config_cases(rng, raw, 110)
    report(run_cases(cases, base_llama, tmp_path, with_tokenizer=True), len(cases))


def rope_field_cases(rng: random.Random, params: dict, n: int) -> list[tuple[str, Mutation, list[str]]]:
    """The rope_parameters of a scaled-RoPE checkpoint: a field removed, retyped or out of range."""
    cases = []
    for _ in range(n):
        field = rng.choice(sorted(params))
        value = rng.choice(["DELETE", None, "x", -1.0, 0, [], {}, True])

        def mutate(d: Path, field=field, value=value) -> None:
            cfg = json.loads((d / "config.json").read_text())
            rope = dict(cfg["rope_parameters"])
            if value == "DELETE":
                del rope[field]
            else:
                rope[field] = value
            cfg["rope_parameters"] = rope
            rewrite(d / "config.json", json.dumps(cfg))

        cases.append((f"rope_parameters.{field}={value!r}", mutate, [field, "rope"]))
    return cases


@pytest.mark.parametrize("arch", ["llama3_rope", "llama_yarn"])
def test_fuzz_rope_fields(tiny_model_factory, tmp_path, arch):
    rng = random.Random(SEED + 4)
    src, _ = tiny_model_factory(arch)
    params = json.loads((src / "config.json").read_text())["rope_parameters"]
    cases = rope_field_cases(rng, params, 15)
    report(run_cases(cases, src, tmp_path, with_tokenizer=False), len(cases))


# safetensors ----------------------------------------------------------------------------------------------------


def st_file(d: Path) -> Path:
    return next(d.glob("*.safetensors"))


def header_mutations(rng: random.Random, names: list[str]) -> list[tuple[str, Callable[[dict], Any], list[str]]]:
    """Edits of a parsed header: (id, edit, culprits)."""
    name = rng.choice(names)
    other = rng.choice(names)

    def entry(h: dict, **change) -> dict:
        return {**h, name: {**h[name], **change}}

    def drop(h: dict) -> dict:
        return {k: v for k, v in h.items() if k != name}

    def rename(h: dict) -> dict:
        return {(k + ".bak" if k == name else k): v for k, v in h.items()}

    return [
        (f"dtype {name}", lambda h: entry(h, dtype=rng.choice(["F32", "I8", "F17", 3, None, "BF16"])), [name]),
        (f"shape {name}", lambda h: entry(h, shape=[rng.randint(0, 300) for _ in range(rng.randint(0, 3))]), [name]),
        (f"shape str {name}", lambda h: entry(h, shape="64"), [name]),
        (f"offsets {name}", lambda h: entry(h, data_offsets=[rng.randint(-5, 10**6), rng.randint(0, 10**6)]), [name]),
        (f"offsets swap {name}/{other}",
         lambda h: {**entry(h, data_offsets=h[other]["data_offsets"])}, [name, other, "overlap", "data_offsets"]),
        (f"missing {name}", drop, [name]),
        (f"renamed {name}", rename, [name]),
        (f"entry {name}", lambda h: entry(h, data_offsets=None), [name]),
        ("header list", lambda h: list(h), ["header"]),
        ("metadata", lambda h: {**h, "__metadata__": {"format": 3}}, ["__metadata__"]),
    ]


def safetensors_cases(rng: random.Random, names: list[str], size: int) -> list[tuple[str, Mutation, list[str]]]:
    cases: list[tuple[str, Mutation, list[str]]] = []
    for _ in range(7):
        for case_id, edit, culprits in header_mutations(rng, names):
            def mutate(d: Path, edit=edit) -> None:
                header, payload = read_st(st_file(d))
                write_st(st_file(d), edit(header), payload)

            cases.append((f"header {case_id}", mutate, culprits + ["model.safetensors"]))
    for _ in range(12):
        cut = rng.randint(0, size - 1)
        cases.append((f"truncated at {cut}", lambda d, c=cut: rewrite(st_file(d), st_file(d).read_bytes()[:c]),
                      ["model.safetensors"]))
    for _ in range(16):
        flips = [(rng.randint(0, 10**9), rng.randint(0, 255)) for _ in range(rng.randint(1, 40))]

        def flip(d: Path, flips=flips) -> None:
            header, payload = read_st(st_file(d))
            data = bytearray(payload)
            for pos, byte in flips:
                data[pos % len(data)] = byte
            write_st(st_file(d), header, bytes(data))

        cases.append((f"payload {len(flips)} bytes", flip, ["model.safetensors"]))
    cases += shard_cases(rng, names)
    return cases


def shard_cases(rng: random.Random, names: list[str]) -> list[tuple[str, Mutation, list[str]]]:
    def duplicate(d: Path) -> None:
        shutil.copy(st_file(d), d / "model-extra.safetensors")

    def index_missing(d: Path) -> None:
        weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
        weight_map[rng.choice(names)] = "model-00002-of-00002.safetensors"
        st_file(d).rename(d / "model-00001-of-00002.safetensors")
        rewrite(d / "model.safetensors.index.json", json.dumps({"metadata": {}, "weight_map": weight_map}))

    def index_garbage(d: Path) -> None:
        rewrite(d / "model.safetensors.index.json", rng.choice(["{", "[]", '{"weight_map": 3}']))

    def empty_extra(d: Path) -> None:
        rewrite(d / "extra.safetensors", b"")

    return [("duplicate shard", duplicate, ["model-extra.safetensors"]),
            ("index names missing shard", index_missing, ["model-00002-of-00002.safetensors"]),
            ("index garbage", index_garbage, ["model.safetensors.index.json"]),
            ("empty extra shard", empty_extra, ["extra.safetensors"])]


def test_fuzz_safetensors(base_llama, tmp_path):
    rng = random.Random(SEED + 1)
    header, _ = read_st(st_file(base_llama))
    names = sorted(k for k in header if k != "__metadata__")
    cases = safetensors_cases(rng, names, st_file(base_llama).stat().st_size)
    report(run_cases(cases, base_llama, tmp_path, with_tokenizer=False), len(cases))


# EXL2 tensors -----------------------------------------------------------------------------------------------------


def exl2_edit(d: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    from safetensors.torch import load_file, save_file

    path = d / "output.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    path.unlink()
    save_file(tensors, str(path), metadata={"format": "pt"})


def exl2_tensor_edits(rng: random.Random, layer: str) -> list[tuple[str, Callable[[dict], None]]]:
    def perm(t: dict) -> None:
        p = t[f"{layer}.q_invperm"].clone()
        choice = rng.randrange(4)
        if choice == 0:
            p[rng.randrange(len(p))] = p[rng.randrange(len(p))]      # a duplicate (not a permutation)
        elif choice == 1:
            p[rng.randrange(len(p))] = len(p) + rng.randint(0, 9)     # out of range
        elif choice == 2:
            p[rng.randrange(len(p))] = -1
        else:
            p = p[:-1]
        t[f"{layer}.q_invperm"] = p

    def perm_added(t: dict) -> None:
        inv = t[f"{layer}.q_invperm"]
        bad = torch.argsort(inv).to(inv.dtype)
        bad[0] = bad[1]
        t[f"{layer}.q_perm"] = bad

    def bits(t: dict) -> None:
        g = t[f"{layer}.q_groups"].clone()
        g[2 * rng.randrange(len(g) // 2)] = rng.choice([0, 1, 7, 9, 16, -4])
        t[f"{layer}.q_groups"] = g

    def starts(t: dict) -> None:
        g = t[f"{layer}.q_groups"].clone()
        g[2 * rng.randrange(len(g) // 2) + 1] = rng.choice([-1, 10**4, 1])
        t[f"{layer}.q_groups"] = g

    def scale_shape(t: dict) -> None:
        s = t[f"{layer}.q_scale"]
        t[f"{layer}.q_scale"] = rng.choice([s[:-1], s[:, :-1], s.reshape(-1), torch.cat([s, s])]).contiguous()

    def scale_max(t: dict) -> None:
        m = t[f"{layer}.q_scale_max"]
        t[f"{layer}.q_scale_max"] = rng.choice([m[:-1], m.float() * float("inf"), m.reshape(1, -1)]).contiguous()

    def weight_rows(t: dict) -> None:
        w = t[f"{layer}.q_weight"]
        t[f"{layer}.q_weight"] = rng.choice([w[:-1], w[:, :-1], w.float()]).contiguous()

    def dtype(t: dict) -> None:
        name = f"{layer}.{rng.choice(['q_invperm', 'q_scale', 'q_groups', 'q_weight'])}"
        t[name] = t[name].to(rng.choice([torch.float16, torch.int64, torch.int8]))

    def missing(t: dict) -> None:
        del t[f"{layer}.{rng.choice(['q_invperm', 'q_scale', 'q_scale_max', 'q_groups', 'q_weight'])}"]

    return [("perm", perm), ("q_perm added", perm_added), ("bits", bits), ("group starts", starts),
            ("scale shape", scale_shape), ("scale max", scale_max), ("weight shape", weight_rows),
            ("dtype", dtype), ("missing", missing)]


def test_fuzz_exl2_tensors(tmp_path):
    from safetensors import safe_open

    assert (DEMO_EXL2 / "output.safetensors").exists(), "the EXL2 demo model is part of the checkout"
    rng = random.Random(SEED + 2)
    with safe_open(str(DEMO_EXL2 / "output.safetensors"), "pt") as f:
        layers = sorted({k.rsplit(".", 1)[0] for k in f.keys() if k.endswith(".q_weight")})
    cases = []
    for _ in range(7):
        layer = rng.choice(layers)
        for case_id, edit in exl2_tensor_edits(rng, layer):
            cases.append((f"exl2 {case_id} {layer}", lambda d, e=edit: exl2_edit(d, e), [layer]))
    for _ in range(12):      # random bytes anywhere in the payload: codes, scales, groups, permutations, norms
        flips = [(rng.randrange(10**9), rng.randrange(256)) for _ in range(rng.randint(1, 30))]

        def flip(d: Path, flips=flips) -> None:
            header, payload = read_st(d / "output.safetensors")
            data = bytearray(payload)
            for pos, byte in flips:
                data[pos % len(data)] = byte
            write_st(d / "output.safetensors", header, bytes(data))

        cases.append((f"exl2 payload {len(flips)} bytes", flip, ["output.safetensors", "q_", "lm_head", "model."]))
    report(run_cases(cases, DEMO_EXL2, tmp_path, with_tokenizer=True), len(cases))


# tokenizer files --------------------------------------------------------------------------------------------------


def tokenizer_cases(rng: random.Random, spec: dict) -> list[tuple[str, Mutation, list[str]]]:
    def json_file(name: str, value: Any) -> Mutation:
        return lambda d: rewrite(d / name, value if isinstance(value, str) else json.dumps(value))

    added = {"id": 400, "content": "<extra>", "special": True, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False}
    cases = [
        ("tokenizer.json truncated", lambda d: rewrite(d / "tokenizer.json", (d / "tokenizer.json").read_bytes()[:500]),
         ["tokenizer.json"]),
        ("tokenizer.json empty", json_file("tokenizer.json", ""), ["tokenizer.json"]),
        ("tokenizer.json list", json_file("tokenizer.json", []), ["tokenizer.json"]),
        ("tokenizer.json no model", json_file("tokenizer.json", {k: v for k, v in spec.items() if k != "model"}),
         ["tokenizer.json"]),
        ("tokenizer.json model type", json_file("tokenizer.json", {**spec, "model": {"type": "Nope"}}), ["tokenizer.json"]),
        ("added_tokens not a list", json_file("tokenizer.json", {**spec, "added_tokens": 3}), ["tokenizer.json"]),
        ("added token no id", json_file("tokenizer.json", {**spec, "added_tokens": [{"content": "<x>"}]}),
         ["tokenizer.json"]),
        ("added token beyond vocab", json_file("tokenizer.json", {**spec, "added_tokens": spec["added_tokens"] + [added]}),
         ["token id", "vocabulary"]),
        ("tokenizer files missing", lambda d: (d / "tokenizer.json").unlink(), ["tokenizer"]),
        ("tokenizer.model garbage", lambda d: ((d / "tokenizer.json").unlink(), rewrite(d / "tokenizer.model", b"\x00garbage")),
         ["tokenizer.model"]),
        ("added_tokens.json list", json_file("added_tokens.json", [1]), ["added_tokens.json"]),
    ]
    for value in ("{", [], {"bos_token": 5}, {"bos_token": ["<s>"]}, {"eos_token": {"content": 3}},
                  {"added_tokens_decoder": []}, {"added_tokens_decoder": {"1": "x"}}, {"bos_token": "<nope>"},
                  {"added_tokens_decoder": {"-3": {"content": "<s>", "special": True}}}):
        cases.append((f"tokenizer_config {str(value)[:40]}", json_file("tokenizer_config.json", value),
                      ["tokenizer_config.json"]))
    for _ in range(10):
        flips = [(rng.randrange(10**6), rng.choice('{}[]",:0a')) for _ in range(rng.randint(1, 5))]

        def flip(d: Path, flips=flips) -> None:
            text = list((d / "tokenizer.json").read_text())
            for pos, ch in flips:
                text[pos % len(text)] = ch
            rewrite(d / "tokenizer.json", "".join(text))

        cases.append((f"tokenizer.json {len(flips)} chars", flip, ["tokenizer.json"]))
    return cases


def test_fuzz_tokenizer_files(base_llama, tmp_path):
    rng = random.Random(SEED + 3)
    spec = json.loads((base_llama / "tokenizer.json").read_text())
    cases = tokenizer_cases(rng, spec)
    report(run_cases(cases, base_llama, tmp_path, with_tokenizer=True), len(cases))


# runtime misuse ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(base_llama):
    config = ExLlamaV2Config(str(base_llama))
    model = ExLlamaV2(config)
    model.load()
    return model, ExLlamaV2Tokenizer(config)


def misuse_cases(model: ExLlamaV2, tok: ExLlamaV2Tokenizer) -> list[tuple[str, Callable[[], Any], list[str]]]:
    ids = torch.tensor([[1, 5, 9, 2]])

    def forward(*args, **kwargs) -> Callable[[], Any]:
        def run():
            out = model.forward(*args, **kwargs)
            if isinstance(out, torch.Tensor):
                assert torch.isfinite(out).all(), "non-finite logits"
        return run

    def small_cache(n: int, batch: int = 1) -> ExLlamaV2Cache:
        return ExLlamaV2Cache(model, max_seq_len=n, batch_size=batch)

    return [
        ("forward float ids", forward(ids.float()), ["input_ids"]),
        ("forward empty", forward(torch.zeros((1, 0), dtype=torch.long)), ["input_ids"]),
        ("forward 1-D", forward(ids[0]), ["input_ids"]),
        ("forward 3-D", forward(ids[None]), ["input_ids"]),
        ("forward list", forward([[1, 2]]), ["input_ids"]),
        ("forward None", forward(None), ["input_ids"]),
        ("forward bool ids", forward(ids.bool()), ["input_ids"]),
        ("forward id = vocab", forward(torch.tensor([[1, 250]])), ["token id 250"]),
        ("forward negative id", forward(torch.tensor([[-3, 1]])), ["token id -3"]),
        ("cache too short", forward(torch.ones((1, 40), dtype=torch.long), small_cache(32)), ["cache", "max_seq_len"]),
        ("batch above cache", forward(torch.ones((2, 4), dtype=torch.long), small_cache(32)), ["batch"]),
        ("mask wrong shape", forward(ids, input_mask=torch.ones((1, 2), dtype=torch.bool)), ["input_mask", "mask"]),
        ("encode None", lambda: tok.encode(None), ["text"]),
        ("encode int", lambda: tok.encode(5), ["text"]),
        ("encode list of ints", lambda: tok.encode([1, 2]), ["text"]),
        ("decode string", lambda: tok.decode("hello"), ["decode"]),
        ("decode 3-D", lambda: tok.decode(torch.zeros((1, 1, 2), dtype=torch.long)), ["decode"]),
        ("decode id beyond vocab", lambda: tok.decode(torch.tensor([10**6])), []),
    ] + sampler_cases() + generator_cases(model, tok)


def generator_cases(model: ExLlamaV2, tok: ExLlamaV2Tokenizer) -> list[tuple[str, Callable[[], Any], list[str]]]:
    from exllamav2.generator import ExLlamaV2BaseGenerator, ExLlamaV2DynamicGenerator, ExLlamaV2Sampler

    def dynamic(**kwargs) -> Callable[[], Any]:
        def run():
            cache = ExLlamaV2Cache(model, max_seq_len=256)
            gen = ExLlamaV2DynamicGenerator(model, cache, tok)
            gen.generate(**{"prompt": "Once", "max_new_tokens": 4, **kwargs})
        return run

    def simple(**kwargs) -> Callable[[], Any]:
        def run():
            cache = ExLlamaV2Cache(model, max_seq_len=64)
            gen = ExLlamaV2BaseGenerator(model, cache, tok)
            gen.generate_simple(**{"prompt": "Once", "gen_settings": ExLlamaV2Sampler.Settings(), "num_tokens": 4,
                                   **kwargs})
        return run

    def must_raise(run: Callable[[], Any]) -> Callable[[], Any]:
        def strict():
            run()
            raise AssertionError("accepted silently: a wrong setting must be refused")
        return strict

    def settings(**values) -> ExLlamaV2Sampler.Settings:
        s = ExLlamaV2Sampler.Settings()
        for k, v in values.items():
            setattr(s, k, v)
        return s

    return [
        ("dynamic max_new_tokens=-1", dynamic(max_new_tokens=-1), ["max_new_tokens"]),
        ("dynamic max_new_tokens='4'", dynamic(max_new_tokens="4"), ["max_new_tokens"]),
        ("dynamic prompt=None", dynamic(prompt=None), ["prompt"]),
        ("dynamic prompt=5", dynamic(prompt=5), ["prompt"]),
        ("dynamic prompt too long", dynamic(prompt="word " * 400), ["max_seq_len", "cache", "prompt", "context"]),
        ("dynamic temperature=-1", must_raise(dynamic(gen_settings=settings(temperature=-1.0))), ["temperature"]),
        ("dynamic top_p=1.5", must_raise(dynamic(gen_settings=settings(top_p=1.5))), ["top_p"]),
        ("simple num_tokens=-5", simple(num_tokens=-5), ["num_tokens"]),
        ("simple prompt=None", simple(prompt=None), ["prompt", "text"]),
        ("simple top_k=-3", must_raise(simple(gen_settings=settings(top_k=-3))), ["top_k"]),
        ("simple gen_settings=None", simple(gen_settings=None), ["gen_settings", "settings"]),
    ]


def sampler_cases() -> list[tuple[str, Callable[[], Any], list[str]]]:
    from exllamav2.generator import ExLlamaV2Sampler
    from exllamav2.inputs import check_sampler_settings

    cases = []
    for attr, value in (("temperature", -1.0), ("top_p", 1.5), ("top_k", -5), ("min_p", -0.2), ("top_k", 1.5),
                        ("token_repetition_penalty", 0.0), ("temperature", float("nan")), ("typical", 2.0),
                        ("tfs", -1.0), ("top_p", "0.5")):
        def run(attr=attr, value=value) -> None:
            settings = ExLlamaV2Sampler.Settings()
            setattr(settings, attr, value)
            check_sampler_settings(settings)
        cases.append((f"sampler {attr}={value!r}", run, [attr]))
    return cases


def test_fuzz_runtime_misuse(loaded):
    model, tok = loaded
    cases = misuse_cases(model, tok)
    problems = []
    for case_id, run, culprits in cases:
        problem = outcome(case_id, run, culprits)
        if problem:
            problems.append(problem)
    report(problems, len(cases))


def test_case_count():
    """The issue asks for a few hundred cases; keep the generators honest."""
    rng = random.Random(SEED)
    names = [f"t{i}" for i in range(10)]
    n = (len(config_cases(rng, {}, 110)) + len(safetensors_cases(rng, names, 1000)) + 9 * 7
         + len(tokenizer_cases(rng, {"added_tokens": []})) + 18 + 10 + 11)
    assert 250 <= n <= 500, n
