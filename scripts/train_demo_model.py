"""Train the bundled demo model (examples/demo_model/fp16) from scratch, on the CPU, offline.

The demo model exists so `python examples/chat.py` runs on any machine without a download. It is a
tiny Llama-architecture model (about 3.4M parameters, 6.8 MB in FP16) trained for a few minutes on
the docstrings of the Python standard library that runs this script. It writes docstring-flavoured
text and answers "What does json.dumps do?"-style questions with something that reads like a
docstring; it knows nothing else and is often wrong. It is a smoke test, not an assistant.

Corpus: every public module, class and function docstring under the standard library directory
(parsed with `ast`, so nothing is imported; test suites, IDLE, tkinter and the 2to3 tool are left
out), in sorted file order, duplicates dropped. Each docstring is used twice: as plain text, and the
first paragraph of public ones as the answer in a short chat log in examples/chat_prompts.py's
"raw" format ("User: What does x.y do?\\nChatbort: ..."), so the demo answers in chat mode.

Tokenizer: byte-level BPE trained with `tokenizers` on the same corpus; <pad>=0, <s>=1, </s>=2.

Training: transformers' LlamaForCausalLM on one thread, fixed seed, fixed step count, AdamW with
linear warm-up and cosine decay. The same Python version (the corpus is that version's stdlib) and
the same torch/transformers/tokenizers versions reproduce the files; other versions give a model of
the same shape and quality but different bytes.

transformers is a development dependency used only here and by the tests; the `exllamav2` package
itself does not need it.

    .venv/bin/python scripts/train_demo_model.py            # writes examples/demo_model/fp16
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import os
import platform
import sysconfig
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

# One thread everywhere (the tokenizer trainer is multi-threaded by default).
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

log = logging.getLogger("train_demo_model")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "examples" / "demo_model" / "fp16"

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# Skipped stdlib parts: test suites and GUI/tool code, whose docstrings are mostly noise.
SKIP_TOP = {"site-packages", "dist-packages", "test", "idlelib", "lib2to3", "turtledemo", "tkinter", "ensurepip"}
SKIP_ANY = {"test", "tests", "__pycache__"}

# The raw chat format's default system prompt and names (examples/chat_prompts.py).
USER, BOT = "User", "Chatbort"
SYSTEM_LINE = f"This is a conversation between a helpful AI assistant named {BOT} and a user named {USER}."
QUESTIONS = {
    "function": ["What does {} do?", "Explain {}.", "How do I use {}?", "What is {} for?"],
    "class": ["What is {}?", "Explain the class {}.", "What is {} used for?"],
    "module": ["What is the {} module?", "What does the module {} provide?", "Tell me about {}."],
}
MAX_ANSWER_CHARS = 400
PAIRS_PER_CHAT = 3


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class Doc:
    qualname: str
    kind: str  # "module" | "class" | "function"
    text: str


# corpus ------------------------------------------------------------------------------------


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _docs_in_file(path: Path, module: str) -> list[Doc]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    found: list[Doc] = []
    doc = ast.get_docstring(tree)
    if doc:
        found.append(Doc(module, "module", doc))

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if node.name.startswith("_"):
                continue
            qualname = f"{prefix}.{node.name}"
            doc = ast.get_docstring(node)
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            if doc:
                found.append(Doc(qualname, kind, doc))
            if isinstance(node, ast.ClassDef):
                visit(node.body, qualname)

    visit(tree.body, module)
    return found


def stdlib_docstrings(min_chars: int = 20) -> list[Doc]:
    """Public docstrings of the running interpreter's standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    docs: list[Doc] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in SKIP_TOP or SKIP_ANY.intersection(rel.parts[:-1]):
            continue
        module = _module_name(rel)
        if any(part.startswith("_") for part in module.split(".")):
            continue
        for doc in _docs_in_file(path, module):
            if len(doc.text) >= min_chars and doc.text not in seen:
                seen.add(doc.text)
                docs.append(doc)
    return docs


def _first_paragraph(text: str) -> str:
    para = text.strip().split("\n\n", 1)[0]
    return " ".join(line.strip() for line in para.splitlines())


def _pick(options: list[str], key: str) -> str:
    # crc32, not hash(): stable across runs and interpreters.
    return options[zlib.crc32(key.encode()) % len(options)]


def chat_logs(docs: list[Doc]) -> list[str]:
    """Short chat logs in the raw format, PAIRS_PER_CHAT question/answer pairs each."""
    pairs = []
    for doc in docs:
        answer = _first_paragraph(doc.text)
        if len(answer) <= MAX_ANSWER_CHARS:
            question = _pick(QUESTIONS[doc.kind], doc.qualname).format(doc.qualname)
            pairs.append(f"{USER}: {question}\n{BOT}: {answer}")
    logs = []
    for i in range(0, len(pairs), PAIRS_PER_CHAT):
        body = "\n".join(pairs[i : i + PAIRS_PER_CHAT])
        # A third of the logs open with the system line chat.py sends by default.
        with_system = zlib.crc32(body.encode()) % 3 == 0
        logs.append(f"{SYSTEM_LINE}\n{body}" if with_system else body)
    return logs


# tokenizer ---------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, piece in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(piece) != i:
            raise RuntimeError(f"special token {piece!r} did not get id {i}; check SPECIAL_TOKENS")
    return tok


def token_stream(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts as one stream: <s> text </s> <s> text </s> ..."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.append(BOS_ID)
        ids.extend(enc.ids)
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


# model -------------------------------------------------------------------------------------


def hf_config_dict(shape: ModelShape) -> dict:
    """config.json in the classic Llama checkpoint layout, independent of the transformers version."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.hidden_size // shape.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_theta": shape.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "torch_dtype": "float16",
        "use_cache": True,
    }


def build_model(shape: ModelShape):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(hf_config_dict(shape))
    for key in ("architectures", "model_type", "torch_dtype"):
        cfg.pop(key)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, stream: torch.Tensor, args: argparse.Namespace) -> float:
    seq = args.seq_len
    n_chunks = (len(stream) - 1) // seq
    chunks = stream[: n_chunks * seq].view(n_chunks, seq)
    # Epoch after epoch of shuffled chunk orders, long enough for every step.
    gen = torch.Generator().manual_seed(args.seed)
    epochs = math.ceil(args.steps * args.batch_size / n_chunks)
    order = torch.cat([torch.randperm(n_chunks, generator=gen) for _ in range(epochs)])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    start = time.perf_counter()
    loss_avg = float("nan")
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        batch = chunks[order[step * args.batch_size : (step + 1) * args.batch_size]]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_avg = loss.item() if step == 0 else 0.95 * loss_avg + 0.05 * loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            log.info("step %d/%d  loss %.3f  %.0fs", step, args.steps, loss_avg, time.perf_counter() - start)
    return loss_avg


# output ------------------------------------------------------------------------------------


def save(out: Path, model, tok: Tokenizer, shape: ModelShape, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config_dict(shape), indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}, indent=2) + "\n"
    )
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": shape.max_position_embeddings,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "training_info.json").write_text(json.dumps(meta, indent=2) + "\n")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    p.add_argument("--steps", type=int, default=330, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=30, help="warm-up steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p.parse_args()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    shape = ModelShape()

    docs = stdlib_docstrings()
    texts = [d.text for d in docs] + chat_logs(docs)
    log.info("corpus: %d docstrings, %d texts, %d chars", len(docs), len(texts), sum(map(len, texts)))
    tok = train_tokenizer(texts, shape.vocab_size)
    stream = token_stream(tok, texts)
    log.info("tokens: %d", len(stream))

    model = build_model(shape)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters", n_params / 1e6)
    start = time.perf_counter()
    loss = train(model, stream, args)
    seconds = time.perf_counter() - start

    import transformers
    import tokenizers

    meta = {
        "what": "demo model trained by scripts/train_demo_model.py on Python standard library docstrings",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "parameters": n_params,
        "corpus_docstrings": len(docs),
        "corpus_tokens": len(stream),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "seed": args.seed,
        "threads": args.threads,
        "final_train_loss": round(loss, 4),
    }
    save(args.out, model, tok, shape, meta)
    log.info("wrote %s (final loss %.3f, %.0fs)", args.out, loss, seconds)


if __name__ == "__main__":
    main()
