"""bfloat16 activations on the CPU (config.cpu_dtype, EXLLAMA_CPU_DTYPE; the default where the CPU multiplies bf16
natively; its weight kernel is tested with the fp16 one in test_cpu_kernels.py): the choice of dtype, and the
accuracy this costs against transformers in float32, for FP16 checkpoints and the bundled EXL2 demo model (decode through the packed-code
kernel, prefill through one bf16 GEMM on the decoded weight)."""

from __future__ import annotations

import pytest
import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ext
from exllamav2.errors import ConfigError
from exllamav2.ops import activation_dtype, cpu_multiplies_bf16
from exllamav2.quant import cpu_layout
from tests.test_cpu_exl2 import DEMO_EXL2, exl2_pair
from tests.test_model import VOCAB

kernels = ext.cpu_kernels()
needs_kernels = pytest.mark.skipif(kernels is None, reason="CPU kernels unavailable (no AVX2/F16C or no compiler)")


def test_the_cpu_dtype_follows_the_cpu_and_the_setting(monkeypatch):
    cpu = torch.device("cpu")
    assert activation_dtype(cpu) == (torch.bfloat16 if cpu_multiplies_bf16() else torch.float32)
    assert activation_dtype(torch.device("cuda", 0), "float32") == torch.float16
    assert activation_dtype(cpu, "float32") == torch.float32 and activation_dtype(cpu, "bfloat16") == torch.bfloat16
    for flags, dtype in (((False, False), torch.float32), ((True, False), torch.bfloat16), ((False, True), torch.bfloat16)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda f=flags[0]: f, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda f=flags[1]: f, raising=False)
        assert activation_dtype(cpu, "auto") == dtype


def test_the_environment_sets_the_default_and_bad_values_are_refused(monkeypatch, tiny_model_factory):
    model_dir, _ = tiny_model_factory("llama")
    monkeypatch.setenv("EXLLAMA_CPU_DTYPE", "BFloat16 ")
    assert ExLlamaV2Config(str(model_dir)).cpu_dtype == "bfloat16"
    monkeypatch.setenv("EXLLAMA_CPU_DTYPE", "fp8")
    with pytest.raises(ConfigError, match="EXLLAMA_CPU_DTYPE='fp8'"):
        ExLlamaV2Config(str(model_dir))


def bf16_model(model_dir) -> ExLlamaV2:
    config = ExLlamaV2Config(str(model_dir))
    config.cpu_dtype = "bfloat16"
    model = ExLlamaV2(config)
    model.load()
    assert model.dtype == torch.bfloat16
    return model


def top1(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return (ours[..., :VOCAB].argmax(-1) == ref[..., :VOCAB].argmax(-1)).float().mean().item()


def test_bf16_prefill_and_decode_against_transformers_fp32(arch, tiny_model_factory):
    """The accuracy cost of bf16 activations (and bf16 weights), every architecture: logits within 8% of the logit
    scale and top-1 agreement of at least 90% with transformers in float32 over a 24-token prefill and 8 decode
    steps (measured on the tiny random models, whose near-ties flip easily: mean 97.4%, lowest 90.6%, largest
    error 5.5%)."""
    model_dir, hf = tiny_model_factory(arch)
    model = bf16_model(model_dir)
    ids = torch.randint(3, VOCAB, (1, 32), generator=torch.Generator().manual_seed(3))
    cache = ExLlamaV2Cache(model, max_seq_len=64)
    ours = torch.cat([model.forward(ids[:, :24], cache)] + [model.forward(ids[:, i : i + 1], cache) for i in range(24, 32)], 1)
    with torch.no_grad():
        ref = hf(ids).logits
    assert ours.dtype == torch.float32
    assert (ours[..., :VOCAB] - ref).abs().max().item() < 8e-2 * ref.abs().max().item()
    assert top1(ours, ref) >= 0.9


def test_bf16_exl2_decode_and_prefill_paths(monkeypatch):
    """A quantized layer with bf16 activations: few rows run the packed-code kernel on them as they are, more rows
    bf16 GEMMs on tiles of the decoded weight; both within bf16 rounding of the twin's float32 result."""
    kern, twin = exl2_pair(256, 96, [4, 3], 32, seed=2)
    for rows in (1, cpu_layout.MAX_GEMV_ROWS, cpu_layout.MAX_GEMV_ROWS + 1, 40):
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
        want = twin.forward(x)
        got = kern.forward(x.bfloat16())
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2 * want.abs().max().item())


@needs_kernels
def test_bf16_exl2_demo_model_against_float32():
    """The bundled EXL2 demo model in bf16 (prefill of 16 tokens, 8 decode steps) against itself in float32."""
    ids = torch.randint(3, 2000, (1, 24), generator=torch.Generator().manual_seed(5))

    def logits(dtype: str) -> torch.Tensor:
        config = ExLlamaV2Config(str(DEMO_EXL2))
        config.cpu_dtype = dtype
        model = ExLlamaV2(config)
        model.load()
        cache = ExLlamaV2Cache(model, max_seq_len=32)
        return torch.cat([model.forward(ids[:, :16], cache)] + [model.forward(ids[:, i : i + 1], cache) for i in range(16, 24)], 1)

    ours, ref = logits("bfloat16"), logits("float32")
    assert top1(ours, ref) >= 0.9
