"""Bad model directories fail early with an error that names the file and the problem."""

from __future__ import annotations

import json
import shutil

import pytest

from exllamav2 import ExLlamaV2, ExLlamaV2Config
from exllamav2.config import ConfigError
from exllamav2.module import TensorShapeError
from exllamav2.stloader import TensorFileError


@pytest.fixture
def model_copy(tiny_model_factory, tmp_path):
    src, _ = tiny_model_factory("llama")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ExLlamaV2Config(str(tmp_path / "nope"))


def test_no_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ExLlamaV2Config(str(tmp_path))


def test_invalid_json(model_copy):
    (model_copy / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],\n  "hidden_size": }')
    with pytest.raises(ConfigError, match=r"config.json: invalid JSON at line 2"):
        ExLlamaV2Config(str(model_copy))


def test_no_safetensors(model_copy):
    for f in model_copy.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        ExLlamaV2Config(str(model_copy))


def test_truncated_safetensors(model_copy):
    f = next(model_copy.glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(TensorFileError, match=rf"{f.name}.*truncated"):
        ExLlamaV2Config(str(model_copy))


def test_garbage_safetensors(model_copy):
    f = next(model_copy.glob("*.safetensors"))
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(TensorFileError, match=f.name):
        ExLlamaV2Config(str(model_copy))


def test_shape_disagrees_with_config(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (model_copy / "config.json").write_text(json.dumps(cfg))
    model = ExLlamaV2(ExLlamaV2Config(str(model_copy)))
    with pytest.raises(TensorShapeError, match=r"mlp\.(gate|up|down)_proj\.weight.*\(128, 64\).*config.json"):
        model.load()
    assert not model.loaded


def test_unsupported_rope_type(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "mystery", "rope_theta": 10000.0}
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unsupported rope type 'mystery'"):
        ExLlamaV2Config(str(model_copy))


def test_missing_architectures(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    del cfg["architectures"]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="architectures"):
        ExLlamaV2Config(str(model_copy))


@pytest.mark.parametrize("bad_id", [-1, 250, 10_000])
def test_token_id_outside_the_vocabulary(tiny_model_factory, bad_id):
    import torch

    model_dir, _ = tiny_model_factory("llama")
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    model.load()
    with pytest.raises(ValueError, match=rf"token id {bad_id} is outside the vocabulary \(size 250\)"):
        model.forward(torch.tensor([[5, bad_id]]))
