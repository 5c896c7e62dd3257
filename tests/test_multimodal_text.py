"""The text model of a multimodal checkpoint (Gemma 3, Mistral 3, Llava, Qwen2-VL), in both key layouts
transformers writes, with its vision tower accounted for and not read. Logits, decode and batches against
transformers are in tests/test_model.py (the `*_mm`, `llava` and `qwen2vl` architectures)."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file, save_file

from exllamav2 import ExLlamaV2, ExLlamaV2Config
from exllamav2.errors import ArchitectureError, CheckpointError
from tests.tiny_models import native_multimodal_key, rewrite_checkpoint

VOCAB = 250


def _logits(model_dir: str, ids: torch.Tensor) -> torch.Tensor:
    model = ExLlamaV2(ExLlamaV2Config(model_dir))
    model.load()
    return model.forward(ids)[..., :VOCAB]


@pytest.mark.parametrize("arch", ["gemma3_mm", "mistral3_mm", "llava"])
def test_both_key_layouts_give_transformers_logits(arch, tiny_model_factory, tmp_path, caplog):
    src, hf = tiny_model_factory(arch)
    assert any(k.startswith("language_model.model.") for k in load_file(next(src.glob("*.safetensors"))))
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
    native = str(rewrite_checkpoint(src, tmp_path / "native", rename=native_multimodal_key))
    with caplog.at_level("INFO"):
        for model_dir in (str(src), native):
            torch.testing.assert_close(_logits(model_dir, ids), ref, atol=1e-3, rtol=1e-3)
    assert "vision tower and projector tensors" in caplog.text


def test_unknown_text_model_is_refused(tiny_model_factory, tmp_path):
    src, _ = tiny_model_factory("llava")

    def text_type(cfg):
        cfg["text_config"]["model_type"] = "mystery"

    with pytest.raises(ArchitectureError, match="LlavaForConditionalGeneration.*'mystery'"):
        ExLlamaV2Config(str(rewrite_checkpoint(src, tmp_path / "m", edit=text_type)))


def test_unexpected_text_tensor_is_still_refused(tiny_model_factory, tmp_path):
    src, _ = tiny_model_factory("gemma3_mm")
    dst = str(rewrite_checkpoint(src, tmp_path / "m"))
    path = next((tmp_path / "m").glob("*.safetensors"))
    tensors = load_file(path)
    tensors["language_model.model.layers.0.self_attn.extra_norm.weight"] = torch.ones(16, dtype=torch.float16)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="extra_norm"):
        ExLlamaV2(ExLlamaV2Config(dst))
