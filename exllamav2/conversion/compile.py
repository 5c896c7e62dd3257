"""Write the converted model: quantized layers plus the unquantized tensors, in shards, with the
input's config (plus quantization_config) and its tokenizer and other small files.

config.json is written last: until it is there, the output directory does not look like a model, so a
compile that is killed or runs out of disk never leaves something that loads as a finished model. A
resumed compile first removes what the interrupted one wrote."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm

from ..version import __version__
from . import files
from .layers import linears_of

log = logging.getLogger(__name__)

_SKIP_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".safetensors.index.json", ".bin.index.json")


def replaced_tensors(model) -> set[str]:
    """Input tensors that quantized layers replace: each linear's own weight and bias, or the fused (or stacked
    expert) checkpoint tensor it was sliced from. A tied head replaces nothing (the embedding stays)."""
    index = model.config.index
    names: set[str] = set()
    for module in model.modules[1:]:
        for lin in linears_of(module):
            stacked = getattr(lin, "stacked_source", lambda: None)()     # an expert sliced from a stacked tensor
            if stacked is not None:
                names.add(stacked[0])
                continue
            for key in (lin.key, lin.fused[0] if lin.fused else None):
                if key and index.has(f"{key}.weight"):
                    names.update({f"{key}.weight", f"{key}.bias"})
                    break
    return names


def _output_tensors(model, tensor_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in sorted(tensor_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    index = model.config.index
    skip = replaced_tensors(model)
    for name in sorted(index.keys()):
        if name not in skip:
            t = index.get(name)
            yield name, t.half() if t.is_floating_point() else t


def write_shards(tensors: Iterator[tuple[str, torch.Tensor]], out_dir: Path, shard_bytes: int) -> list[Path]:
    """Write shards of at most shard_bytes (one tensor may exceed it), named as upstream names them:
    output.safetensors, or output-0000i-of-0000n.safetensors."""
    paths: list[Path] = []

    def flush(shard: dict[str, torch.Tensor]) -> None:
        path = out_dir / f"output-{len(paths) + 1:05d}.part"      # not globbed as weights until renamed
        files.save_tensors(shard, path, metadata={"format": "pt"})
        paths.append(path)

    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in tensors:
        if shard and size + t.nbytes > shard_bytes:
            flush(shard)
            shard, size = {}, 0
        shard[name] = t.contiguous()
        size += t.nbytes
    flush(shard)
    n = len(paths)
    return [p.rename(out_dir / ("output.safetensors" if n == 1 else f"output-{i + 1:05d}-of-{n:05d}.safetensors"))
            for i, p in enumerate(paths)]


def compile_model(job: dict, model, tensor_dir: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    files.remove_outputs(out_dir)
    shard_bytes = int(job["shard_size"] * 1024**2)
    paths = write_shards(tqdm(_output_tensors(model, tensor_dir), desc="Writing", unit="tensor"),
                         out_dir, shard_bytes)
    in_dir = Path(job["in_dir"])
    for f in sorted(in_dir.iterdir()):
        if f.is_file() and f.name != "config.json" and not f.name.endswith(_SKIP_FILES):
            files.copy_file(f, out_dir / f.name)
    config = json.loads((in_dir / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = {
        "quant_method": "exl2",
        "version": __version__,
        "bits": job["bits"],
        "head_bits": job["head_bits"],
        "calibration": {"rows": job["dataset_rows"], "length": job["length"], "dataset": job["cal_dataset_name"]},
    }
    files.write_text(out_dir / "config.json", json.dumps(config, indent=2))    # last: now it is a model
    log.info("wrote %s (%d shard%s) to %s", ", ".join(p.name for p in paths), len(paths),
             "" if len(paths) == 1 else "s", out_dir)
