"""The CPU kernels for quantized weights (exllamav2_ext/cpu) against their PyTorch twin (exl2/gptq.dequantize_into).

The CPU layout must decode bit-exactly to the twin's fp16 weight; the matrix products must match x @ W (W the
twin's weight, computed in float64) to fp32 rounding, on both instruction-set paths (AVX2 is forced on AVX-512
CPUs through set_isa), with 1 and 2 threads, through the decode kernel (few rows) and the tiled GEMM (prefill).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ext
from exllamav2.model import linear as linear_module
from exllamav2.ops import build_ops
from exllamav2.quant import cpu_layout, group_layout, load_quantized, qlinear, quantize_rtn

kernels = ext.cpu_kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="CPU kernels unavailable (no AVX2/F16C or no compiler)")


DEMO_EXL2 = Path(__file__).resolve().parent.parent / "examples" / "demo_model" / "exl2"


class Source:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def _pair(t: dict[str, torch.Tensor], k: int, n: int, prescale: float = 1.0, bf16: bool = False):
    """(kernel weight, twin weight) loaded from the same tensors; the kernel one already in its CPU layout (for
    `bf16` activations: the pair layout where the kernels in use run it)."""
    src = Source({f"l.{a}": v for a, v in t.items()})
    kern = load_quantized("l", src, k, n, prescale=prescale)
    twin = load_quantized("l", src, k, n, prescale=prescale)
    twin.use_cpu_kernels = False
    if bf16:
        kern.ops = build_ops("cpu", torch.bfloat16)
    kern.forward(torch.zeros(1, k, dtype=torch.bfloat16 if bf16 else torch.float32))
    assert kern.cpu_matrix() is not None and twin.cpu_matrix() is None
    return kern, twin


def exl2_pair(k, n, bits, group_size=32, seed=0, bias=True, perm=True, prescale=1.0, bf16=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, n, generator=g) * 0.05
    t = quantize_rtn(w, group_layout(k, bits, group_size), torch.randperm(k, generator=g) if perm else None,
                     bias=torch.randn(n, generator=g) if bias else None)
    return _pair(t, k, n, prescale, bf16)


def gptq_pair(k, n, groups, act_order, seed=0, bf16=False):
    g = torch.Generator().manual_seed(seed)
    t = {
        "qweight": torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, generator=g),
        "qzeros": torch.randint(-2**31, 2**31 - 1, (groups, n // 8), dtype=torch.int32, generator=g),
        "scales": (torch.rand(groups, n, generator=g) * 0.01 + 0.001).half(),
        "bias": torch.randn(n, generator=g).half(),
    }
    if act_order:
        t["g_idx"] = torch.randint(0, groups, (k,), generator=g, dtype=torch.int32)
    return _pair(t, k, n, bf16=bf16)


EXL2_CASES = {
    # (K, N, bit widths (descending, one band each), group size)
    **{f"{b}bit": (128, 64, [b], 32) for b in (2, 3, 4, 5, 6, 8)},
    "mixed_all_widths": (200, 48, [8, 6, 5, 4, 3, 2], 32),
    "odd_k_short_last_group": (100, 33, [6, 3], 32),       # K, N not multiples of the vector width
    "group_64_rows": (320, 80, [5, 4], 64),
    "groups_of_16_rows_6bit": (96, 16, [6], 16),            # groups smaller than a 32-row chunk
    "tiny": (8, 1, [4], 32),
}


@pytest.mark.parametrize("case", sorted(EXL2_CASES))
def test_exl2_layout_decodes_bit_exactly(case, isa):
    k, n, bits, gs = EXL2_CASES[case]
    kern, twin = exl2_pair(k, n, bits, gs, seed=len(case), prescale=0.7)
    got, want = kern.dequantize(), twin.dequantize()
    assert got.dtype == want.dtype == torch.float16 and got.shape == want.shape == (k, n)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def _check_matmul(kern, twin, rows, seed=0):
    x = torch.randn(rows, kern.in_features, generator=torch.Generator().manual_seed(seed))
    want = x.double() @ twin.dequantize().double()
    if twin.bias is not None:
        want += twin.bias.double()
    got = kern.forward(x)
    assert got.dtype == torch.float32 and got.shape == (rows, kern.out_features)
    # fp32 accumulation of exact fp16 weights: error ~ sqrt(K) ulps of the row norm
    tol = 4e-7 * kern.in_features ** 0.5 * (x.abs().max().item() * twin.dequantize().abs().max().item() + 1)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)
    torch.testing.assert_close(got, twin.forward(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(EXL2_CASES))
@pytest.mark.parametrize("rows", [1, 3, 4, 9, 33])      # 9 and 33: above MAX_GEMV_ROWS, the tiled GEMM
def test_exl2_matmul_matches_twin(case, rows, isa):
    k, n, bits, gs = EXL2_CASES[case]
    kern, twin = exl2_pair(k, n, bits, gs, seed=rows + len(case))
    _check_matmul(kern, twin, rows, seed=rows)


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 20])
def test_threads_and_the_identity_permutation(rows, threads, isa):
    """Wide enough (1000 columns, 63 blocks) that 2 threads split the blocks, with padding past N."""
    kern, twin = exl2_pair(512, 1000, [4, 3], 64, seed=rows, perm=False, bias=False)
    assert torch.equal(kern.cpu_matrix().src[:512], torch.arange(512, dtype=torch.int32))
    _check_matmul(kern, twin, rows, seed=rows)


@pytest.mark.parametrize("act_order", [False, True], ids=["sequential", "act_order"])
@pytest.mark.parametrize("rows", [1, 3, 12])
def test_gptq_matches_twin(act_order, rows, isa):
    kern, twin = gptq_pair(256, 40, 4, act_order, seed=rows)
    assert torch.equal(kern.dequantize().view(torch.int16), twin.dequantize().view(torch.int16))
    _check_matmul(kern, twin, rows, seed=rows)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("rows", [1, 3, 12])
def test_direct_scales_and_zero_points_equal_the_indexed_exl2_form(bits, rows, isa):
    """EXL2 layers keep each column's scale as an index into its group's 16 values (tables built per group);
    GPTQ's path takes fp16 scales per column and zero points. Both paths, fed the same weights (scales looked
    up, zeros of 2^(bits-1)), must give the same results exactly, for every width and decode/prefill rows."""
    kern, _ = exl2_pair(96, 40, [bits], 32, seed=bits + rows)
    m = kern.cpu_matrix()
    assert m.scales.dtype == torch.uint8 and m.scale_values.shape == (m.scales.shape[1], 16)
    direct = m.scale_values[torch.arange(m.scales.shape[1]).view(1, -1, 1), m.scales.long()]
    zeros = torch.full(m.scales.shape, 1 << (bits - 1), dtype=torch.uint8)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))

    def matmul(scales, z, values=None):
        return kernels.q_matmul(x, m.qw, m.chunks, scales, z, m.src, m.bias, 40, cpu_layout.MAX_GEMV_ROWS, values)

    indexed = matmul(m.scales, None, m.scale_values)
    assert torch.equal(matmul(direct, None), indexed) and torch.equal(matmul(direct, zeros), indexed)
    want = kernels.q_dequant(m.qw, m.chunks, m.scales, None, m.src, 96, m.scale_values)
    assert torch.equal(kernels.q_dequant(m.qw, m.chunks, direct, zeros, m.src, 96), want)


def test_exl2_head_sized_layer_in_blocks(isa):
    """A head-like shape: many blocks, prefill rows through tiles that each hold a fraction of the weight."""
    kern, twin = exl2_pair(256, 4000, [6], 32, seed=3)
    _check_matmul(kern, twin, 1, seed=1)
    _check_matmul(kern, twin, 40, seed=2)


def test_the_packed_tensors_are_replaced_not_duplicated():
    k, n = 512, 512
    t = quantize_rtn(torch.randn(k, n) * 0.02, group_layout(k, [4], 128), torch.randperm(k))
    kern, _ = _pair(t, k, n)
    file_bytes = sum(v.numel() * v.element_size() for v in t.values())
    assert kern.q_weight is None and t["q_weight"].nbytes <= kern.nbytes() <= 1.1 * file_bytes
    assert 4.0 < kern.bits_per_weight() < 4.5


@pytest.mark.parametrize("rows", [1, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["exl2", "gptq"])
def test_bf16_activations_in_and_out(fmt, rows, isa):
    """The packed-code kernel takes and returns bf16 activations (the bf16 mode's decode), summed in float32: its
    float32 result rounded once to bf16, to within one bf16 ulp (a sum near a rounding tie may round the other
    way)."""
    kern, twin = _bf16_case(fmt, rows)
    x = torch.randn(rows, kern.in_features, generator=torch.Generator().manual_seed(rows)).bfloat16()
    got = kern.cpu_matrix().matmul(kernels, x)
    want = kern.cpu_matrix().matmul(kernels, x.float())
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-6)
    assert (got.float() == want.bfloat16().float()).float().mean() > 0.95


@pytest.mark.parametrize("rows", [9, 33])      # above MAX_GEMV_ROWS
@pytest.mark.parametrize("fmt", ["exl2", "gptq"])
def test_bf16_prefill_rows_multiply_bf16_tiles(fmt, rows, isa):
    kern, twin = _bf16_case(fmt, rows)
    x = torch.randn(rows, kern.in_features, generator=torch.Generator().manual_seed(rows)).bfloat16()
    assert_bf16_result(kern.forward(x), x, twin, tiles=True)


def _bf16_case(fmt: str, seed: int):
    return exl2_pair(200, 48, [8, 6, 5, 4, 3, 2], 32, seed=seed) if fmt == "exl2" else gptq_pair(256, 40, 4, True)


def assert_bf16_result(got: torch.Tensor, x: torch.Tensor, twin, tiles: bool) -> None:
    """`got` within bf16 rounding of the twin's x @ W + bias: the float32 sum rounded to bf16 (2^-8 of the value)
    plus, per product, 2^-11 (the pair kernel's exact weights (code - zero) * scale against the twin's fp16 ones)
    or, through decoded tiles (rows above MAX_GEMV_ROWS), 2^-8 (each weight rounded to bf16; the bias added to the
    GEMM's rounded result)."""
    w = twin.dequantize().double()
    bias = twin.bias.double() if twin.bias is not None else torch.zeros(w.shape[1], dtype=torch.float64)
    want = x.double() @ w + bias
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    per_product = 2**-8 if tiles else 2**-11
    bound = 2**-8 * (want.abs() + bias.abs()) + per_product * (x.double().abs() @ w.abs()) + 1e-6
    assert ((got.double() - want).abs() <= bound).all()


def _runs_pair_kernels() -> bool:
    if kernels is None:
        return False
    previous = kernels.isa()
    try:
        kernels.set_isa("avx512bf16")
        return True
    except RuntimeError:        # no AVX512-BF16 here
        return False
    finally:
        kernels.set_isa(previous)


needs_pairs = pytest.mark.skipif(not _runs_pair_kernels(), reason="no AVX512-BF16: the pair layout cannot run here")
PAIR_CASES = sorted(EXL2_CASES) + ["gptq_sequential", "gptq_act_order"]


@pytest.fixture
def pair_isa():
    previous = kernels.isa()
    kernels.set_isa("avx512bf16")
    yield
    kernels.set_isa(previous)


def _pair_weights(case: str, seed: int):
    if case.startswith("gptq"):
        return gptq_pair(256, 40, 4, case.endswith("act_order"), seed=seed, bf16=True)
    k, n, bits, gs = EXL2_CASES[case]
    return exl2_pair(k, n, bits, gs, seed=seed, prescale=0.7, bf16=True)


@needs_pairs
@pytest.mark.parametrize("case", PAIR_CASES)
def test_pair_layout_decodes_bit_exactly(case, pair_isa):
    kern, twin = _pair_weights(case, len(case))
    assert kern.cpu_matrix().pairs
    assert torch.equal(kern.dequantize().view(torch.int16), twin.dequantize().view(torch.int16))


@needs_pairs
@pytest.mark.parametrize("case", PAIR_CASES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 9])      # 9: above MAX_GEMV_ROWS, decoded tiles and a GEMM
def test_pair_kernel_matches_twin(case, rows, pair_isa, threads):
    """bf16 activations through the dot-product kernel (and, for 9 rows, the bf16 tiles of the pair layout)."""
    kern, twin = _pair_weights(case, rows + len(case))
    x = torch.randn(rows, kern.in_features, generator=torch.Generator().manual_seed(rows)).bfloat16()
    assert_bf16_result(kern.forward(x), x, twin, tiles=rows > cpu_layout.MAX_GEMV_ROWS)


@needs_pairs
def test_pair_kernel_rows_do_not_depend_on_the_rows_beside_them(pair_isa):
    """A batch's decode gives each row the bits it gets alone (1, 2 and 4 rows per pass sum in the same order)."""
    kern, _ = exl2_pair(1024, 512, [5, 4, 3], 32, seed=4, bf16=True)     # long sums: roundings that differ show
    x = torch.randn(7, kern.in_features, generator=torch.Generator().manual_seed(7)).bfloat16()
    together = kern.forward(x)
    for r in range(7):
        assert torch.equal(together[r : r + 1], kern.forward(x[r : r + 1]))


@needs_pairs
def test_pair_layout_with_float32_activations_multiplies_the_decoded_weight(pair_isa):
    kern, twin = _pair_weights("mixed_all_widths", 3)
    _check_matmul(kern, twin, 2, seed=2)


@needs_pairs
def test_the_pair_layout_needs_its_kernels(pair_isa):
    kern, _ = _pair_weights("4bit", 0)
    kernels.set_isa("avx512")
    with pytest.raises(RuntimeError, match="pair layout needs the avx512bf16 kernels"):
        kern.forward(torch.zeros(1, kern.in_features, dtype=torch.bfloat16))


def test_other_dtypes_multiply_the_decoded_weight():
    kern, twin = exl2_pair(64, 32, [4], 32, seed=1)
    x = torch.randn(2, 64).to(torch.float16)
    torch.testing.assert_close(kern.forward(x), twin.forward(x))


def test_bad_arguments_are_refused():
    kern, _ = exl2_pair(64, 32, [4], 32)
    m = kern.cpu_matrix()
    x = torch.randn(1, 64)
    args = dict(qw=m.qw, chunks=m.chunks, scales=m.scales, zeros=m.zeros, src=m.src, bias=m.bias,
                values=m.scale_values)

    def call(**change):
        a = {**args, **change}
        return kernels.q_matmul(x, a["qw"], a["chunks"], a["scales"], a["zeros"], a["src"], a["bias"], 32, 8,
                                a["values"])

    call()
    two_widths = m.chunks.clone()
    two_widths[1, 0], two_widths[1, 2] = 3, two_widths[0, 2]      # chunk 1 joins chunk 0's group at 3 bits
    with pytest.raises(RuntimeError, match="two bit widths"):
        call(chunks=two_widths)
    with pytest.raises(RuntimeError, match="zero points go with float16 scales"):
        call(zeros=torch.zeros_like(m.scales))
    with pytest.raises(RuntimeError, match="scale_values must be"):
        call(values=m.scale_values.float())

    with pytest.raises(RuntimeError, match="bit width 7"):
        call(chunks=m.chunks.clone().index_fill_(1, torch.tensor([0]), 7))
    with pytest.raises(RuntimeError, match="words out of range"):
        call(chunks=m.chunks.clone().index_fill_(1, torch.tensor([1]), 1000))
    with pytest.raises(RuntimeError, match=r"src\[0\] = 64 outside -1..63"):
        call(src=m.src.clone().fill_(64))
    with pytest.raises(RuntimeError, match=r"src\[5\] = -2 outside"):
        call(src=m.src.clone().index_fill_(0, torch.tensor([5]), -2))
    with pytest.raises(RuntimeError, match="qw must be"):
        call(qw=m.qw.float())
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.q_matmul(x.half(), m.qw, m.chunks, m.scales, None, m.src, None, 32, 8)
    with pytest.raises(RuntimeError, match="unknown instruction set"):
        kernels.set_isa("sse2")


def test_layout_shapes():
    kern, _ = exl2_pair(100, 33, [6, 3], 32)
    m = kern.cpu_matrix()
    assert m.qw.shape[0] == 3 and m.qw.shape[2] == cpu_layout.BLOCK             # 33 columns -> 3 blocks
    assert m.src.numel() == m.chunks.shape[0] * cpu_layout.CHUNK_ROWS
    assert sorted(m.src[m.src >= 0].tolist()) == list(range(100))
    assert int(m.chunks[:, 0].sum()) == m.qw.shape[1]                          # a b-bit chunk is b words


def _demo_logits(use_kernels: bool, monkeypatch) -> torch.Tensor:
    monkeypatch.setattr(qlinear.QuantWeight, "use_cpu_kernels", use_kernels)
    model = ExLlamaV2(ExLlamaV2Config(str(DEMO_EXL2)))
    model.load()
    ids = torch.randint(3, 2000, (1, 24), generator=torch.Generator().manual_seed(5))
    cache = ExLlamaV2Cache(model, max_seq_len=32)
    parts = [model.forward(ids[:, :16], cache)] + [model.forward(ids[:, i : i + 1], cache) for i in range(16, 24)]
    head = model.modules[-1]
    assert (head.q.cpu_matrix() is not None) == use_kernels
    return torch.cat(parts, 1)


def test_demo_model_logits_match_the_twin(monkeypatch, isa):
    """The bundled EXL2 demo model (4.0 bpw, 6-bit head): prefill and decode logits through the kernels equal
    the twin's to fp32 rounding, and every layer runs on the kernels."""
    with_kernels = _demo_logits(True, monkeypatch)
    twin = _demo_logits(False, monkeypatch)
    torch.testing.assert_close(with_kernels, twin, rtol=1e-4, atol=1e-4)
    assert (with_kernels.argmax(-1) == twin.argmax(-1)).all()


def _many_layers(bf16: bool):
    """q, k and v like layers of one input: different widths, group sizes, permutations and biases."""
    return [exl2_pair(96, 64, [4], 32, seed=1, bf16=bf16)[0], exl2_pair(96, 33, [6, 3], 32, seed=2, bf16=bf16)[0],
            exl2_pair(96, 16, [8, 5], 32, seed=3, bias=False, perm=False, bf16=bf16)[0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_many_layers_in_one_call_equal_each_layer_alone(dtype, rows, isa, threads):
    """q_matmul_many runs each layer's own kernel over its blocks, so every output equals its q_matmul exactly
    (the pair layout where the kernels in use run it and the activations are bf16)."""
    layers = _many_layers(dtype == torch.bfloat16)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)).to(dtype)
    together = qlinear.forward_many(layers, x)
    assert together is not None and len(together) == 3
    for got, layer in zip(together, layers):
        assert torch.equal(got, layer.forward(x))


def test_many_layers_fall_back_where_one_call_cannot_serve():
    layers = _many_layers(False)
    assert qlinear.forward_many(layers, torch.randn(cpu_layout.MAX_GEMV_ROWS + 1, 96)) is None   # prefill
    assert qlinear.forward_many(layers, torch.randn(1, 96).half()) is None
    twin = exl2_pair(96, 16, [4], 32)[1]                  # on the PyTorch twin
    assert qlinear.forward_many(layers + [twin], torch.randn(1, 96)) is None
    with pytest.raises(RuntimeError, match="1..8 rows"):
        kernels.q_matmul_many(torch.randn(9, 96), [m.cpu_matrix().call_args() for m in layers], 8)


def test_the_demo_model_projects_q_k_v_and_gate_up_in_one_call_each(monkeypatch, layer_path):
    """The layers' own decode path calls q_matmul_many twice per layer (q/k/v, gate/up) and gives the logits of one
    call per layer."""
    calls = []
    real = kernels.q_matmul_many
    monkeypatch.setattr(kernels, "q_matmul_many", lambda x, layers, rows: calls.append(len(layers)) or
                        real(x, layers, rows))
    together = _demo_logits(True, monkeypatch)
    layers = ExLlamaV2Config(str(DEMO_EXL2)).num_hidden_layers
    assert calls.count(3) == calls.count(2) == 8 * layers      # 8 decode steps; prefill runs layer by layer
    monkeypatch.setattr(linear_module, "forward_many_quantized", lambda weights, x: None)
    assert torch.equal(_demo_logits(True, monkeypatch), together)
