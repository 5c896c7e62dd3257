"""Bad model directories fail early with an error that names the file and the problem."""

from __future__ import annotations

import json
import shutil

import pytest

from exllamav2 import ExLlamaV2, ExLlamaV2Config
from exllamav2.config import ConfigError
from exllamav2.model.module import TensorShapeError
from exllamav2.stloader import TensorFileError




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


# the error hierarchy -----------------------------------------------------------------------------


def test_errors_keep_the_builtins_callers_catch():
    from exllamav2 import errors
    from exllamav2.attn.env import AttentionConfigError
    from exllamav2.conversion.pipeline import ConversionError

    for cls, builtin in ((TensorFileError, ValueError), (TensorShapeError, ValueError), (ConfigError, ValueError),
                         (AttentionConfigError, ValueError), (ConversionError, ValueError),
                         (errors.MissingTensorError, KeyError), (errors.ModelFileNotFoundError, FileNotFoundError),
                         (errors.InputTypeError, TypeError), (errors.GenerationArgumentError, ValueError),
                         (errors.TokenizerError, ValueError)):
        assert issubclass(cls, errors.ExLlamaV2Error) and issubclass(cls, builtin), cls
    # a KeyError subclass prints its message, not its repr
    assert str(errors.MissingTensorError("tensor 'x' is missing")) == "tensor 'x' is missing"


# safetensors files ---------------------------------------------------------------------------------


def _rewrite_header(path, edit):
    """Rewrite a safetensors file's header through `edit(header) -> header`, keeping the data."""
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = edit(json.loads(data[8 : 8 + n]))
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _first_tensor(header):
    return next(k for k in header if k != "__metadata__")


@pytest.mark.parametrize("edit,match", [
    (lambda h: [1, 2], r"header is a JSON list"),
    (lambda h: {**h, _first_tensor(h): {**h[_first_tensor(h)], "dtype": "F17"}}, r"unknown dtype 'F17'"),
    (lambda h: {**h, _first_tensor(h): {**h[_first_tensor(h)], "shape": [2, "x"]}}, r"shape \[2, 'x'\]"),
    (lambda h: {**h, _first_tensor(h): {**h[_first_tensor(h)], "shape": [1, 1]}}, r"needs 2 bytes but its data_offsets"),
    (lambda h: {**h, _first_tensor(h): {k: v for k, v in h[_first_tensor(h)].items() if k != "data_offsets"}},
     r"data_offsets None"),
    (lambda h: {**h, _first_tensor(h): "x"}, r"header entry is str"),
])
def test_malformed_header_names_file_and_tensor(model_copy, edit, match):
    f = next(model_copy.glob("*.safetensors"))
    _rewrite_header(f, edit)
    with pytest.raises(TensorFileError, match=match) as e:
        ExLlamaV2Config(str(model_copy))
    assert f.name in str(e.value)


def test_duplicate_tensor_across_shards(model_copy):
    f = next(model_copy.glob("*.safetensors"))
    shutil.copy(f, model_copy / "extra.safetensors")
    with pytest.raises(TensorFileError, match=r"is in both .* and .*; one of them does not belong"):
        ExLlamaV2Config(str(model_copy))


def test_shard_index_names_a_missing_shard(model_copy):
    f = next(model_copy.glob("*.safetensors"))
    index = {"metadata": {}, "weight_map": {"model.norm.weight": f.name, "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002.safetensors, which is not in"):
        ExLlamaV2Config(str(model_copy))


def test_non_finite_weight_is_named_at_load(model_copy):
    import struct

    import torch

    f = next(model_copy.glob("*.safetensors"))
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = "model.norm.weight"
    start = 8 + n + header[name]["data_offsets"][0]
    width = torch.finfo(torch.float16).bits // 8
    data[start : start + width] = torch.tensor([float("inf")], dtype=torch.float16).view(torch.uint8).numpy().tobytes()
    f.write_bytes(bytes(data))
    model = ExLlamaV2(ExLlamaV2Config(str(model_copy)))
    with pytest.raises(TensorFileError, match=rf"tensor '{name}' holds 1 non-finite"):
        model.load()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2"])
def test_nonfinite_scan_matches_isfinite(dtype):
    import torch

    from exllamav2.stloader import has_nonfinite

    dt = getattr(torch, dtype)
    x = torch.randn(3, 1 << 20).clamp(-100, 100).to(dt)        # three chunks
    assert not has_nonfinite(x)
    edge = x.clone()
    edge.view(-1)[:2] = torch.tensor([torch.finfo(dt).max, -torch.finfo(dt).max], dtype=torch.float64).to(dt)
    assert not has_nonfinite(edge)                               # the largest finite values are finite
    for bad in (float("inf"), float("-inf"), float("nan")):
        y = x.clone()
        y.view(-1)[(2 << 20) + 5] = bad                          # in the last chunk
        assert has_nonfinite(y) == (not bool(torch.isfinite(y.float()).all())), (dtype, bad)


def test_layer_count_beyond_the_tensors(model_copy):
    from exllamav2.errors import CheckpointError

    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\."):
        model = ExLlamaV2(ExLlamaV2Config(str(model_copy)))
        model.load()


# runtime inputs --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tiny_model_factory):
    model_dir, _ = tiny_model_factory("llama")
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    model.load()
    return model


@pytest.mark.parametrize("ids,error,match", [
    ("float", TypeError, r"input_ids has dtype torch.float32, but token ids must be integers"),
    ("empty", ValueError, r"input_ids has shape \(1, 0\): there is no token"),
    ("1d", ValueError, r"add a batch dimension"),
    ("list", TypeError, r"input_ids must be a torch.Tensor"),
])
def test_forward_refuses_bad_input_ids(loaded, ids, error, match):
    import torch

    from exllamav2.errors import InputError

    value = {"float": torch.tensor([[1.0, 2.0]]), "empty": torch.zeros((1, 0), dtype=torch.long),
             "1d": torch.tensor([1, 2]), "list": [[1, 2]]}[ids]
    with pytest.raises(InputError, match=match) as e:
        loaded.forward(value)
    assert isinstance(e.value, error)


# tokenizer files and input -----------------------------------------------------------------------------


@pytest.fixture
def tok_copy(tiny, tmp_path):
    dst = tmp_path / "tok"
    shutil.copytree(tiny[0], dst)
    return dst


@pytest.mark.parametrize("name,content,match", [
    ("tokenizer.json", '{"version": "1.0", "model": ', r"tokenizer.json: invalid JSON at line 1"),
    ("tokenizer.json", "[]", r"tokenizer.json: the top level is a JSON list"),
    ("tokenizer.json", '{"model": {"type": "Nope"}}', r"tokenizer.json: cannot be loaded"),
    ("tokenizer_config.json", "{", r"tokenizer_config.json: invalid JSON"),
    ("tokenizer_config.json", '{"added_tokens_decoder": {"x": {"content": "<a>", "special": true}}}',
     r"tokenizer_config.json: added_tokens_decoder key has id 'x'"),
    ("added_tokens.json", '{"<a>": "seven"}', r"added_tokens.json: token '<a>' has id 'seven'"),
    ("tokenizer.json", "\udcff", r"tokenizer.json: not UTF-8"),
])
def test_corrupt_tokenizer_file_named(tok_copy, name, content, match):
    from exllamav2 import ExLlamaV2Tokenizer
    from exllamav2.errors import TokenizerError

    if content == "\udcff":
        (tok_copy / name).write_bytes(b'{"a": "\xff\xfe"}')
    else:
        (tok_copy / name).write_text(content)
    with pytest.raises(TokenizerError, match=match):
        ExLlamaV2Tokenizer(ExLlamaV2Config(str(tok_copy)))


@pytest.mark.parametrize("text", [None, 42, b"bytes", ["ok", 3]])
def test_encode_refuses_non_text(tiny, text):
    from exllamav2 import ExLlamaV2Tokenizer
    from exllamav2.errors import InputTypeError

    tok = ExLlamaV2Tokenizer(ExLlamaV2Config(str(tiny[0])))
    with pytest.raises(InputTypeError, match="must be a string or a list of strings"):
        tok.encode(text)


# sampler settings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("attr,value,match", [
    ("temperature", -0.5, r"temperature = -0.5 is out of range: it must be at least 0"),
    ("top_p", 1.5, r"top_p = 1.5 is out of range: it must be between 0 and 1"),
    ("top_p", -0.1, r"top_p = -0.1"),
    ("min_p", 2.0, r"min_p = 2.0"),
    ("top_k", -1, r"top_k = -1 is negative"),
    ("top_k", 2.5, r"top_k = 2.5 must be an integer"),
    ("token_repetition_penalty", 0.0, r"token_repetition_penalty = 0.0 is out of range: it must be above 0"),
    ("temperature", float("nan"), r"temperature = nan is not a number"),
    ("temperature", "hot", r"temperature = 'hot' is not a number"),
    ("xtc_probability", 1.5, r"xtc_probability = 1.5"),
])
def test_wrong_sampler_settings(attr, value, match):
    from exllamav2.errors import GenerationArgumentError
    from exllamav2.generator import ExLlamaV2Sampler
    from exllamav2.inputs import check_sampler_settings

    settings = ExLlamaV2Sampler.Settings()
    check_sampler_settings(settings)        # the defaults pass
    setattr(settings, attr, value)
    with pytest.raises(GenerationArgumentError, match=match):
        check_sampler_settings(settings)


def test_unusual_sampler_settings_pass():
    from exllamav2.generator import ExLlamaV2Sampler
    from exllamav2.inputs import check_sampler_settings

    for values in ({"temperature": 0.0}, {"temperature": 5.0}, {"top_k": 0}, {"top_p": 1.0},
                   {"token_repetition_penalty": 0.5}, {"min_temp": 0.5, "max_temp": 0.0}):
        settings = ExLlamaV2Sampler.Settings()
        for k, v in values.items():
            setattr(settings, k, v)
        check_sampler_settings(settings)
