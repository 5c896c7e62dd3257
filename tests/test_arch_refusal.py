"""Never silently wrong: an architecture missing from the table is refused at ExLlamaV2Config, and a
checkpoint with tensors the chosen layout does not read is refused before any weight is read.

The refusal is tested on real checkpoint layouts: transformers builds each candidate below from its own
config class, and those the table does not (yet) hold must be refused. Qwen3, Gemma, Gemma 3, Granite and
SmolLM3 used to load "as Llama" and give fluent garbage; they are now in the table (tests/test_model.py).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from exllamav2 import ExLlamaV2, ExLlamaV2Config
from exllamav2.architecture import ARCHITECTURES
from exllamav2.config import ALLOW_UNKNOWN_ARCH_VAR, ConfigError
from exllamav2.errors import ArchitectureError, CheckpointError
from tests.tiny_models import build_tiny_model, rewrite_checkpoint

# Decoders transformers ships that resemble Llama but differ in math or layout.
CANDIDATES = {
    "Olmo2ForCausalLM": ("Olmo2Config", {}),                                   # post-norms, full-width q/k norms
    "Exaone4ForCausalLM": ("Exaone4Config", {"sliding_window": 8}),
    "CohereForCausalLM": ("CohereConfig", {}),                                 # parallel block, GPT-J RoPE
    "Starcoder2ForCausalLM": ("Starcoder2Config", {}),
    "HunYuanDenseV1ForCausalLM": ("HunYuanDenseV1Config", {"head_dim": 16}),
    "ApertusForCausalLM": ("ApertusConfig", {}),
}
UNSUPPORTED = [a for a in CANDIDATES if a not in ARCHITECTURES][:3]


@pytest.fixture(scope="module")
def lookalike(tmp_path_factory):
    built = {}

    def make(arch: str):
        if arch not in built:
            built[arch], _ = build_tiny_model(arch, tmp_path_factory.mktemp(arch), spec=CANDIDATES[arch])
        return built[arch]

    return make


@pytest.fixture
def no_opt_in(monkeypatch):
    monkeypatch.delenv(ALLOW_UNKNOWN_ARCH_VAR, raising=False)


@pytest.mark.parametrize("arch", UNSUPPORTED)
def test_unsupported_architectures_are_refused(lookalike, arch, no_opt_in):
    model_dir = lookalike(arch)
    assert json.loads((model_dir / "config.json").read_text())["architectures"] == [arch]
    with pytest.raises(ArchitectureError) as e:
        ExLlamaV2Config(str(model_dir))
    msg = str(e.value)
    assert f"'{arch}' is not supported" in msg
    assert all(name in msg for name in ARCHITECTURES)                 # lists what is supported
    assert "allow_unknown_arch=True" in msg and f"{ALLOW_UNKNOWN_ARCH_VAR}=1" in msg   # and the opt-ins
    assert "config.json" in msg


def test_refusal_is_a_config_error(tiny_model_factory, tmp_path, no_opt_in):
    # callers that caught ValueError / ConfigError before keep catching it
    model_dir = _with_arch(tiny_model_factory, tmp_path, "MysteryForCausalLM")
    with pytest.raises(ConfigError):
        ExLlamaV2Config(model_dir)
    with pytest.raises(ValueError):
        ExLlamaV2Config(model_dir)


def _with_arch(tiny_model_factory, tmp_path, arch, source: str = "llama") -> str:
    # any value, None and "" included: the refusal of non-names is tested through this
    return str(rewrite_checkpoint(tiny_model_factory(source)[0], tmp_path / "model",
                                  edit=lambda cfg: cfg.update(architectures=[arch])))


@pytest.mark.parametrize("arch", [42, None, "llama", ""])
def test_non_names_are_refused(tiny_model_factory, tmp_path, arch, no_opt_in):
    with pytest.raises(ConfigError):
        ExLlamaV2Config(_with_arch(tiny_model_factory, tmp_path, arch))


def _logits(config: ExLlamaV2Config) -> torch.Tensor:
    model = ExLlamaV2(config)
    model.load()
    return model.forward(torch.tensor([[1, 5, 9, 14]])).float()


def test_opt_in_loads_as_llama(tiny_model_factory, tmp_path, caplog, no_opt_in, monkeypatch):
    """A Llama checkpoint under another name: each opt-in loads it, warns, and runs it as Llama."""
    model_dir = _with_arch(tiny_model_factory, tmp_path, "MysteryForCausalLM")
    reference = _logits(ExLlamaV2Config(str(tiny_model_factory("llama")[0])))

    with caplog.at_level("WARNING"):
        by_kwarg = ExLlamaV2Config(model_dir, allow_unknown_arch=True)
    assert "MysteryForCausalLM" in caplog.text and "opted in" in caplog.text
    torch.testing.assert_close(_logits(by_kwarg), reference)

    by_attribute = ExLlamaV2Config()
    by_attribute.model_dir = model_dir
    by_attribute.allow_unknown_arch = True
    by_attribute.prepare()
    assert by_attribute.arch.name == "MysteryForCausalLM"

    monkeypatch.setenv(ALLOW_UNKNOWN_ARCH_VAR, "1")
    assert ExLlamaV2Config(model_dir).arch.name == "MysteryForCausalLM"
    monkeypatch.setenv(ALLOW_UNKNOWN_ARCH_VAR, "0")
    with pytest.raises(ArchitectureError):
        ExLlamaV2Config(model_dir)
    monkeypatch.setenv(ALLOW_UNKNOWN_ARCH_VAR, "maybe")
    with pytest.raises(ConfigError, match=f"{ALLOW_UNKNOWN_ARCH_VAR}='maybe'"):
        ExLlamaV2Config(model_dir)


def test_opt_in_still_refuses_tensors_llama_does_not_read(tiny_model_factory, tmp_path, monkeypatch):
    # A Qwen3 checkpoint under an unknown name, run as Llama, would drop its q/k norms: refused even with
    # the opt-in, naming them.
    monkeypatch.setenv(ALLOW_UNKNOWN_ARCH_VAR, "1")
    config = ExLlamaV2Config(_with_arch(tiny_model_factory, tmp_path, "MysteryForCausalLM", source="qwen3"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_norm\.weight"):
        ExLlamaV2(config)


def _add_tensor(model_dir, name: str, tensor: torch.Tensor) -> None:
    path = next(model_dir.glob("*.safetensors"))
    tensors = load_file(path)
    tensors[name] = tensor
    save_file(tensors, path)


@pytest.mark.parametrize("extra", [
    "model.layers.1.self_attn.k_norm.weight",     # a part the layout does not have
    "model.layers.0.input_layernorm.bias",        # a bias an RMSNorm would not read
    "vision_tower.blocks.0.attn.qkv.weight",      # a tower nobody reads
])
def test_unexpected_tensor_is_refused_before_loading(tiny_model_factory, tmp_path, extra):
    src, _ = tiny_model_factory("llama")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    _add_tensor(dst, extra, torch.ones(16, dtype=torch.float16))
    config = ExLlamaV2Config(str(dst))
    with pytest.raises(CheckpointError) as e:
        ExLlamaV2(config)
    assert extra in str(e.value) and "LlamaForCausalLM" in str(e.value)


def test_derived_buffers_are_not_unexpected(tiny_model_factory, tmp_path):
    # old Llama checkpoints carry RoPE inverse frequencies, which are recomputed from config.json
    src, _ = tiny_model_factory("llama")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    _add_tensor(dst, "model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8))
    model = ExLlamaV2(ExLlamaV2Config(str(dst)))
    model.load()
    assert model.loaded


@pytest.mark.parametrize("arch,switch", [("cohere", "use_qk_norm"), ("phi", "qk_layernorm")])
def test_switches_of_unbuilt_parts_are_refused(tiny_model_factory, tmp_path, arch, switch):
    """Cohere's per-head q/k LayerNorms and Phi's qk_layernorm are not built: a checkpoint that turns them on is
    refused, not run without them."""
    src, _ = tiny_model_factory(arch)
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg[switch] = True
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=f"{switch}: true is not supported"):
        ExLlamaV2Config(str(dst))
