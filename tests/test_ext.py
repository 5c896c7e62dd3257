"""The CUDA extension: how it is found or built (ext.py, exllamav2_ext/build.py, setup.py), the host-side
weight preparation its kernels read (qmatrix.py), and every kernel against its PyTorch twin: on a GPU (`cuda`)
and, everywhere, on the CPU through the CUDA emulator in tests/cuda_emu (`emulated`).

On the CPU the loader is driven with fakes (a fake prebuilt module, a fake CUDA device, a failing build) and
the weight preparation is checked by decoding the prepared tensors here, chunk by chunk exactly as the kernels
address them, and comparing with the twin's bit-exact dequantization.
"""

from __future__ import annotations

import copy
import importlib
import logging
import math
import runpy
import sys
import types
from pathlib import Path

import pytest
import torch

import exllamav2.ext as ext
from exllamav2.quant import qmatrix
from exllamav2.exllamav2_ext import build
from exllamav2.quant import group_layout, load_quantized, pack_exl2, quantize_rtn
from exllamav2.quant.exl2 import pack_codes

ROOT = Path(__file__).resolve().parent.parent


class Source(dict):
    def has(self, name):
        return name in self

    def get(self, name):
        return self[name]


# --- loader -------------------------------------------------------------------------------------


@pytest.fixture
def fresh_loader(monkeypatch):
    """ext.py as if nothing had been decided yet in this process."""
    monkeypatch.setattr(ext, "_resolved", False)
    monkeypatch.setattr(ext, "_module", None)
    monkeypatch.setattr(ext, "_reason", None)
    monkeypatch.delenv(build.NOCOMPILE_VAR, raising=False)
    return ext


def no_prebuilt(monkeypatch):
    real = importlib.import_module

    def fake(name, *args):
        if name == build.EXT_NAME:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)


def fake_cuda(monkeypatch, build_result):
    """A CUDA device is visible; the JIT build returns build_result() (or raises what it raises)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def jit(settings=None):
        calls.append(1)
        return build_result()

    monkeypatch.setattr(ext, "_jit_build", jit)
    return calls


def test_import_is_cheap_and_upstream_names_exist():
    assert ext.none_tensor.device.type == "meta" and ext.none_tensor.shape == (1, 1)
    assert ext.kernels_for("cpu") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_no_extension_and_one_log_line(fresh_loader, caplog):
    with caplog.at_level(logging.INFO, logger="exllamav2.ext"):
        assert ext.load_extension() is None
        assert ext.load_extension() is None
        from exllamav2.ext import exllamav2_ext as ext_c

    assert ext_c is None
    assert "no CUDA device" in ext.unavailable_reason()
    lines = [r for r in caplog.records if r.name == "exllamav2.ext"]
    assert len(lines) == 1 and "PyTorch" in lines[0].getMessage()


def test_prebuilt_module_is_used_first(fresh_loader, monkeypatch, caplog):
    fake = types.ModuleType(build.EXT_NAME)
    fake.__file__ = "/somewhere/exllamav2_ext.so"
    monkeypatch.setitem(sys.modules, build.EXT_NAME, fake)
    calls = fake_cuda(monkeypatch, lambda: pytest.fail("must not build when a prebuilt module imports"))
    with caplog.at_level(logging.INFO, logger="exllamav2.ext"):
        assert ext.load_extension() is fake
    assert not calls and ext.unavailable_reason() is None
    assert "prebuilt" in caplog.records[-1].getMessage()
    assert ext.kernels_for("cuda:0") is fake and ext.kernels_for("cpu") is None


def test_jit_build_runs_once_when_cuda_is_present(fresh_loader, monkeypatch):
    no_prebuilt(monkeypatch)
    built = types.ModuleType("built")
    calls = fake_cuda(monkeypatch, lambda: built)
    assert ext.load_extension() is built
    assert ext.load_extension() is built
    assert len(calls) == 1


def test_jit_build_hands_torch_the_toolkit_it_found(monkeypatch, tmp_path):
    """torch.utils.cpp_extension reads CUDA_HOME once, at its first import; a guess made before (here: none) must
    not stand over the toolkit that build.find_cuda_home found."""
    from torch.utils import cpp_extension

    toolkit = tmp_path / "cuda"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "bin" / "nvcc").touch()
    (toolkit / "include" / "cuda_runtime.h").touch()
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_86"])
    seen = {}
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: seen.update(home=cpp_extension.CUDA_HOME, **kw) or "module")
    assert ext._jit_build() == "module"
    assert seen["home"] == str(toolkit) and seen["name"] == build.EXT_NAME


@pytest.mark.parametrize("value, builds", [("1", False), ("yes", False), ("0", True), ("", True)])
def test_nocompile_is_read_by_value(fresh_loader, monkeypatch, value, builds):
    no_prebuilt(monkeypatch)
    monkeypatch.setenv(build.NOCOMPILE_VAR, value)
    calls = fake_cuda(monkeypatch, lambda: types.ModuleType("built"))
    result = ext.load_extension()
    assert (result is not None) == builds and len(calls) == int(builds)
    if not builds:
        assert build.NOCOMPILE_VAR in ext.unavailable_reason()


def test_failed_build_is_a_reason_not_an_exception(fresh_loader, monkeypatch, caplog):
    no_prebuilt(monkeypatch)

    def broken():
        raise RuntimeError("Error building extension 'exllamav2_ext'")

    fake_cuda(monkeypatch, broken)
    with caplog.at_level(logging.WARNING, logger="exllamav2.ext"):
        assert ext.load_extension() is None
    assert "Error building extension" in ext.unavailable_reason()
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_prebuilt_for_another_torch_falls_back_to_jit(fresh_loader, monkeypatch, caplog):
    def mismatched(name, *args):
        raise ImportError("exllamav2_ext.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")

    monkeypatch.setattr(importlib, "import_module", mismatched)
    built = types.ModuleType("built")
    fake_cuda(monkeypatch, lambda: built)
    with caplog.at_level(logging.INFO, logger="exllamav2.ext"):
        assert ext.load_extension() is built
    message = caplog.records[-1].getMessage()
    assert "another torch" in message and "just in time" in message


# --- build configuration ----------------------------------------------------------------------------


def test_sources_are_every_binding_and_kernel_file():
    src = build.SOURCE_DIR
    names = {Path(p).relative_to(src).as_posix() for p in build.sources()}
    assert names == {p.relative_to(src).as_posix() for p in [*src.glob("*.cpp"), *src.glob("cuda/*.cu")]}
    assert "ext_bindings.cpp" in names and any(n.startswith("cuda/") for n in names)
    assert all(not Path(p).is_absolute() for p in build.sources(ROOT))


def test_kernel_files_do_not_include_torch():
    for path in (build.SOURCE_DIR / "cuda").iterdir():
        text = path.read_text()
        assert not any(f"include <{h}/" in text or f'include "{h}/' in text for h in ("torch", "ATen", "c10")), path


def test_find_cuda_home(tmp_path):
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "bin" / "nvcc").write_text("")
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    wrapper = tmp_path / "usr" / "bin" / "nvcc"              # a wrapper script outside the toolkit
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text("")
    assert build.find_cuda_home({"CUDA_HOME": "/opt/cuda"}) == "/opt/cuda"
    assert build.find_cuda_home({}, which=lambda _: str(toolkit / "bin" / "nvcc")) == str(toolkit)
    found = build.find_cuda_home({}, which=lambda _: str(wrapper))
    assert found != str(tmp_path / "usr")                    # not the wrapper's parent
    assert found in (None, "/usr/local/cuda")


@pytest.mark.parametrize("caps, supported, expected", [
    ([(7, 5)], ["sm_75", "sm_80", "sm_90"], "7.5+PTX"),
    ([(8, 9), (7, 5), (8, 9)], ["sm_75", "sm_80", "sm_89", "sm_90"], "7.5;8.9+PTX"),
    ([(12, 0)], ["sm_75", "sm_80", "sm_90"], "9.0+PTX"),         # newer GPU than this torch knows
    ([(6, 1), (8, 6)], ["sm_75", "sm_86"], "8.6+PTX"),           # Pascal dropped: nvcc 13 cannot target it
])
def test_arch_list_for_visible_gpus(caps, supported, expected):
    assert build.arch_list_for(caps, supported) == expected


def test_arch_list_refuses_gpus_older_than_turing():
    with pytest.raises(ValueError, match="7.5"):
        build.arch_list_for([(7, 0)], ["sm_75"])


@pytest.fixture
def setup_py():
    """setup.py's namespace, without running setup()."""
    return runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")


def test_setup_installs_pure_python_with_cpu_torch(setup_py):
    if torch.version.cuda is not None:
        pytest.skip("this torch has CUDA")
    kwargs, why = setup_py["extension_args"]({})
    assert kwargs == {} and "no CUDA" in why


def test_setup_respects_nocompile(setup_py):
    kwargs, why = setup_py["extension_args"]({build.NOCOMPILE_VAR: "1"})
    assert kwargs == {} and build.NOCOMPILE_VAR in why


def test_setup_without_torch_as_under_build_isolation(setup_py, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)          # import torch raises ImportError
    kwargs, why = setup_py["extension_args"]({})
    assert kwargs == {} and "isolation" in why


@pytest.mark.parametrize("arch", [None, "8.6"])
def test_setup_builds_with_cuda_torch_and_nvcc(setup_py, monkeypatch, tmp_path, arch):
    """A CUDA torch is faked; the CUDAExtension it would build gets every source and the arch list."""
    made = {}
    fake_ext = types.ModuleType("torch.utils.cpp_extension")
    fake_ext.CUDAExtension = lambda name, sources, **kw: made.update(name=name, sources=sources, **kw) or "ext"
    fake_ext.BuildExtension = object
    monkeypatch.setitem(sys.modules, "torch.utils.cpp_extension", fake_ext)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    environ = {"CUDA_HOME": str(tmp_path)}
    if arch:
        environ["TORCH_CUDA_ARCH_LIST"] = arch
    kwargs, why = setup_py["extension_args"](environ)
    assert kwargs["ext_modules"] == ["ext"] and kwargs["cmdclass"]["build_ext"] is object
    assert made["name"] == "exllamav2_ext" and sorted(made["sources"]) == sorted(build.sources(ROOT))
    assert environ["TORCH_CUDA_ARCH_LIST"] == (arch or "7.5;8.0;8.6;8.9;9.0+PTX")
    assert environ["TORCH_CUDA_ARCH_LIST"] in why


# --- weight preparation (host side) -------------------------------------------------------------------


def exl2_weight(k, n, bits, group_size=128, seed=0, perm=True, bias=False, device="cpu", prescale=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, n, generator=g) * 0.05
    order = torch.randperm(k, generator=g) if perm else None
    b = torch.randn(n, generator=g) if bias else None
    t = quantize_rtn(w, group_layout(k, bits, group_size), order, b)
    return load_quantized("l", Source({f"l.{a}": v for a, v in t.items()}), k, n, prescale=prescale, device=device)


def gptq_weight(k, n, groups, g_idx=None, seed=0, bias=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    t = {
        "qweight": pack_codes(torch.randint(0, 16, (k, n), generator=g), 4),
        "qzeros": pack_codes(torch.randint(0, 16, (n, groups), generator=g), 4).T.contiguous(),
        "scales": (torch.rand(groups, n, generator=g) * 0.05 + 1e-4).half(),
    }
    if g_idx is not None:
        t["g_idx"] = g_idx.to(torch.int32)
    if bias:
        t["bias"] = torch.randn(n, generator=g).half()
    return load_quantized("l", Source({f"l.{a}": v for a, v in t.items()}), k, n, device=device)


def twin_of(w):
    """A copy of the quantized weight `w` that always runs the PyTorch twin: on a GPU, w.dequantize() and
    w.forward() would otherwise dispatch to the very kernels under test."""
    twin = copy.copy(w)
    twin._kernel_matrix_built, twin._kernel_matrix = True, None
    return twin


def decode_like_the_kernels(p: qmatrix.PreparedQMatrix) -> torch.Tensor:
    """W [K, N] from prepared tensors, walking the chunk table as cuda/q_matrix.cu does: per chunk, its words
    form an LSB-first stream per column; row i is the `bits` bits at stream bit i·bits."""
    k, n = p.in_features, p.out_features
    out = torch.empty(k, n, dtype=torch.float16)
    words = p.q_weight.to(torch.int64) & 0xFFFFFFFF
    cols = torch.arange(n)
    perm = torch.arange(k) if p.perm is None else p.perm.long()
    for row0, rows, bits, word0, group in p.chunks.tolist():
        chunk_words = words[word0 : word0 + math.ceil(rows * bits / 32), :n]
        codes = []
        for i in range(rows):
            bit = i * bits
            lo = chunk_words[bit // 32] >> (bit % 32)
            if bit % 32 + bits > 32:
                lo = lo | (chunk_words[bit // 32 + 1] << (32 - bit % 32))
            codes.append(lo & ((1 << bits) - 1))
        codes = torch.stack(codes)
        if p.format == qmatrix.FORMAT_EXL2:
            s = (p.q_scale[group, cols // 8].to(torch.int64) >> (4 * (cols % 8))) & 15
            scale = ((s + 1) ** 2).half() * p.scale_max[group]          # one fp16 rounding
            zero = 1 << (bits - 1)
        else:
            scale = p.scales[group]
            zero = ((p.qzeros[group, cols // 8].to(torch.int64) >> (4 * (cols % 8))) & 15) + p.zero_offset
        out[perm[row0 : row0 + rows]] = ((codes - zero).float() * scale.float()).half()
    return out


def check_chunks(p: qmatrix.PreparedQMatrix, group_rows: list[tuple[int, int]]) -> None:
    """Chunks cover the stored rows in order, stay inside one group, hold <= 32 rows, start on a word."""
    row = 0
    for row0, rows, bits, word0, group in p.chunks.tolist():
        assert row0 == row and 1 <= rows <= 32
        g_start, g_rows = group_rows[group]
        assert g_start <= row0 and row0 + rows <= g_start + g_rows
        assert (row0 - g_start) * bits % 32 == 0
        row += rows
    assert row == p.in_features


@pytest.mark.parametrize("k, n, bits, group_size", [
    (256, 64, [8, 4], 128), (200, 40, [6, 5, 3], 32), (96, 32, [4, 2], 32), (130, 96, [3], 64),
])
def test_exl2_preparation_decodes_to_the_twin(k, n, bits, group_size):
    w = exl2_weight(k, n, bits, group_size, prescale=0.7)
    p = w.kernel_form()
    assert p.format == qmatrix.FORMAT_EXL2 and p.chunks.dtype == torch.int32 and p.chunks.shape[1] == 5
    check_chunks(p, [(g.row_start, g.rows) for g in w.groups])
    assert p.perm is not None and p.perm.dtype == torch.int32
    assert torch.equal(decode_like_the_kernels(p).view(torch.int16), w.dequantize().view(torch.int16))


def test_exl2_identity_permutation_is_dropped():
    p = exl2_weight(64, 32, [4], 32, perm=False).kernel_form()
    assert p.perm is None


def test_exl2_permutation_beyond_int16():
    """K >= 32768: the permutation stays int32 (signed int16 indices would wrap)."""
    k, n = 40000, 32
    g = torch.Generator().manual_seed(3)
    layout = group_layout(k, [4], 128)
    t = pack_exl2(torch.randint(0, 16, (k, n), generator=g), layout, torch.randint(0, 16, (len(layout), n), generator=g),
                  torch.rand(len(layout), generator=g).half(), torch.randperm(k, generator=g))
    w = load_quantized("l", Source({f"l.{a}": v for a, v in t.items()}), k, n)
    p = w.kernel_form()
    assert p.perm.dtype == torch.int32 and int(p.perm.max()) == 39999
    assert torch.equal(p.perm.long(), w.perm)


@pytest.mark.parametrize("case", ["no_g_idx", "sequential", "act_order"])
def test_gptq_preparation_decodes_to_the_twin(case):
    k, n, groups = 256, 48, 8
    g_idx = {"no_g_idx": None, "sequential": torch.arange(k) // 32,
             "act_order": (torch.randperm(k, generator=torch.Generator().manual_seed(4)) // 32)}[case]
    w = gptq_weight(k, n, groups, g_idx)
    p = w.kernel_form()
    assert p.format == qmatrix.FORMAT_GPTQ and p.zero_offset == 1
    assert (p.perm is not None) == (case == "act_order")
    check_chunks(p, [(g * 32, 32) for g in range(groups)])
    assert torch.equal(decode_like_the_kernels(p).view(torch.int16), w.dequantize().view(torch.int16))


def test_gptq_groups_not_on_word_boundaries_are_refused():
    g_idx = torch.tensor([0] * 12 + [1] * 20)                  # group 1 starts at row 12, inside a word
    with pytest.raises(ValueError, match="multiples of 8"):
        gptq_weight(32, 16, 2, g_idx).kernel_form()


# --- kernels against their twins (GPU and emulated) ------------------------------------------------------------------


class Kernels:
    """The extension's functions, and the device whose tensors they take."""

    def __init__(self, module: types.ModuleType, device: str):
        self.module, self.device = module, device

    def __getattr__(self, name: str):
        return getattr(self.module, name)


@pytest.fixture(scope="module")
def kernels(real_extension):
    return Kernels(*real_extension)


@pytest.mark.parametrize("wdtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("dim", [64, 4096, 5120 + 8])
def test_norm_kernels_match_twins(kernels, wdtype, dim):
    from exllamav2.ops.norm import layer_norm, rms_norm

    torch.manual_seed(dim)
    x = (torch.randn(3, 7, dim, device=kernels.device) * 4).half()
    w = (1 + torch.randn(dim, device=kernels.device) * 0.1).to(wdtype)
    b = (torch.randn(dim, device=kernels.device) * 0.1).to(wdtype)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(kernels.layer_norm(x, w, b, 1e-5), layer_norm(x, w, b, 1e-5), rtol=2e-3, atol=4e-3)
    torch.testing.assert_close(kernels.layer_norm(x, w, None, 1e-5), layer_norm(x, w, None, 1e-5), rtol=2e-3, atol=4e-3)


@pytest.mark.parametrize("style_name", ["NEOX", "GPTJ"])
@pytest.mark.parametrize("head_dim, rot", [(128, 128), (64, 32), (256, 256)])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.float16])
def test_rope_kernel_matches_twin(kernels, style_name, head_dim, rot, table_dtype):
    from exllamav2.architecture import RopeStyle
    from exllamav2.ops.rope import apply_rope

    style = RopeStyle[style_name]
    torch.manual_seed(head_dim + rot)
    inv = 1.0 / 10000 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
    freqs = torch.outer(torch.arange(600, dtype=torch.float32), inv)
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(kernels.device, table_dtype), emb.sin().to(kernels.device, table_dtype)
    x = torch.randn(3, 5, 6, head_dim, device=kernels.device).half()
    positions = torch.arange(5).view(1, -1) + torch.tensor([0, 17, 590]).view(-1, 1)   # per-sequence offsets
    want = apply_rope(x, cos[positions.to(kernels.device)].unsqueeze(2).float(), sin[positions.to(kernels.device)].unsqueeze(2).float(), style)
    got = x.clone()
    kernels.rope_(got, cos, sin, positions, style == RopeStyle.NEOX)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("feat", [1024, 96, 32])
def test_kv_quant_kernels_match_twin_exactly(kernels, bits, feat):
    from exllamav2.ops import kv_quant

    torch.manual_seed(feat)
    x = (torch.randn(2, 50, feat, device=kernels.device) * 3).half()
    padded = kv_quant.padded_features(feat)
    q = torch.zeros(2, 50, padded * bits // 8, dtype=torch.uint8, device=kernels.device)
    s = torch.zeros(2, 50, padded // 32, dtype=torch.float16, device=kernels.device)
    kernels.fp16_to_q(x, q, s, bits, batch=2, offset=0, width=50)
    want_q, want_s = kv_quant.quantize(x, bits)
    assert torch.equal(q, want_q) and torch.equal(s, want_s)
    y = torch.zeros_like(x)
    kernels.q_to_fp16(q, s, y, bits, batch=2, offset=0, width=50)
    assert torch.equal(y, kv_quant.dequantize(q, s, bits, feat))
    f8 = torch.zeros_like(x, dtype=torch.uint8)
    kernels.fp16_to_fp8(x, f8, batch=2, offset=0, width=50)
    assert torch.equal(f8, kv_quant.fp8_quantize(x))
    kernels.fp8_to_fp16(f8, y, batch=2, offset=0, width=50)
    assert torch.equal(y, kv_quant.fp8_dequantize(f8))


def skip_large_on_the_emulator(kernels, work: float) -> None:
    """The emulator runs about a million GPU threads a few seconds; the largest shapes are for real GPUs."""
    if kernels.device != "cuda" and work > 1 << 22:
        pytest.skip("too large for the CUDA emulator; runs on a GPU")


EXL2_SHAPES = [(4096, 4096, [4], 128), (4096, 1024, [6, 4], 32), (1000, 200, [8, 5, 3, 2], 64), (256, 96, [3], 32)]


@pytest.mark.parametrize("k, n, bits, group_size", EXL2_SHAPES)
def test_exl2_reconstruct_is_bit_exact(kernels, k, n, bits, group_size):
    skip_large_on_the_emulator(kernels, k * n)
    w = exl2_weight(k, n, bits, group_size, device=kernels.device, prescale=0.5)
    qm = qmatrix.make_qmatrix(w, kernels)
    out = torch.empty(k, n, dtype=torch.float16, device=kernels.device)
    qm.reconstruct(out, 0)
    assert torch.equal(out.view(torch.int16), twin_of(w).dequantize().view(torch.int16))
    part = torch.empty(k, 64, dtype=torch.float16, device=kernels.device)
    qm.reconstruct(part, 32)
    assert torch.equal(part, out[:, 32:96])


@pytest.mark.parametrize("k, n, bits, group_size", EXL2_SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 17, 32, 33, 100])
def test_exl2_matmul_matches_twin(kernels, k, n, bits, group_size, rows):
    skip_large_on_the_emulator(kernels, k * n * max(rows, 8) / 8)
    w = exl2_weight(k, n, bits, group_size, device=kernels.device, bias=True)
    qm = qmatrix.make_qmatrix(w, kernels)
    x = torch.randn(rows, k, device=kernels.device).half()
    want = twin_of(w).forward(x).float()
    got = qm.forward(x.view(1, rows, k), qmatrix.MAX_FUSED_ROWS, 1 << 20).view(rows, n).float()
    # fused rows sum in fp32 per chunk and scale per group: a different rounding order than the twin
    tol = 5e-3 * want.abs().max().item() + 2e-2
    assert (got - want).abs().max().item() < tol


@pytest.mark.parametrize("case", ["no_g_idx", "act_order"])
@pytest.mark.parametrize("rows", [1, 4, 32, 64])
def test_gptq_kernels_match_twin(kernels, case, rows):
    k, n, groups = 2048, 512, 16
    g_idx = None if case == "no_g_idx" else torch.randperm(k, generator=torch.Generator().manual_seed(5)) // 128
    w = gptq_weight(k, n, groups, g_idx, bias=True, device=kernels.device)
    qm = qmatrix.make_qmatrix(w, kernels)
    out = torch.empty(k, n, dtype=torch.float16, device=kernels.device)
    qm.reconstruct(out, 0)
    assert torch.equal(out.view(torch.int16), twin_of(w).dequantize().view(torch.int16))
    x = torch.randn(rows, k, device=kernels.device).half() * 0.1
    want = twin_of(w).forward(x).float()
    got = qm.forward(x, qmatrix.MAX_FUSED_ROWS, 1 << 20).float()
    assert (got - want).abs().max().item() < 5e-3 * want.abs().max().item() + 2e-2


@pytest.fixture
def twin_paged(kernels):
    """MatmulBackend.attend_paged on its gather path (no `kernel` from an ops table), the twin of the extension's
    paged kernel."""
    from exllamav2.attn.backends.matmul import MatmulBackend

    return MatmulBackend(kernels.device).attend_paged


@pytest.mark.parametrize("q_len", [1, 3, 8])
@pytest.mark.parametrize("q_heads, kv_heads, head_dim", [(32, 8, 128), (8, 8, 64), (16, 2, 256), (12, 4, 96)])
@pytest.mark.parametrize("window, softcap", [(0, 0.0), (100, 0.0), (0, 30.0)])
def test_paged_attention_matches_matmul_twin(kernels, twin_paged, q_len, q_heads, kv_heads, head_dim, window,
                                            softcap):

    torch.manual_seed(q_len * 1000 + head_dim)
    page, pages = 256, 12
    batch = 3
    seqlens = torch.tensor([0, 300, 700], dtype=torch.int32, device=kernels.device)
    table = torch.tensor([[5, 0, 0, 0], [2, 7, 0, 0], [9, 1, 11, 3]], dtype=torch.int32, device=kernels.device)
    k_pages = torch.randn(pages, page, kv_heads, head_dim, device=kernels.device).half()
    v_pages = torch.randn(pages, page, kv_heads, head_dim, device=kernels.device).half()
    q = torch.randn(batch, q_len, q_heads, head_dim, device=kernels.device).half()
    k_new = torch.randn(batch, q_len, kv_heads, head_dim, device=kernels.device).half()
    v_new = torch.randn(batch, q_len, kv_heads, head_dim, device=kernels.device).half()
    scale = head_dim**-0.5
    kp, vp = k_pages.clone(), v_pages.clone()
    want = twin_paged(q, k_new, v_new, kp, vp, table, seqlens, scale=scale, window=window, softcap=softcap)
    got = kernels.paged_attention(q, k_new, v_new, k_pages, v_pages, table, seqlens, scale, window, softcap)
    assert torch.equal(k_pages, kp) and torch.equal(v_pages, vp)      # new keys/values stored in the same slots
    torch.testing.assert_close(got, want, rtol=5e-3, atol=5e-3)


def test_paged_attention_stops_at_the_block_table(kernels, twin_paged):
    """A sequence whose new tokens run past its block table's capacity: the kernel must neither store nor read
    those positions (their page index would come from past the end of the table). The table here is a slice of
    a larger tensor whose next row holds a page index far outside the pages, so a read past the slice faults."""
    page, pages, kv_heads, head_dim, q_heads = 16, 6, 2, 64, 4
    torch.manual_seed(11)
    backing = torch.full((3, 2), 1 << 28, dtype=torch.int32, device=kernels.device)
    backing[:2] = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    table = backing[:2]                                       # contiguous, 2 pages (32 positions) per sequence
    seqlens = torch.tensor([5, 31], dtype=torch.int32, device=kernels.device)   # sequence 1: query 0 at 31, 1..2 beyond
    k_pages = torch.randn(pages, page, kv_heads, head_dim, device=kernels.device).half()
    v_pages = torch.randn(pages, page, kv_heads, head_dim, device=kernels.device).half()
    q = torch.randn(2, 3, q_heads, head_dim, device=kernels.device).half()
    k_new = torch.randn(2, 3, kv_heads, head_dim, device=kernels.device).half()
    v_new = torch.randn(2, 3, kv_heads, head_dim, device=kernels.device).half()
    kp, vp = k_pages.clone(), v_pages.clone()
    got = kernels.paged_attention(q, k_new, v_new, k_pages, v_pages, table, seqlens, 0.125, 0, 0.0)
    if kernels.device == "cuda":
        torch.cuda.synchronize()            # a fault surfaces here, not at some later call
    # the twin cannot address positions past the table; the rows inside it see exactly the keys they see there
    want0 = twin_paged(q[:1], k_new[:1], v_new[:1], kp, vp, table[:1], seqlens[:1], scale=0.125)
    want1 = twin_paged(q[1:, :1], k_new[1:, :1], v_new[1:, :1], kp, vp, table[1:], seqlens[1:], scale=0.125)
    torch.testing.assert_close(got[:1], want0, rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(got[1:, :1], want1, rtol=5e-3, atol=5e-3)
    assert torch.equal(k_pages, kp) and torch.equal(v_pages, vp)       # nothing written beyond the table
    assert torch.isfinite(got).all()


def test_paged_attention_without_queries(kernels):
    """q_len 0 (or batch 0) returns an empty result instead of dividing by zero while choosing the splits."""
    k_pages = torch.zeros(2, 16, 2, 64, dtype=torch.float16, device=kernels.device)
    table = torch.zeros(1, 2, dtype=torch.int32, device=kernels.device)
    seqlens = torch.zeros(1, dtype=torch.int32, device=kernels.device)
    for batch, q_len in ((1, 0), (0, 1)):
        q = torch.zeros(batch, q_len, 4, 64, dtype=torch.float16, device=kernels.device)
        kv = torch.zeros(batch, q_len, 2, 64, dtype=torch.float16, device=kernels.device)
        out = kernels.paged_attention(q, kv, kv, k_pages, k_pages.clone(), table[:batch], seqlens[:batch],
                                      0.125, 0, 0.0)
        assert out.shape == q.shape


def test_cache_kernels_refuse_misaligned_byte_storage(kernels):
    """FP8 and 8-bit codes move as byte pairs; a uint8 view starting at an odd address is refused, not misread."""
    x = torch.zeros(1, 4, 64, dtype=torch.float16, device=kernels.device)
    fp8 = torch.zeros(1 + 4 * 64, dtype=torch.uint8, device=kernels.device)[1:].view(1, 4, 64)
    with pytest.raises(RuntimeError, match="byte boundary"):
        kernels.fp16_to_fp8(x, fp8, batch=1, offset=0, width=4)
    q = torch.zeros(1 + 4 * 64, dtype=torch.uint8, device=kernels.device)[1:].view(1, 4, 64)
    s = torch.zeros(1, 4, 2, dtype=torch.float16, device=kernels.device)
    with pytest.raises(RuntimeError, match="byte boundary"):
        kernels.fp16_to_q(x, q, s, 8, batch=1, offset=0, width=4)


def test_kernels_reject_tensors_on_other_devices(kernels):
    elsewhere = "cpu" if kernels.device == "cuda" else "meta"     # the emulator takes CPU tensors as its own
    with pytest.raises(RuntimeError, match="CUDA tensors only"):
        kernels.rms_norm(torch.zeros(2, 8, device=elsewhere).half(), torch.ones(8, device=elsewhere).half(), 1e-5)
