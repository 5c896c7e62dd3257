"""A random-weight EXL2 model with Llama-3-8B shapes (or fewer layers, or tiny shapes) for speed tests.

What the converter would write for such a model, minus GPTQ (speed does not depend on the values):
- layouts: the converter's optimizer (`conversion.optimize.choose`) picks one candidate per module
  from the converter's own tables (`conversion.qparams`) to meet the bits-per-weight target. In place
  of a measurement it is given an assumed error model, quantization noise power falling as 4^-bits
  per weight; the head takes the converter's `-hb` layout;
- weights: random codes (uniform over each group's width), random 4-bit scale codes and random
  activation orders (q/k/v and gate/up share theirs, as converted models do), packed by the
  converter's packer (`quant.exl2.pack_exl2`); q_scale_max is set so the weights' RMS is
  `WEIGHT_RMS`, which keeps activations finite through all layers;
- files: output*.safetensors (written by the converter's shard writer), config.json with the
  converter's quantization_config, and a byte-level BPE tokenizer.json with Llama-3's special-token
  layout (the dynamic generator needs a tokenizer; upstream's loads the same file).

Everything is drawn from one seeded generator on the device that makes the model, so a seed gives
the same files on every run on that kind of device. `bench_model.json` (written last) records the
spec; a directory holding a matching one is reused instead of rebuilt.

    .venv/bin/python benchmarks/make_bench_model.py OUT_DIR [--layers 4] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import torch

log = logging.getLogger("make_bench_model")

MARKER = "bench_model.json"
EMBED_KEY = "model.embed_tokens.weight"
WEIGHT_RMS = 0.02                       # RMS of every linear weight, as a trained model's init scale
SCALE_CODES = (8, 16)                   # 4-bit scale codes drawn from [8, 16): (s+1)^2/256 in 0.32..1
SHARD_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class ModelSpec:
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    vocab_size: int = 128256
    num_special_tokens: int = 256         # the last ids of the vocabulary, as Llama-3's
    bits: float = 4.0                     # target bits per weight of the decoder layers
    head_bits: int = 6                    # the converter's -hb
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def regular_vocab(self) -> int:
        """Ids below this are ordinary tokens (prompts are drawn from them)."""
        return self.vocab_size - self.num_special_tokens


LLAMA3_8B = ModelSpec()
TINY = ModelSpec(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=1024, num_special_tokens=16)


# layouts ------------------------------------------------------------------------------------------


def module_linears(spec: ModelSpec, module: str) -> list[tuple[str, int, int]]:
    """(role, in_features K, out_features N) of one decoder module's linears, in the converter's order."""
    h, i = spec.hidden_size, spec.intermediate_size
    q, kv = spec.num_attention_heads * spec.head_dim, spec.num_key_value_heads * spec.head_dim
    if module == "self_attn":
        return [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h)]
    if module == "mlp":
        return [("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]
    raise ValueError(f"unknown module {module!r}; expected 'self_attn' or 'mlp'")


def assumed_record(option, linears: list[tuple[str, int, int]]) -> dict:
    """A measurement record for one candidate under the assumed error model: the error of a linear
    is 4^-bpw (noise power of a bpw-bit quantizer), weighted by its size."""
    total = numel = 0
    err = 0.0
    record: dict = {}
    for qp, (role, k, n) in zip(option, linears):
        bits = qp.total_bits(k, n)
        total += bits
        numel += k * n
        err += k * n * 4.0 ** (-bits / (k * n))
        record[role] = qp.to_dict()
    return {"accuracy": 1.0 - err / numel, "total_bits": total, **record}


def choose_layouts(spec: ModelSpec) -> tuple[dict, float]:
    """Per decoder module ('model.layers.<i>.self_attn' / '.mlp'), the QParams of each linear as the
    converter's optimizer picks them for spec.bits; and the resulting layer bpw as the converter counts it."""
    from exllamav2.conversion.optimize import choose
    from exllamav2.conversion.qparams import ATTN_OPTIONS, MLP_OPTIONS, QParams

    measurement, numel = {}, {}
    for layer in range(spec.num_hidden_layers):
        for module, options in (("self_attn", ATTN_OPTIONS), ("mlp", MLP_OPTIONS)):
            linears = module_linears(spec, module)
            name = f"model.layers.{layer}.{module}"
            numel[name] = sum(k * n for _, k, n in linears)
            measurement[name] = [assumed_record(option, linears) for option in options]
    chosen = choose(measurement, numel, spec.bits)
    layouts = {name: {role: QParams.from_dict(rec[role]) for role, _, _ in module_linears(spec, name.rsplit(".", 1)[1])}
               for name, rec in chosen.items()}
    bpw = sum(rec["total_bits"] for rec in chosen.values()) / sum(numel.values())
    return layouts, bpw


# random EXL2 tensors ----------------------------------------------------------------------------------


def scale_max_for_rms(bits: int, rms: float = WEIGHT_RMS) -> float:
    """q_scale_max giving weights of RMS `rms` for uniform codes and uniform scale codes in SCALE_CODES:
    w = (code - 2^(b-1)) * (s+1)^2/256 * q_scale_max, the two factors independent."""
    z = 1 << (bits - 1)
    code_ms = sum((c - z) ** 2 for c in range(1 << bits)) / (1 << bits)
    lo, hi = SCALE_CODES
    scale_ms = sum(((s + 1) ** 2 / 256) ** 2 for s in range(lo, hi)) / (hi - lo)
    return rms / (code_ms * scale_ms) ** 0.5


def random_exl2(k: int, n: int, qp, perm: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One EXL2 layer's tensors (q_weight, q_scale, q_scale_max, q_groups, q_invperm) with random codes."""
    from exllamav2.quant.exl2 import pack_exl2

    layout = qp.layout(k)
    device = perm.device
    codes = torch.empty((k, n), dtype=torch.int32, device=device)
    row = 0
    for bits, rows in layout:
        codes[row : row + rows] = torch.randint(0, 1 << bits, (rows, n), generator=gen, device=device,
                                                dtype=torch.int32)
        row += rows
    scale_codes = torch.randint(*SCALE_CODES, (len(layout), n), generator=gen, device=device)
    scale_max = torch.tensor([scale_max_for_rms(bits) for bits, _ in layout], dtype=torch.float16, device=device)
    return pack_exl2(codes, layout, scale_codes, scale_max, perm)


def model_tensors(spec: ModelSpec, layouts: dict, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the model, in file order, on the CPU; `layouts` from choose_layouts."""
    from exllamav2.conversion.qparams import HEAD_OPTIONS

    gen = torch.Generator(device=device).manual_seed(spec.seed)
    h = spec.hidden_size

    def ones() -> torch.Tensor:                 # a new tensor per norm: safetensors refuses shared storage
        return torch.ones(h, dtype=torch.float16)

    emb = torch.randn((spec.vocab_size, h), generator=gen, device=device, dtype=torch.float32) * WEIGHT_RMS
    yield EMBED_KEY, emb.half().cpu()
    for layer in range(spec.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        yield f"{prefix}.input_layernorm.weight", ones()
        for module in ("self_attn", "mlp"):
            perms: dict[int, torch.Tensor] = {}   # linears reading the same input share an order
            for role, k, n in module_linears(spec, module):
                shared = role in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
                perm = perms.get(k) if shared else None
                if perm is None:
                    perm = torch.randperm(k, generator=gen, device=device)
                    if shared:
                        perms[k] = perm
                qp = layouts[f"{prefix}.{module}"][role]
                for suffix, t in random_exl2(k, n, qp, perm, gen).items():
                    yield f"{prefix}.{module}.{role}.{suffix}", t.cpu()
            if module == "self_attn":
                yield f"{prefix}.post_attention_layernorm.weight", ones()
    yield "model.norm.weight", ones()
    perm = torch.randperm(h, generator=gen, device=device)
    for suffix, t in random_exl2(h, spec.vocab_size, HEAD_OPTIONS[spec.head_bits], perm, gen).items():
        yield f"lm_head.{suffix}", t.cpu()


# the other files ------------------------------------------------------------------------------------


def special_tokens(spec: ModelSpec) -> list[str]:
    """Llama-3's layout: begin/end of text, then reserved tokens, at the end of the vocabulary."""
    names = ["<|begin_of_text|>", "<|end_of_text|>"]
    return names + [f"<|reserved_special_token_{i}|>" for i in range(spec.num_special_tokens - len(names))]


def write_tokenizer(out_dir: Path, spec: ModelSpec) -> None:
    """Byte-level BPE: the 256 byte symbols, then every pair of them, then pair+byte triples, until
    `regular_vocab` tokens; each multi-byte token has its merge. Special tokens follow."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    pairs: list[str] = []

    def add(left: str, right: str) -> bool:
        if len(vocab) >= spec.regular_vocab:
            return False
        vocab[left + right] = len(vocab)
        merges.append((left, right))
        return True

    for a in alphabet:
        for b in alphabet:
            if add(a, b):
                pairs.append(a + b)
    for p in pairs:
        for c in alphabet:
            add(p, c)
    if len(vocab) != spec.regular_vocab:
        raise ValueError(f"the tokenizer can build at most {len(vocab)} regular tokens, the spec asks for "
                         f"{spec.regular_vocab}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = special_tokens(spec)
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": specials[0], "eos_token": specials[1], "model_max_length": 8192,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }, indent=2), encoding="utf-8")


def config_json(spec: ModelSpec) -> dict:
    from exllamav2.version import __version__

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": spec.regular_vocab,
        "eos_token_id": spec.regular_vocab + 1,
        "torch_dtype": "float16",
        "quantization_config": {
            "quant_method": "exl2",
            "version": __version__,
            "bits": spec.bits,
            "head_bits": spec.head_bits,
            "calibration": {"rows": 0, "length": 0, "dataset": "none: random codes (benchmark model)"},
        },
    }


# the model directory --------------------------------------------------------------------------------


def weight_bytes_per_step(model_dir: Path) -> int:
    """Bytes of weights one forward step reads: every tensor in the files except the embedding table
    (a step looks up only its tokens' rows, and exllamav2 keeps the table in system memory)."""
    from exllamav2.stloader import SafetensorsIndex

    index = SafetensorsIndex([str(p) for p in model_dir.glob("*.safetensors")])
    return sum(index.nbytes(name) for name in index.keys() if name != EMBED_KEY)


def read_marker(model_dir: Path) -> dict | None:
    path = Path(model_dir) / MARKER
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def make_model(out_dir: Path, spec: ModelSpec, device: torch.device | str = "cpu") -> dict:
    """Write the model into out_dir (which must not hold weights yet); returns the marker's content."""
    from exllamav2.conversion.compile import write_shards

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.glob("*.safetensors")):
        raise FileExistsError(f"{out_dir} already holds safetensors files; pass an empty or new directory")
    device = torch.device(device)
    start = time.perf_counter()
    layouts, bpw = choose_layouts(spec)
    with torch.inference_mode():
        files = write_shards(model_tensors(spec, layouts, device), out_dir, SHARD_BYTES)
    (out_dir / "config.json").write_text(json.dumps(config_json(spec), indent=2), encoding="utf-8")
    write_tokenizer(out_dir, spec)
    marker = {
        "spec": asdict(spec),
        "layers_bpw": bpw,
        "made_on": device.type,
        "torch": torch.__version__,
        "files": [f.name for f in files],
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out_dir / MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
    log.info("wrote a %d-layer model (%.3f bpw layers, %d-bit head) to %s in %.0f s",
             spec.num_hidden_layers, bpw, spec.head_bits, out_dir, marker["seconds"])
    return marker


def ensure_model(out_dir: Path, spec: ModelSpec, device: torch.device | str = "cpu") -> dict:
    """The marker of a model of this spec in out_dir, making it first unless one is already there."""
    marker = read_marker(out_dir)
    if marker is not None and marker["spec"] == asdict(spec):
        log.info("reusing the model in %s (made on %s)", out_dir, marker["made_on"])
        return marker
    if marker is not None:
        raise FileExistsError(
            f"{out_dir} holds a benchmark model of another spec ({marker['spec']}); pass another --model-dir "
            f"or delete it"
        )
    return make_model(out_dir, spec, device)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (hidden 256, 2 layers) instead of Llama-3-8B")
    p.add_argument("--layers", type=int, help="number of decoder layers (default: the shape's)")
    p.add_argument("--bits", type=float, default=4.0, help="target bits per weight of the layers")
    p.add_argument("--head-bits", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = replace(TINY if args.tiny else LLAMA3_8B, bits=args.bits, head_bits=args.head_bits, seed=args.seed)
    if args.layers:
        spec = replace(spec, num_hidden_layers=args.layers)
    ensure_model(args.out_dir, spec, args.device)


if __name__ == "__main__":
    main()
