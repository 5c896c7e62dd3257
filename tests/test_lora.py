"""LoRA adapters: logits equal transformers running the same model with the adapter merged in."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from exllamav2 import ExLlamaV2, ExLlamaV2Config, ExLlamaV2Lora

TARGETS = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]


def make_adapter(path, hf, r=4, alpha=8.0, rslora=False):
    path.mkdir()
    tensors = {}
    gen = torch.Generator().manual_seed(0)
    for i in range(hf.config.num_hidden_layers):
        for t in TARGETS:
            lin = hf.get_submodule(f"model.layers.{i}.{t}")
            base = f"base_model.model.model.layers.{i}.{t}"
            tensors[f"{base}.lora_A.weight"] = (torch.randn(r, lin.in_features, generator=gen) * 0.3).half()
            tensors[f"{base}.lora_B.weight"] = (torch.randn(lin.out_features, r, generator=gen) * 0.3).half()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"r": r, "lora_alpha": alpha, "use_rslora": rslora, "target_modules": ["q_proj", "v_proj", "down_proj"]}))
    return tensors


def merged_reference(hf, tensors, scaling):
    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for name, a in tensors.items():
            if ".lora_A." not in name:
                continue
            key = name.split(".lora_A.")[0].removeprefix("base_model.model.")
            b = tensors[name.replace(".lora_A.", ".lora_B.")]
            ref.get_submodule(key).weight += scaling * (b.float() @ a.float())
    return ref


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_matches_merged_weights(tiny_model_factory, tmp_path, rslora):
    model_dir, hf = tiny_model_factory("llama")
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    model.load()
    tensors = make_adapter(tmp_path / "lora", hf, rslora=rslora)
    lora = ExLlamaV2Lora.from_directory(model, str(tmp_path / "lora"), lora_scaling=0.5)
    scaling = 0.5 * (8.0 / 2.0 if rslora else 8.0 / 4)
    ids = torch.randint(3, 250, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = merged_reference(hf, tensors, scaling)(ids).logits
        base = hf(ids).logits
    ours = model.forward(ids, loras=[lora])[..., :250]
    assert (ours - ref).abs().max() < 1e-3 * ref.abs().max()
    assert (ours - base).abs().max() > 0.1          # the adapter really changed the output
    plain = model.forward(ids)[..., :250]
    assert (plain - base).abs().max() < 1e-3 * base.abs().max()


def test_pickle_adapter_refused(tiny_model_factory, tmp_path):
    model_dir, _ = tiny_model_factory("llama")
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    (tmp_path / "adapter_config.json").write_text('{"r": 4}')
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="pickle"):
        ExLlamaV2Lora.from_directory(model, str(tmp_path))
