"""Where the model hands work to exllamav2_ext: norms, RoPE, quantized matmuls, paged decode attention.

On the CPU a fake extension stands in for the real one (exllamav2.ext.kernels_for patched to return it for
any device, so the ops table (exllamav2/ops/table.py) takes its kernels): each fake kernel checks the arguments the real binding would (ext_bindings.cpp: shapes, dtypes,
contiguity), records the call, and computes its result with a straightforward PyTorch implementation written
here. The tiny models then run in float16 through the fakes and must still match transformers, and each
dispatch must fall back to the PyTorch path where the kernel does not apply. At the end, the real extension runs
the same models against the PyTorch path: on a GPU, and on the CPU through the CUDA emulator (tests/cuda_emu).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

import exllamav2.ext as ext
from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from exllamav2.quant import qmatrix
from exllamav2.architecture import RopeStyle
from exllamav2.attn.backends.backend import gather_pages, write_pages
from exllamav2.attn.backends.matmul import MatmulBackend
from exllamav2.attn.backends.metadata import AttnMetadata
from exllamav2.model.attn_params import PagedParams
from exllamav2.ops import build_ops, kv_cache
from exllamav2.ops.norm import layer_norm, rms_norm
from exllamav2.ops.rope import apply_rope, kernel_rotate_qk, rotate_qk
from tests.test_ext import decode_like_the_kernels, exl2_weight, gptq_weight
from tests.test_model import VOCAB, assert_matches
from tests.tiny_models import ARCH_SPECS

PROMPT = 12
PAGE = 256


class FakeQMatrix:
    def __init__(self, calls, *args):
        fmt, q_weight, chunks, perm, q_scale, scale_max, scales, qzeros, zero_offset, k, n, bias = args
        assert q_weight.dtype == torch.int32 and chunks.dtype == torch.int32 and chunks.shape[1] == 5
        assert perm is None or (perm.dtype == torch.int32 and perm.shape == (k,))
        assert bias is None or (bias.dtype == torch.float16 and bias.shape == (n,))
        prepared = qmatrix.PreparedQMatrix(fmt, q_weight, chunks, perm, k, n, bias, q_scale, scale_max, scales,
                                           qzeros, zero_offset)
        self.weight = decode_like_the_kernels(prepared)
        self.bias = bias
        self.calls = calls
        calls.append(("QMatrix", fmt))

    def forward(self, x, max_fused_rows, max_dq_elements):
        assert x.dtype == torch.float16 and x.shape[-1] == self.weight.shape[0]
        assert max_fused_rows == qmatrix.MAX_FUSED_ROWS and max_dq_elements > 0
        self.calls.append(("QMatrix.forward", tuple(x.shape)))
        y = x.float() @ self.weight.float()
        if self.bias is not None:
            y += self.bias.float()
        return y.half()

    def reconstruct(self, out, col_start):
        assert out.dtype == torch.float16 and out.is_contiguous() and out.shape[0] == self.weight.shape[0]
        self.calls.append(("QMatrix.reconstruct", col_start))
        out.copy_(self.weight[:, col_start : col_start + out.shape[1]])


class FakeKernels:
    """The extension's Python surface, in PyTorch, checking what the C++ wrappers check."""

    def __init__(self):
        self.calls: list[tuple] = []

    def names(self) -> Counter:
        return Counter(c[0] for c in self.calls)

    def rms_norm(self, x, weight, eps):
        assert x.dtype == torch.float16 and weight.shape == (x.shape[-1],) and weight.dtype in (torch.float16, torch.float32)
        self.calls.append(("rms_norm", tuple(x.shape)))
        xf = x.float()
        return (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).half()

    def layer_norm(self, x, weight, bias, eps):
        assert x.dtype == torch.float16 and weight.shape == (x.shape[-1],)
        assert bias is None or bias.dtype == weight.dtype
        self.calls.append(("layer_norm", tuple(x.shape)))
        xf = x.float()
        mean = xf.mean(-1, keepdim=True)
        var = (xf - mean).pow(2).mean(-1, keepdim=True)
        y = (xf - mean) / torch.sqrt(var + eps) * weight.float()
        return (y if bias is None else y + bias.float()).half()

    # the KV-cache codecs: the cache tests hold the real kernels to their twins; here only the routing counts
    def _codec(self, name, *args, **window):
        assert all(t.is_contiguous() for t in args if isinstance(t, torch.Tensor))
        self.calls.append((name,))
        getattr(kv_cache, name)(*args, **window)

    def fp8_to_fp16(self, *args, **window):
        self._codec("fp8_to_fp16", *args, **window)

    def fp16_to_fp8(self, *args, **window):
        self._codec("fp16_to_fp8", *args, **window)

    def q_to_fp16(self, *args, **window):
        self._codec("q_to_fp16", *args, **window)

    def fp16_to_q(self, *args, **window):
        self._codec("fp16_to_q", *args, **window)

    def rope_(self, x, cos, sin, positions, neox):
        assert x.dtype == torch.float16 and x.dim() == 4 and x.is_contiguous()
        assert cos.dim() == 2 and cos.shape == sin.shape and cos.shape[1] <= x.shape[3]
        assert positions.shape == x.shape[:2] and not positions.is_floating_point() and int(positions.min()) >= 0
        assert isinstance(neox, bool)
        self.calls.append(("rope_", tuple(x.shape)))
        pos = positions.long().to(cos.device)
        rot = cos.shape[1]
        c, s = cos[pos].unsqueeze(2).float(), sin[pos].unsqueeze(2).float()
        xr = x[..., :rot].float()
        if neox:
            x1, x2 = xr.chunk(2, dim=-1)
            out = xr * c + torch.cat((-x2, x1), -1) * s
        else:
            half = rot // 2
            c2, s2 = c[..., :half].repeat_interleave(2, -1), s[..., :half].repeat_interleave(2, -1)
            pairs = torch.stack((-xr[..., 1::2], xr[..., 0::2]), -1).flatten(-2)
            out = xr * c2 + pairs * s2
        x[..., :rot] = out.half()

    def paged_attention(self, q, k_new, v_new, k_pages, v_pages, block_table, cache_seqlens, scale, window, softcap):
        for t in (q, k_new, v_new, k_pages, v_pages):
            assert t.dtype == torch.float16 and t.is_contiguous()
        bsz, q_len, _, dim = q.shape
        assert q_len <= 8 and dim % 8 == 0 and dim <= 256
        assert k_new.shape == (bsz, q_len, k_pages.shape[2], dim) and block_table.shape[0] == bsz
        assert isinstance(scale, float) and isinstance(window, int) and isinstance(softcap, float)
        self.calls.append(("paged_attention", tuple(q.shape)))
        write_pages(k_pages, v_pages, k_new, v_new, block_table, cache_seqlens)
        lengths = cache_seqlens.long() + q_len
        k, v = gather_pages(k_pages, v_pages, block_table, int(lengths.max()))
        meta = AttnMetadata(bsz, q_len, k.shape[1], past_len=cache_seqlens.long(), key_lengths=lengths)
        return MatmulBackend(q.device).attend(q, k, v, meta, scale=scale, window=window, softcap=softcap)

    def QMatrix(self, *args):
        return FakeQMatrix(self.calls, *args)


@pytest.fixture
def fake(monkeypatch):
    kernels = FakeKernels()
    monkeypatch.setattr(ext, "kernels_for", lambda device: kernels)
    return kernels


def load_fp16(model_dir) -> ExLlamaV2:
    """The model in float16 on the CPU, as it would run on a GPU."""
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    model.dtype = torch.float16
    model.load()
    return model


# --- the model through the fakes ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_dense_forward_uses_norm_and_rope_kernels(arch, fake, tiny_model_factory):
    model_dir, hf = tiny_model_factory(arch)
    model = load_fp16(model_dir)
    layers = model.config.num_hidden_layers
    ids = torch.randint(3, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(3))
    logits = model.forward(ids)
    names = fake.names()
    assert names["rope_"] == 2 * layers                       # q and k of every layer
    assert names["rms_norm"] + names["layer_norm"] >= 2 * layers + 1
    with torch.no_grad():
        assert_matches(logits, hf(ids).logits)


def test_paged_decode_uses_the_paged_kernel(fake, tiny_model_factory):
    model_dir, hf = tiny_model_factory("llama")
    model = load_fp16(model_dir)
    cache = ExLlamaV2Cache(model, max_seq_len=PAGE)
    ids = torch.randint(3, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(4))
    table = torch.zeros(1, 1, dtype=torch.int32)

    def step(start: int, end: int) -> torch.Tensor:
        params = PagedParams(1, table, torch.tensor([start], dtype=torch.int32), page_size=PAGE, q_len=end - start)
        return model.forward(ids[:, start:end], cache, attn_params=params)

    prefill = step(0, 9)                                      # 9 new tokens: gathered, not the kernel
    assert fake.names()["paged_attention"] == 0
    decoded = [step(i, i + 1) for i in range(9, PROMPT)]
    assert fake.names()["paged_attention"] == (PROMPT - 9) * model.config.num_hidden_layers
    with torch.no_grad():
        assert_matches(torch.cat([prefill, *decoded], dim=1), hf(ids).logits)


# --- each dispatch, alone -------------------------------------------------------------------------


def test_fp32_and_twins_are_untouched(fake, tiny_model_factory):
    model_dir, hf = tiny_model_factory("llama")
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    model.load()                                              # float32 on the CPU: no kernel takes it
    ids = torch.randint(3, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(5))
    logits = model.forward(ids)
    assert fake.calls == []
    with torch.no_grad():
        assert_matches(logits, hf(ids).logits)


def paged_inputs(q_len: int, head_dim: int, dtype=torch.float16):
    g = torch.Generator().manual_seed(q_len * 100 + head_dim)
    pages = torch.randn(6, 16, 2, head_dim, generator=g).to(dtype)
    v_pages = torch.randn(6, 16, 2, head_dim, generator=g).to(dtype)
    q = torch.randn(2, q_len, 4, head_dim, generator=g).to(dtype)
    k_new = torch.randn(2, q_len, 2, head_dim, generator=g).to(dtype)
    v_new = torch.randn(2, q_len, 2, head_dim, generator=g).to(dtype)
    table = torch.tensor([[3, 1, 0], [5, 2, 4]], dtype=torch.int32)
    seqlens = torch.tensor([7, 20], dtype=torch.int32)
    return q, k_new, v_new, pages, v_pages, table, seqlens


@pytest.mark.parametrize("q_len, head_dim, dtype, kernel", [
    (1, 64, torch.float16, True), (8, 64, torch.float16, True), (9, 64, torch.float16, False),
    (1, 12, torch.float16, False), (1, 264, torch.float16, False), (1, 64, torch.float32, False),
])
def test_attend_paged_dispatch(fake, monkeypatch, q_len, head_dim, dtype, kernel):
    args = paged_inputs(q_len, head_dim, dtype)
    opts = dict(scale=head_dim**-0.5, window=10, softcap=20.0)
    got_pages = [t.clone() for t in args[3:5]]
    got = MatmulBackend().attend_paged(*args[:3], *got_pages, *args[5:], kernel=fake.paged_attention, **opts)
    assert fake.names()["paged_attention"] == (1 if kernel else 0)
    want_pages = [t.clone() for t in args[3:5]]
    want = MatmulBackend().attend_paged(*args[:3], *want_pages, *args[5:], **opts)
    assert all(torch.equal(a, b) for a, b in zip(got_pages, want_pages))   # same slots written
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


def test_rope_kernel_gets_contiguous_tensors_and_clamped_positions(fake):
    from exllamav2.model.attn_params import Params

    rotate = kernel_rotate_qk(fake)

    class Tables:
        cos = torch.randn(40, 16)
        sin = torch.randn(40, 16)

        def reserve(self, positions):
            assert int(positions.max()) < 40        # the tables already cover every position here

        def lookup(self, positions):
            p = positions.clamp(min=0)
            return self.cos[p].unsqueeze(2), self.sin[p].unsqueeze(2)

    tables = Tables()
    params = Params(2, 5, 3, position_offsets=torch.tensor([-4, 0]))   # left padding: positions below 0
    fused = torch.randn(2, 5, 3 * 32).half()
    q, k = fused[..., :64].view(2, 5, 2, 32), fused[..., 64:].view(2, 5, 1, 32)   # non-contiguous views
    for style in (RopeStyle.NEOX, RopeStyle.GPTJ):
        cos, sin = params.rope(tables)
        want = apply_rope(q, cos, sin, style), apply_rope(k, cos, sin, style)
        for got in (rotate(q, k, params, tables, style), rotate_qk(q, k, params, tables, style)):
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert fake.names()["rope_"] == 4
    assert rotate(q, k, params, tables, RopeStyle.NONE) == (q, k) == rotate_qk(q, k, params, tables, RopeStyle.NONE)


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_norm_dispatch_matches_twin(fake, norm):
    from exllamav2.model.norm import ExLlamaV2LayerNorm, ExLlamaV2RMSNorm

    class Cfg:
        norm_eps = 1e-5

    class Model:
        config = Cfg

        def __init__(self, dtype):
            self.table = build_ops("cpu", dtype)

        def ops(self, device):
            return self.table

    cls = ExLlamaV2RMSNorm if norm == "rms" else ExLlamaV2LayerNorm
    module = cls.__new__(cls)
    module.model, module.device = Model(torch.float16), torch.device("cpu")
    module.weight = 1 + torch.randn(48) * 0.1
    module.bias = torch.randn(48) * 0.1
    x = (torch.randn(3, 4, 48) * 3).half()
    want = rms_norm(x, module.weight, 1e-5) if norm == "rms" else layer_norm(x, module.weight, module.bias, 1e-5)
    torch.testing.assert_close(module.forward(x), want, rtol=2e-3, atol=4e-3)
    assert fake.names()[f"{norm}_norm"] == 1
    module.model = Model(torch.float32)
    torch.testing.assert_close(module.forward(x.float()), want.float(), rtol=2e-3, atol=4e-3)
    assert fake.names()[f"{norm}_norm"] == 1                    # a float32 table: the twin


@pytest.mark.parametrize("make", [
    lambda: exl2_weight(256, 96, [4, 3], 64, bias=True),
    lambda: gptq_weight(256, 64, 4, torch.randperm(256, generator=torch.Generator().manual_seed(2)) // 64, bias=True),
], ids=["exl2", "gptq_act_order"])
def test_quantized_layer_dispatch(fake, monkeypatch, make):
    x = torch.randn(5, make().in_features, generator=torch.Generator().manual_seed(1)).half() * 0.1
    with monkeypatch.context() as m:
        m.setattr(ext, "kernels_for", lambda device: None)
        twin = make().bind(build_ops("cpu", torch.float16))
        want_y, want_w = twin.forward(x), twin.dequantize()
    w = make().bind(build_ops("cpu", torch.float16))
    got_w = w.dequantize()
    assert torch.equal(got_w.view(torch.int16), want_w.view(torch.int16))
    got_y = w.forward(x)
    assert (got_y.float() - want_y.float()).abs().max() < 2e-2
    w.forward(x.float())                                      # float32 input: the twin
    names = fake.names()
    assert names["QMatrix"] == 1 and names["QMatrix.forward"] == 1 and names["QMatrix.reconstruct"] == 1


def test_layout_the_kernels_cannot_address_stays_on_the_twin(fake):
    w = gptq_weight(32, 32, 2, torch.tensor([0] * 4 + [1] * 28))   # group 1 starts inside a packed word
    w.bind(build_ops("cpu", torch.float16))
    x = torch.randn(3, 32).half()
    w.forward(x)
    w.dequantize()
    assert fake.calls == []


# --- the ops table -----------------------------------------------------------------------------------


def test_ops_table_takes_the_kernels_for_float16_only(fake, monkeypatch):
    table = build_ops("cuda:0", torch.float16)
    assert table.cuda is fake and table.paged_attention == fake.paged_attention
    assert (table.rms_norm, table.layer_norm, table.q_to_fp16) == (fake.rms_norm, fake.layer_norm, fake.q_to_fp16)
    assert table.rotate_qk is not rotate_qk
    twin = build_ops("cuda:0", torch.float32)
    assert twin.cuda is None and twin.paged_attention is None and twin.decode_attention is None
    assert (twin.rms_norm, twin.rotate_qk, twin.fp16_to_fp8) == (rms_norm, rotate_qk, kv_cache.fp16_to_fp8)
    cpu = build_ops("cpu", torch.bfloat16)      # the CPU kernels' norm, RoPE and decode attention where they load
    assert cpu.cuda is None and cpu.paged_attention is None and cpu.fp16_to_fp8 is kv_cache.fp16_to_fp8
    assert {cpu.rms_norm is rms_norm, cpu.rotate_qk is rotate_qk, cpu.decode_attention is None} == {cpu.cpu is None}
    monkeypatch.setattr(ext, "kernels_for", lambda device: None)
    assert build_ops("cuda:0", torch.float16).rms_norm is rms_norm


# --- the real extension against the PyTorch path: on a GPU, or on the CPU through the CUDA emulator -----------


class CountingKernels:
    """The extension module, counting which of its functions the model calls."""

    def __init__(self, module):
        self.module, self.calls = module, Counter()

    def __getattr__(self, name):
        target = getattr(self.module, name)
        if not callable(target):
            return target

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return target(*args, **kwargs)

        return counted


def load_on_gpu(model_dir) -> ExLlamaV2:
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    model.load()
    return model


@pytest.fixture
def real_kernels(real_extension, monkeypatch):
    """(load, kernels): how a model directory meets the real extension's kernels, and the kernels it calls.
    On a GPU the model loads there as usual; in the emulator (tests/cuda_emu) it runs in float16 on the CPU."""
    module, device = real_extension
    counting = CountingKernels(module)
    monkeypatch.setattr(ext, "kernels_for", lambda d: counting if torch.device(d).type == device else None)
    return (load_on_gpu if device == "cuda" else load_fp16), counting


def model_logits(model, ids: torch.Tensor, paged: bool, prefill: int) -> torch.Tensor:
    """Logits of `ids`: one forward, or (paged) a prefill of `prefill` tokens and then one token per step."""
    if not paged:
        return model.forward(ids).float().cpu()
    cache = ExLlamaV2Cache(model, max_seq_len=PAGE)
    table = torch.zeros(1, 1, dtype=torch.int32)
    parts = []
    for start, end in [(0, prefill), *((i, i + 1) for i in range(prefill, ids.shape[1]))]:
        params = PagedParams(1, table, torch.tensor([start], dtype=torch.int32), page_size=PAGE, q_len=end - start)
        parts.append(model.forward(ids[:, start:end], cache, attn_params=params).float().cpu())
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("arch", sorted(ARCH_SPECS))
def test_extension_matches_pytorch_path(arch, paged, real_kernels, tiny_model_factory, monkeypatch):
    """Every architecture of the tiny set through the real kernels (norms incl. q/k norms, RoPE styles, partial
    rotary, paged attention) against the PyTorch twins and transformers."""
    load, kernels = real_kernels
    monkeypatch.setenv("EXLLAMA_ATTN_BACKEND", "sdpa" if arch == "llama" else "matmul")   # not flash: the gather path
    model_dir, hf = tiny_model_factory(arch)
    ids = torch.randint(3, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(6))
    model = load(model_dir)
    with_kernels = model_logits(model, ids, paged, prefill=6)
    layers = model.config.num_hidden_layers
    rotating = sum(a.rope_style != RopeStyle.NONE for a in model.attention_layers)
    assert kernels.calls["rope_"] == 2 * rotating * (1 + (PROMPT - 6) * paged)
    assert kernels.calls["paged_attention"] == layers * (1 + PROMPT - 6) * paged      # q_len <= 8 steps, prefill too
    monkeypatch.setattr(ext, "kernels_for", lambda device: None)
    without = model_logits(load(model_dir), ids, paged, prefill=6)
    tol = 1e-2 * without.abs().max().item()
    assert (with_kernels - without).abs().max().item() < tol
    with torch.no_grad():
        assert_matches(with_kernels, hf(ids).logits)


EXL2_DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo_model" / "exl2"


@pytest.mark.parametrize("paged", [False, True])
def test_exl2_model_through_the_kernels(paged, real_kernels, monkeypatch):
    """The bundled EXL2 model: a prompt longer than the fused matmul takes (reconstruct + matmul), then decode
    steps through the fused EXL2 matmul (and the paged kernel), against the PyTorch twins in float16."""
    load, kernels = real_kernels
    prompt = qmatrix.MAX_FUSED_ROWS + 8
    ids = torch.randint(3, 1000, (1, prompt + 6), generator=torch.Generator().manual_seed(8))
    with_kernels = model_logits(load(EXL2_DEMO), ids, paged, prefill=prompt)
    assert kernels.calls["QMatrix"] > 0
    monkeypatch.setattr(ext, "kernels_for", lambda device: None)
    without = model_logits(load(EXL2_DEMO), ids, paged, prefill=prompt)
    assert (with_kernels - without).abs().max().item() < 2e-2 * without.abs().max().item()
    assert (with_kernels.argmax(-1) == without.argmax(-1)).float().mean().item() >= 0.95
