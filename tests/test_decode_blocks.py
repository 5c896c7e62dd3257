"""The CPU's fused decode blocks and the decode stack running them all in one call (model/decode_blocks.py over
exllamav2_ext/cpu/decode_blocks.cpp) against their twin, the layers' own forward: the same logits for dense and
paged decode steps, quantized and 16-bit weights,
float32 and bf16 activations, both instruction sets and thread counts; which layers get a block, which calls fall
back to the layer's path, and the refusals. The blocks run the same kernels in the same order as the layers' path
except SiLU, whose last float32 bits may differ from torch's (within 4 ulp here), so float32 results agree to
1e-5 relative and bf16 ones to one bf16 rounding of an activation (measured: equal on these models). Against
transformers the blocks are held by every decode test of the model suites, which run through them by default."""

from __future__ import annotations

import contextlib
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer, ext
from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler
from exllamav2.model.module import Intervention
from exllamav2.quant import group_layout, quantize_rtn
from tests.test_cpu_exl2 import DEMO_EXL2
from tests.test_model import VOCAB

kernels = ext.cpu_kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="CPU kernels unavailable (no AVX2/F16C or no compiler)")


def load(model_dir, dtype: str) -> ExLlamaV2:
    config = ExLlamaV2Config(str(model_dir))
    config.cpu_dtype = dtype
    model = ExLlamaV2(config)
    model.load()
    return model


def layers_with_blocks(model: ExLlamaV2) -> list:
    return [m for m in model.modules if getattr(m, "decode_block", None) is not None]


@contextlib.contextmanager
def through(model: ExLlamaV2, path: str):
    """Forwards inside run through `path`: 'stack' (the whole decoder in one call, as loaded), 'blocks' (one call
    per layer) or 'layers' (the layers' own path, the twin)."""
    saved = {m: m.decode_block for m in layers_with_blocks(model)}
    stack = model.decode_stack
    for m in saved:
        m.decode_block = None if path == "layers" else saved[m]
    model.decode_stack = stack if path == "stack" else None
    try:
        yield
    finally:
        for m, b in saved.items():
            m.decode_block = b
        model.decode_stack = stack


def decode_logits(model: ExLlamaV2, path: str, rows: int = 3, steps: int = 6, vocab: int = VOCAB) -> torch.Tensor:
    """A prefill of 20 tokens per row, then `steps` greedy decode steps through `path`."""
    with through(model, path):
        ids = torch.randint(3, vocab, (rows, 20), generator=torch.Generator().manual_seed(rows))
        cache = ExLlamaV2Cache(model, batch_size=rows, max_seq_len=64)
        out = [model.forward(ids, cache, last_id_only=True)]
        for _ in range(steps):
            out.append(model.forward(out[-1][:, -1:].argmax(-1), cache))
        return torch.cat(out, 1)


def assert_paths_agree(model: ExLlamaV2, dtype: str, **kw) -> None:
    want = decode_logits(model, "layers", **kw)
    for path in ("blocks", "stack"):
        assert_twin(decode_logits(model, path, **kw), want, dtype)


def assert_twin(got: torch.Tensor, want: torch.Tensor, dtype: str) -> None:
    scale = want.abs().max().item()
    tol = 1e-5 if dtype == "float32" else 1e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= (1.0 if dtype == "float32" else 0.95)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 15, 16, 37, 2048])
def test_silu_mul_matches_the_twin(n, dtype, isa):
    gen = torch.Generator().manual_seed(n)
    g = (torch.randn(n, generator=gen) * 6).to(dtype)
    u = torch.randn(n, generator=gen).to(dtype)
    g[: min(n, 4)] = torch.tensor([-100.0, -30.0, 0.0, 100.0])[: min(n, 4)].to(dtype)
    got, want = kernels.silu_mul(g, u), F.silu(g) * u
    assert got.dtype == dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=4e-7, atol=1e-30)
    else:   # silu's float32 result a few ulp off torch's may round to the neighbouring bf16, then the product
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-30)
        usual = g.float().abs() < 80        # below about -87 both are zero but for a denormal's worth
        assert int((got[usual] != want[usual]).sum()) <= int(usual.sum()) // 100


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["llama", "llama_mha", "qwen2", "phi3", "smollm3", "qwen3"])
def test_blocks_match_the_layers_path(arch, dtype, tiny_model_factory):
    """16-bit weights: plain, with q/k/v biases (llama_mha, qwen2), from fused qkv and gate_up tensors (phi3), with
    layers that do not rotate (smollm3's NoPE layers), with per-head q/k norms (qwen3); each layer's block, and the
    whole stack in one call."""
    model = load(tiny_model_factory(arch)[0], dtype)
    assert len(layers_with_blocks(model)) == 2 * model.config.num_hidden_layers
    assert model.decode_stack is not None
    assert_paths_agree(model, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantized_blocks_match_the_layers_path(dtype, threads):
    """The bundled EXL2 demo model: the indexed-scale tables (float32) or the pair layout (bf16 where the CPU has
    AVX512-BF16), at 1 and 2 threads."""
    model = load(DEMO_EXL2, dtype)
    assert len(layers_with_blocks(model)) == 2 * model.config.num_hidden_layers
    assert_paths_agree(model, dtype, vocab=2000)


def exl2_with_a_permutation_per_layer(fp16_dir, out):
    """The tiny model's linears as EXL2 (4 bits, groups of 32 rows), each with its own act-order permutation, q, k
    and v included: their activations need a gather each (the converter's checkpoints, like the demo model, give the
    layers of one input one permutation, so one gather serves them)."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, w in load_file(fp16_dir / "model.safetensors").items():
        if not name.endswith("proj.weight"):
            tensors[name] = w
            continue
        k = w.shape[1]
        packed = quantize_rtn(w.T.float(), group_layout(k, [4], 32), torch.randperm(k, generator=gen))
        tensors.update({f"{name.removesuffix('.weight')}.{key}": t for key, t in packed.items()})
    out.mkdir()
    save_file(tensors, out / "model.safetensors")
    shutil.copy(fp16_dir / "config.json", out / "config.json")
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantized_blocks_with_a_permutation_per_layer(dtype, tiny_model_factory, tmp_path):
    """q, k, v (and gate, up) gathered apart where their permutations differ; the demo model's test above holds the
    shared gather of one permutation."""
    model = load(exl2_with_a_permutation_per_layer(tiny_model_factory("llama")[0], tmp_path / "exl2"), dtype)
    assert model.decode_stack is not None and model.is_quant()
    assert_paths_agree(model, dtype)


def test_blocks_on_each_instruction_set(isa, tiny_model_factory):
    model = load(tiny_model_factory("llama")[0], "float32")
    assert_paths_agree(model, "float32", rows=1)


def _generate(model: ExLlamaV2, tokenizer, path: str) -> list[list[int]]:
    """Three jobs of different lengths through the dynamic generator's paged batch, greedy, through `path`."""
    with through(model, path):
        generator = ExLlamaV2DynamicGenerator(model=model, cache=ExLlamaV2Cache(model, max_seq_len=512),
                                              tokenizer=tokenizer)
        jobs = []
        for i, length in enumerate((70, 9, 33)):
            ids = torch.randint(3, 2000, (1, length), generator=torch.Generator().manual_seed(i))
            jobs.append(ExLlamaV2DynamicJob(input_ids=ids, max_new_tokens=12 + 5 * i, stop_conditions=[],
                                            gen_settings=ExLlamaV2Sampler.Settings.greedy()))
            generator.enqueue(jobs[-1])
        tokens: dict[int, list[int]] = {}
        while generator.num_remaining_jobs():
            for r in generator.iterate():
                if r["stage"] == "streaming" and "token_ids" in r:
                    tokens.setdefault(jobs.index(r["job"]), []).extend(r["token_ids"].flatten().tolist())
        return [tokens[i] for i in range(len(jobs))]


def test_paged_decode_through_the_blocks(monkeypatch):
    """The dynamic generator's paged batch: the same greedy tokens through each layer's block and through the
    stack as through the layers' own path, and each is really run."""
    model = load(DEMO_EXL2, "float32")
    tokenizer = ExLlamaV2Tokenizer(model.config)
    want = _generate(model, tokenizer, "layers")
    attn = next(m for m in layers_with_blocks(model) if hasattr(m.decode_block, "attn"))
    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def forward_paged(self, *args):
            calls.append(args)
            return self.inner.forward_paged(*args)

    monkeypatch.setattr(attn.decode_block, "block", Counting(attn.decode_block.block))
    monkeypatch.setattr(model.decode_stack, "stack", Counting(model.decode_stack.stack))
    assert _generate(model, tokenizer, "blocks") == want
    assert calls, "the paged steps did not run the block"
    calls.clear()
    assert _generate(model, tokenizer, "stack") == want
    assert calls and all(len(c[1]) == model.config.num_hidden_layers for c in calls), "the stack did not run"


@pytest.mark.parametrize("arch, attention, mlp", [
    ("llama", True, True), ("qwen3", True, True), ("mistral", False, True), ("gemma2", False, False),
    ("granite", False, False), ("gpt2", False, False)])
def test_which_layers_get_blocks(arch, attention, mlp, tiny_model_factory):
    """Sliding windows (mistral), post-norms and softcaps (gemma2), residual multipliers (granite), LayerNorm and a
    plain GELU MLP (gpt2): no block where the layer has a part it does not compute (q/k norms it computes)."""
    model = load(tiny_model_factory(arch)[0], "float32")
    attn_blocks = [a.decode_block is not None for a in model.attention_layers]
    mlp_blocks = [m.decode_block is not None for m in model.modules if type(m).__name__ == "ExLlamaV2MLP"]
    assert attn_blocks and all(b == attention for b in attn_blocks)
    assert mlp_blocks and all(b == mlp for b in mlp_blocks)
    assert (model.decode_stack is not None) == (attention and mlp)


def test_calls_the_blocks_do_not_compute_take_the_layers_path(tiny_model_factory, monkeypatch):
    """A mask, position offsets, a prefill or more rows than the kernels take run the attention layer's own path
    (the MLP block takes masked and offset rows: they change nothing there); a plain decode step runs the block
    (here made to fail, to show it is reached)."""
    model = load(tiny_model_factory("llama")[0], "float32")

    class Refusing:
        def __getattr__(self, name):
            raise AssertionError("block reached")

    for m in model.attention_layers:
        monkeypatch.setattr(m.decode_block, "block", Refusing())
    monkeypatch.setattr(model.decode_stack, "stack", Refusing())
    cache = ExLlamaV2Cache(model, batch_size=9, max_seq_len=64)
    ids = torch.randint(3, VOCAB, (9, 8), generator=torch.Generator().manual_seed(0))
    model.forward(ids, cache)                                       # prefill
    model.forward(ids[:, :1], cache)                                # 9 rows
    cache.current_seq_len = 8
    model.forward(ids[:2, :1], cache, input_mask=torch.ones(2, 9, dtype=torch.bool))
    cache.current_seq_len = 8
    model.forward(ids[:2, :1], cache, position_offsets=torch.tensor([1, 0]))
    cache.current_seq_len = 8
    with pytest.raises(AssertionError, match="block reached"):
        model.forward(ids[:2, :1], cache)


def test_bad_block_arguments_are_refused(tiny_model_factory):
    model = load(tiny_model_factory("llama")[0], "float32")
    attn = model.attention_layers[0]
    block = attn.decode_block.block
    x = torch.randn(1, 1, 64)
    cache = ExLlamaV2Cache(model, max_seq_len=16)
    kc, vc = cache.key_states[0], cache.value_states[0]
    with pytest.raises(RuntimeError, match="x's dtype"):
        block.forward(x, kc.bfloat16(), vc.bfloat16(), 0, None, None)
    with pytest.raises(RuntimeError, match="> past"):
        block.forward(x, kc, vc, 16, None, None)
    with pytest.raises(RuntimeError, match="at most 8 rows"):
        block.forward(torch.randn(9, 1, 64), kc, vc, 0, None, None)
    with pytest.raises(RuntimeError, match="cos and sin"):
        block.forward(x, kc, vc, 0, torch.ones(1, 1, 1, 16, dtype=torch.float64), torch.ones(1, 1, 1, 16))
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        kernels.DecodeProj.dense(torch.randn(8, 64), None)
    a = model.modules[1]
    projs = [lin.weight for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj)]
    projs = [kernels.DecodeProj.dense(w, None) for w in projs]
    with pytest.raises(RuntimeError, match="q and k norms go together"):
        kernels.AttnDecodeBlock(torch.ones(64), 1e-5, *projs, 4, 2, 16, 0.25, torch.ones(16), None)
    with pytest.raises(RuntimeError, match="q_norm: the norm weight must be contiguous float32"):
        kernels.AttnDecodeBlock(torch.ones(64), 1e-5, *projs, 4, 2, 16, 0.25, torch.ones(24), torch.ones(16))
    w = kernels.DecodeProj.dense(torch.randn(8, 64).bfloat16(), None)
    with pytest.raises(RuntimeError, match="projection sizes"):
        kernels.AttnDecodeBlock(torch.ones(64), 1e-5, w, w, w, kernels.DecodeProj.dense(torch.randn(64, 32).bfloat16(),
                                                                                        None), 2, 1, 16, 0.25)
    with pytest.raises(RuntimeError, match="all be quantized or all 16-bit, each with 64 inputs"):
        kernels.MlpDecodeBlock(torch.ones(64), 1e-5, w, kernels.DecodeProj.dense(torch.randn(8, 32).bfloat16(), None),
                               kernels.DecodeProj.dense(torch.randn(64, 8).bfloat16(), None))


def test_the_stack_steps_aside_for_an_intervention(tiny_model_factory):
    """A layer wrapped in an Intervention after load runs its hooks: the stack, built over the bare layers, is not
    used while the model holds the wrapper (each layer's block still is, inside it)."""
    model = load(tiny_model_factory("llama")[0], "float32")
    want = decode_logits(model, "stack", rows=1)
    seen = []
    model.modules[3] = Intervention(model.modules[3], pre_forward=lambda x, *a, **k: seen.append(x.shape) or x)
    got = decode_logits(model, "stack", rows=1)
    assert len(seen) == 7 and seen[-1] == (1, 1, 64)          # the prefill and each of 6 decode steps
    assert_twin(got, want, "float32")


def test_the_stack_gives_logits_while_the_model_holds_its_head(tiny_model_factory, monkeypatch):
    """The final norm and head join the stack: a plain decode step's logits come from the stack's one call (the
    paths agree: test_blocks_match_the_layers_path); asked for the last state, or with the head replaced after load,
    the stack stops at the decoder and the model's own norm and head run."""
    model = load(tiny_model_factory("llama")[0], "bfloat16")
    asked = []

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def forward(self, *args):
            asked.append(args[-1])
            return self.inner.forward(*args)

    monkeypatch.setattr(model.decode_stack, "stack", Recording(model.decode_stack.stack))
    cache = ExLlamaV2Cache(model, max_seq_len=32)
    model.forward(torch.tensor([[5, 6, 7]]), cache, preprocess_only=True)
    want = model.forward(torch.tensor([[8]]), cache)
    cache.current_seq_len = 3
    logits, state = model.forward(torch.tensor([[8]]), cache, return_last_state=True)
    head = model.modules[-1]
    model.modules[-1] = Intervention(head)
    cache.current_seq_len = 3
    wrapped = model.forward(torch.tensor([[8]]), cache)
    assert asked == [True, False, False]
    assert torch.equal(logits, want) and torch.equal(wrapped, want)
    assert state.shape == (1, 1, 64) and want.dtype == torch.float32


def test_bad_stack_arguments_are_refused(tiny_model_factory):
    model = load(tiny_model_factory("llama")[0], "float32")
    stack = model.decode_stack.stack
    cache = ExLlamaV2Cache(model, max_seq_len=16)
    with pytest.raises(RuntimeError, match="one key and one value cache per attention block"):
        stack.forward(torch.randn(1, 1, 64), cache.key_states[:1], cache.value_states[:1], 0, None, None)
    with pytest.raises(RuntimeError, match="one rope flag per block"):
        kernels.DecodeStack([model.modules[1].decode_block.block], [True, False])
    headless = kernels.DecodeStack([model.modules[2].decode_block.block], [False])
    with pytest.raises(RuntimeError, match="logits asked of a stack built without a head"):
        headless.forward(torch.randn(1, 1, 64), [], [], 0, None, None, True)
    head = kernels.DecodeProj.dense(torch.randn(40, 64).bfloat16(), None)
    with pytest.raises(RuntimeError, match="DecodeHead: the norm weight must be contiguous float32"):
        kernels.DecodeHead(torch.ones(64, dtype=torch.float64), 1e-5, head)
    with pytest.raises(RuntimeError, match="DecodeHead: the projections of one input must all be quantized or all "
                                           "16-bit, each with 32 inputs"):
        kernels.DecodeHead(torch.ones(32), 1e-5, head)
