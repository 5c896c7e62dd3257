"""config.json validation (exllamav2/config_check.py): every bad value is one ConfigError naming the file,
the key and the value, raised by ExLlamaV2Config before any tensor is read."""

from __future__ import annotations

import json

import pytest

from exllamav2 import ExLlamaV2Config
from exllamav2.config_check import validate_config, validate_generation_config
from exllamav2.errors import ConfigError, ExLlamaV2Error

BASE = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 250, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2, "rope_theta": 10000.0,
}

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}

# (change to BASE, regex the message must match: the key and the value)
BAD = [
    ({"num_hidden_layers": 10**12}, r"num_hidden_layers is 1000000000000, but must be a positive integer up to 65536"),
    ({"hidden_size": 128.5}, r"hidden_size is 128\.5, but must be a positive integer"),
    ({"hidden_size": "64"}, r"hidden_size is '64'"),
    ({"hidden_size": True}, r"hidden_size is True"),
    ({"num_hidden_layers": 0}, r"num_hidden_layers is 0"),
    ({"num_attention_heads": -4}, r"num_attention_heads is -4"),
    ({"num_key_value_heads": 3}, r"num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"hidden_size": 66}, r"hidden_size 66 is not divisible by num_attention_heads 4"),
    ({"intermediate_size": None, "vocab_size": [250]}, r"vocab_size is \[250\]"),
    ({"rms_norm_eps": -1e-6}, r"rms_norm_eps is -1e-06, but must be a positive number"),
    ({"rms_norm_eps": "small"}, r"rms_norm_eps is 'small'"),
    ({"eos_token_id": "x"}, r"eos_token_id is 'x', but must be a token id"),
    ({"eos_token_id": [2, "x"]}, r"eos_token_id is \[2, 'x'\]"),
    ({"eos_token_id": []}, r"eos_token_id is \[\]"),
    ({"bos_token_id": 1.5}, r"bos_token_id is 1\.5"),
    ({"sliding_window": "x"}, r"sliding_window is 'x', but must be a non-negative integer"),
    ({"sliding_window": -8}, r"sliding_window is -8"),
    ({"max_position_embeddings": 0}, r"max_position_embeddings is 0"),
    ({"tie_word_embeddings": "yes"}, r"tie_word_embeddings is 'yes', but must be true or false"),
    ({"partial_rotary_factor": 1.5}, r"partial_rotary_factor is 1\.5"),
    ({"head_dim": 1, "partial_rotary_factor": 0.5}, r"leaves no dimension to rotate"),
    ({"final_logit_softcapping": -3.0}, r"final_logit_softcapping is -3\.0"),
    ({"architectures": [42]}, r"architectures is \[42\], but must be a list of architecture names"),
    ({"architectures": "LlamaForCausalLM"}, r"architectures is 'LlamaForCausalLM'"),
    ({"layer_types": ["full_attention"]}, r"layer_types has 1 entries but num_hidden_layers is 2"),
    ({"no_rope_layers": [1, 2]}, r"no_rope_layers is \[1, 2\]"),
    ({"text_config": [1]}, r"text_config is \[1\], but must be an object"),
    ({"hidden_size": None, "text_config": {"hidden_size": 12.5}}, r"text_config\.hidden_size is 12\.5"),
    ({"quantization_config": "exl2"}, r"quantization_config is 'exl2', but must be an object"),
    ({"rope_theta": 0}, r"rope_theta is 0, but must be a positive number"),
    ({"rms_norm_eps": None, "norm_epsilon": "tiny"}, r"norm_epsilon is 'tiny'"),
    ({"logit_scale": "big"}, r"logit_scale is 'big'"),
    ({"original_max_position_embeddings": -8}, r"original_max_position_embeddings is -8"),
    # rope_scaling / rope_parameters
    ({"rope_scaling": "linear"}, r"rope_scaling is 'linear', but must be an object"),
    ({"rope_scaling": ["linear", 2.0]}, r"rope_scaling is \['linear', 2\.0\], but must be an object"),
    ({"rope_scaling": {"type": "linear"}}, r"rope_scaling of type 'linear' has no 'factor'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, r"rope_scaling\.factor is '2'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": -2.0}}, r"rope_scaling\.factor is -2\.0"),
    ({"rope_scaling": {"rope_type": "dynamic"}}, r"rope_scaling of type 'dynamic' has no 'factor'"),
    ({"rope_scaling": {"rope_type": "yarn"}}, r"rope_scaling of type 'yarn' has no 'factor'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": "32"}}, r"rope_scaling\.beta_fast is '32'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64.5}},
     r"rope_scaling\.original_max_position_embeddings is 64\.5"),
    ({"rope_scaling": {"rope_type": 3}}, r"rope_scaling\.rope_type is 3"),
    ({"rope_scaling": {k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}},
     r"rope_scaling of type 'llama3' has no 'low_freq_factor'"),
    ({"rope_scaling": {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}},
     r"has no 'original_max_position_embeddings'"),
    ({"rope_scaling": {**LLAMA3, "high_freq_factor": 1.0}}, r"high_freq_factor 1\.0 must be greater than low_freq_factor"),
    ({"rope_parameters": {**LLAMA3, "factor": None}}, r"rope_parameters of type 'llama3' has no 'factor'"),
    ({"rope_parameters": {"rope_type": "longrope", "long_factor": [1.0]}}, r"type 'longrope' has no 'short_factor'"),
    ({"rope_parameters": {"rope_type": "su", "short_factor": [1.0], "long_factor": "x"}},
     r"rope_parameters\.long_factor is 'x'"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "linear"}}},
     r"rope_parameters\.sliding_attention of type 'linear' has no 'factor'"),
]


@pytest.mark.parametrize("change,match", BAD, ids=[m for _, m in BAD])
def test_bad_value_names_file_key_and_value(change, match):
    with pytest.raises(ConfigError, match=match) as e:
        validate_config({**BASE, **change}, "/m/config.json")
    assert str(e.value).startswith("/m/config.json: ")
    assert isinstance(e.value, ValueError) and isinstance(e.value, ExLlamaV2Error)


@pytest.mark.parametrize("raw", [[BASE], "config", 42, None])
def test_top_level_not_an_object(raw):
    with pytest.raises(ConfigError, match=r"/m/config.json: the top level is a JSON \w+, but config.json must be an object"):
        validate_config(raw, "/m/config.json")


GOOD = [
    {},
    {"hidden_size": 64.0},                         # an integral float loses nothing
    {"eos_token_id": [2, 3]},
    {"sliding_window": None},
    {"pad_token_id": -1},                          # early Llama configs
    {"rope_scaling": None},
    {"rope_scaling": {"type": "linear", "factor": 2.0}},
    {"rope_scaling": LLAMA3},
    {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "beta_fast": 32, "truncate": False}},
    {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    {"rope_scaling": {"rope_type": "mystery"}},    # config.py refuses the type itself, listing the supported ones
    {"layer_types": ["sliding_attention", "full_attention"]},
]


@pytest.mark.parametrize("change", GOOD)
def test_good_values_pass(change):
    validate_config({**BASE, **change}, "/m/config.json")


def test_generation_config():
    validate_generation_config({"eos_token_id": [2, 3], "bos_token_id": 1}, "g.json")
    with pytest.raises(ConfigError, match=r"g.json: eos_token_id is 'x'"):
        validate_generation_config({"eos_token_id": "x"}, "g.json")
    with pytest.raises(ConfigError, match=r"g.json: the top level is a JSON list"):
        validate_generation_config([], "g.json")


def test_eos_outside_vocab_warns(caplog):
    validate_config({**BASE, "eos_token_id": [2, 999]}, "/m/config.json")
    assert "eos_token_id [999] is outside the vocabulary" in caplog.text


# through ExLlamaV2Config: the error comes before any tensor file is opened -----------------------




@pytest.mark.parametrize("change,match", [
    ({"hidden_size": 128.5}, r"hidden_size is 128\.5"),
    ({"rope_scaling": {"type": "linear"}}, r"has no 'factor'"),
    ({"rope_scaling": "linear"}, r"rope_scaling is 'linear'"),
    ({"eos_token_id": "x"}, r"eos_token_id is 'x'"),
    ({"sliding_window": "x"}, r"sliding_window is 'x'"),
    ({"architectures": [42]}, r"architectures is \[42\]"),
])
def test_config_refuses_before_reading_tensors(model_copy, change, match):
    cfg = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps({**cfg, **change}))
    for f in model_copy.glob("*.safetensors"):   # unreadable weights: the config error must come first
        f.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=match) as e:
        ExLlamaV2Config(str(model_copy))
    assert "config.json" in str(e.value)


def test_config_top_level_list(model_copy):
    (model_copy / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="top level is a JSON list"):
        ExLlamaV2Config(str(model_copy))


def test_generation_config_checked(model_copy):
    (model_copy / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ConfigError, match=r"generation_config.json: eos_token_id is 'x'"):
        ExLlamaV2Config(str(model_copy))
