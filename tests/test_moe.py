"""Mixture-of-experts MLPs (exllamav2/moe.py) against transformers fp32 eager on tiny random models
(tests/tiny_models.py MOE_SPECS: 4 experts, top-2; Llama 4 top-1).

test_model.py's checks run here on every MoE spec (full prompt, prefill-then-decode and a left-padded batch per
attention backend: the fp32 CPU path routes exactly as transformers). Checks that compare two *different*
computations (FP16 vs EXL2, FP16 vs quantized cache, PyTorch vs kernels in fp16) are routing-aware: a token whose
router scores nearly tie may legitimately pick another expert under the perturbation, a discontinuity no dense
tolerance covers, so such tokens are counted (few are allowed) and the tolerance applies to the others.
Then what is particular to routing: ties, the experts-per-token override, that only the chosen experts run, the
stacked and per-expert checkpoint layouts, refusals, and experts calibration never reaches.
"""

from __future__ import annotations

import copy
import json
import re
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from exllamav2.errors import CheckpointError, ConfigError
from exllamav2.model.moe import ExLlamaV2MoEMLP, ExLlamaV2Router
from tests.test_kernel_dispatch import model_logits, real_kernels  # noqa: F401  (fixture)
from tests.test_model import (  # noqa: F401  (collected here over the MoE specs: `arch` below)
    assert_matches,
    backend,
    test_full_prompt,
    test_left_padded_batch,
    test_prefill_then_decode,
)
from tests.tiny_models import MOE_SPECS, build_tiny_model, write_tokenizer

VOCAB = 250
MOE_ARCHS = tuple(sorted(MOE_SPECS))
MAX_FLIPS = 0.15        # share of tokens whose routing a perturbation may flip (measured: at most 0.08)
TOP_K = {"llama4": 1}   # experts per token where a spec does not route to 2


@pytest.fixture(params=MOE_ARCHS)
def arch(request) -> str:
    """test_model.py's tests, imported above, run over the MoE specs."""
    return request.param


def load(model_dir: Path) -> ExLlamaV2:
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    model.load()
    return model


def prompt(n: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def moe_modules(model: ExLlamaV2) -> list[ExLlamaV2MoEMLP]:
    return [m for m in model.modules if isinstance(m, ExLlamaV2MoEMLP)]


def hf_routers(hf) -> list[torch.nn.Module]:
    """transformers' router modules (Mixtral/Qwen/OLMoE: mlp.gate; Granite-MoE: block_sparse_moe.router)."""
    return [m for name, m in hf.named_modules() if re.search(r"\.(gate|router)$", name) and hasattr(m, "top_k")]


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_layout_and_config(arch, tiny_model_factory):
    """Each layer is the MLP kind config.json makes it; num_experts / num_experts_per_token as upstream reads
    them; every expert present, the router unquantized."""
    model_dir, hf = tiny_model_factory(arch)
    model = load(model_dir)
    cfg = model.config
    assert (cfg.num_experts, cfg.num_experts_per_token) == (4, TOP_K.get(arch, 2))
    sparse = [isinstance(m, ExLlamaV2MoEMLP) for m in model.modules[2:-2:2]]
    layers = hf.model.layers if hasattr(hf, "model") else hf.transformer.blocks      # DBRX: transformer.blocks
    kinds = ("mlp", "block_sparse_moe", "ffn", "feed_forward")
    blocks = [next(getattr(layer, k) for k in kinds if hasattr(layer, k)) for layer in layers]
    want = [type(b).__name__.endswith(("Moe", "MoE", "SparseMoeBlock", "DbrxFFN")) for b in blocks]
    assert sparse == want
    if arch == "qwen3_moe":
        assert sparse == [True, False, True]            # mlp_only_layers=[1]
    if arch == "llama4":
        assert sparse == [False, True, False, True]     # interleave_moe_layer_step=2
    for m in moe_modules(model):
        assert len(m.experts) == 4 and isinstance(m.router, ExLlamaV2Router)
        assert m.router.weight.dtype == torch.float32   # router math in fp32 whatever the model's dtype


def _tie_routers(hf, rows: list[int]) -> None:
    """Give the listed experts the same router row in every layer: their logits tie exactly for every token."""
    with torch.no_grad():
        for router in hf_routers(hf):
            for r in rows[1:]:
                router.weight[r] = router.weight[rows[0]]


@pytest.mark.parametrize("arch,rows", [("mixtral", [0, 1, 2, 3]), ("qwen2_moe", [1, 3]), ("granitemoe", [0, 2, 3]),
                                       ("llama4", [0, 1, 2, 3])])
def test_tied_router_logits_break_as_transformers(arch, rows, tmp_path):
    """Experts whose router rows are equal tie for every token; the top-k must pick the same experts (with the
    same weights) as transformers' torch.topk, or the output differs (all four tied: the choice decides it)."""
    _, hf = build_tiny_model(arch, tmp_path / "src")
    _tie_routers(hf, rows)
    copy.deepcopy(hf).half().save_pretrained(tmp_path / "tied", safe_serialization=True)
    model = load(tmp_path / "tied")
    ids = prompt()
    with torch.no_grad():
        assert_matches(model.forward(ids), hf(ids).logits)


def test_experts_per_token_override_matches_transformers(tiny_model_factory):
    """config.num_experts_per_token set after loading (model_init's -ept) routes to that many experts, as
    transformers does with its routers' top_k set to the same value."""
    model_dir, hf = tiny_model_factory("qwen3_moe")
    model = load(model_dir)
    ids = prompt(seed=3)
    hf = copy.deepcopy(hf)
    for k in (1, 3):
        model.config.num_experts_per_token = k
        for router in hf_routers(hf):
            router.top_k = k
        with torch.no_grad():
            assert_matches(model.forward(ids), hf(ids).logits)


@pytest.mark.parametrize("k", [0, 5, None, 2.0])
def test_bad_experts_per_token_is_refused(k, tiny_model_factory):
    model = load(tiny_model_factory("mixtral")[0])
    model.config.num_experts_per_token = k
    with pytest.raises(ConfigError, match="num_experts_per_token"):
        model.forward(prompt(4))


def test_only_the_chosen_experts_run(tiny_model_factory):
    """Each expert runs at most once per layer and forward, on exactly the tokens routed to it; an expert no
    token chose never runs (the work is top-k per token, not every expert for every token)."""
    model = load(tiny_model_factory("mixtral")[0])
    calls: dict[tuple[int, int], list[int]] = {}
    routed: dict[int, torch.Tensor] = {}
    for m in moe_modules(model):
        route = m.route
        m.route = lambda x, m=m, route=route: routed.__setitem__(m.layer_idx, route(x)[1]) or route(x)
        for e, expert in enumerate(m.experts):
            project = expert.project
            expert.project = (lambda x, loras=None, key=(m.layer_idx, e), project=project:
                              calls.setdefault(key, []).append(x.shape[0]) or project(x, loras))
    cache = ExLlamaV2Cache(model, max_seq_len=64)
    for ids in (prompt(24), prompt(1, seed=7)):                     # a prefill, then one decoded token
        calls.clear()
        model.forward(ids, cache)
        total = 0
        for layer, chosen in routed.items():
            for e in range(4):
                n = int((chosen == e).sum())
                assert calls.get((layer, e), []) == ([n] if n else []), (layer, e)
                total += n
        assert total == ids.shape[1] * 2 * len(routed)             # top-2: two expert rows per token per layer
    assert len(calls) == 2 * len(routed)                            # the decoded token ran two experts per layer


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "granitemoe"])
def test_stacked_and_per_expert_layouts_give_identical_logits(arch, tiny_model_factory, tmp_path):
    """transformers 5 can save experts stacked ([experts, 2 x inter, hidden] gate_up_proj and down_proj, its
    router under mlp.gate): the same weights load to bit-identical logits from either layout."""
    model_dir, hf = tiny_model_factory(arch)
    copy.deepcopy(hf).half().save_pretrained(tmp_path, safe_serialization=True, save_original_format=False)
    with safe_open(str(next(tmp_path.glob("*.safetensors"))), "pt") as f:
        names = set(f.keys())
    assert any(n.endswith("experts.gate_up_proj") for n in names)             # really the stacked layout
    ids = prompt(seed=5)
    assert torch.equal(load(model_dir).forward(ids), load(tmp_path).forward(ids))


def test_granite_input_linear_is_stacked(tiny_model_factory):
    """Granite-MoE's own layout is stacked (input_linear / output_linear): each expert slices its rows."""
    model_dir, _ = tiny_model_factory("granitemoe")
    model = load(model_dir)
    m = moe_modules(model)[0]
    assert m.experts[2].gate_proj.stacked_source()[0].endswith("block_sparse_moe.input_linear.weight")
    with safe_open(str(next(Path(model_dir).glob("*.safetensors"))), "pt") as f:
        full = f.get_tensor(f"{m.key}.input_linear.weight").float()
    i = model.config.moe_intermediate_size
    assert torch.equal(m.experts[2].up_proj.weight.float(), full[2, i:])


def _edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,error,match", [
    ({"num_local_experts": 3}, CheckpointError, r"experts\.3"),                  # an expert the config omits
    ({"num_local_experts": None}, ConfigError, "num_local_experts"),
    ({"num_experts_per_tok": 5}, ConfigError, "exceeds"),
])
def test_checkpoint_and_config_disagreements_are_refused(changes, error, match, tiny_model_factory, tmp_path):
    import shutil

    shutil.copytree(tiny_model_factory("mixtral")[0], tmp_path / "m")
    _edit_config(tmp_path / "m", **changes)
    with pytest.raises(error, match=match):
        ExLlamaV2(ExLlamaV2Config(str(tmp_path / "m")))


def test_olmoe_clip_qkv_matches_transformers(tmp_path):
    """OLMoE's clip_qkv clamps q, k and v (after their norms); small enough here that it bites."""
    cls, overrides = MOE_SPECS["olmoe"]
    model_dir, hf = build_tiny_model("olmoe_clip", tmp_path / "m", spec=(cls, {**overrides, "clip_qkv": 0.5}))
    ids = prompt(24, 31)
    with torch.no_grad():
        ref = hf(ids).logits
        unclipped = hf.config.clip_qkv
        hf.config.clip_qkv = None
        assert (hf(ids).logits - ref).abs().max() > 0.1        # the clamp changes the output
        hf.config.clip_qkv = unclipped
    assert_matches(load(model_dir).forward(ids), ref)


# --- routing-aware comparisons of two computations ------------------------------------------------


@contextmanager
def recording_routes(model: ExLlamaV2):
    """Each MoE layer's chosen experts (sorted per token), token after token over the forwards run inside."""
    routes: dict[int, list[torch.Tensor]] = defaultdict(list)
    modules = moe_modules(model)
    for m in modules:
        def route(x, m=m, original=m.route):
            weights, chosen = original(x)
            routes[m.layer_idx].append(chosen.sort(-1).values.cpu())
            return weights, chosen
        m.route = route
    try:
        yield routes
    finally:
        for m in modules:
            del m.route


def flipped(a: dict, b: dict, shape: tuple[int, ...]) -> torch.Tensor:
    """Tokens (in `shape`, e.g. [batch, length]) routed to other experts in any layer by the two runs."""
    assert a.keys() == b.keys() and a
    return torch.stack([(torch.cat(a[k]) != torch.cat(b[k])).any(-1) for k in a]).any(0).view(shape)


def routed_logits(model: ExLlamaV2, run) -> tuple[torch.Tensor, dict]:
    with recording_routes(model) as routes:
        logits = run(model)
    return logits[..., :VOCAB].float().cpu(), routes


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """converted(arch) -> (fp16 dir, {bpw: EXL2 dir}, transformers model): convert.py at 4.0 and 8.0 bpw. Mixtral's
    calibration never reaches expert 3 (its router logit masked while converting), as happens to rare experts."""
    import convert

    made: dict[str, tuple] = {}

    def make(arch: str):
        if arch in made:
            return made[arch]
        root = tmp_path_factory.mktemp(f"moe_exl2_{arch}")
        src = root / "fp16"
        src.mkdir()
        _, hf = build_tiny_model(arch, src)
        write_tokenizer(src)
        forward = ExLlamaV2Router.forward
        if arch == "mixtral":
            ExLlamaV2Router.forward = lambda self, x, **kw: forward(self, x).index_fill_(-1, torch.tensor([3]),
                                                                                         float("-inf"))
        try:
            assert convert.main(["-i", str(src), "-o", str(root / "work"), "-om", str(root / "m.json"),
                                 "-mr", "4", "-ml", "64"]) == 0
            out = {}
            for bpw in (4.0, 8.0):
                out[bpw] = root / f"exl2_{bpw}"
                assert convert.main(["-i", str(src), "-o", str(root / f"work{bpw}"), "-cf", str(out[bpw]), "-b",
                                     str(bpw), "-r", "4", "-l", "64", "-m", str(root / "m.json")]) == 0
        finally:
            ExLlamaV2Router.forward = forward
        made[arch] = (src, out, hf)
        return made[arch]

    return make


# per-expert; shared expert; stacked; flat stacked; stacked (in, out) with input-weighted top-1 and a shared expert
EXL2_ARCHS = ("mixtral", "qwen2_moe", "granitemoe", "dbrx", "llama4")


@pytest.mark.parametrize("arch", EXL2_ARCHS)
def test_eight_bpw_tracks_fp16(arch, converted):
    """Every expert quantized (routers FP16); 8 bpw within test_arch_exl2's bound (6% of the logits' range) on the
    tokens routed as in FP16, few tokens rerouted, top-1 agreement >= 85%."""
    src, out, _ = converted(arch)
    ids = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(11))
    ref, ref_routes = routed_logits(load(src), lambda m: m.forward(ids))
    q8_model = load(out[8.0])
    assert all(lin.q is not None for m in moe_modules(q8_model) for e in m.experts for lin in e.linears())
    assert all(m.router.weight is not None and not hasattr(m.router, "q") for m in moe_modules(q8_model))
    q8, q8_routes = routed_logits(q8_model, lambda m: m.forward(ids))
    moved = flipped(ref_routes, q8_routes, ids.shape)
    assert moved.float().mean() <= MAX_FLIPS
    spread = (ref.max() - ref.min()).item()
    assert (q8 - ref)[~moved].abs().max().item() < 0.06 * spread
    assert (q8.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.85


def test_routers_stay_fp16_and_unrouted_experts_are_quantized(converted):
    out = converted("mixtral")[1]
    with safe_open(str(out[4.0] / "output.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.block_sparse_moe.gate.weight").dtype == torch.float16
    for layer in (0, 1):
        for proj in ("w1", "w2", "w3"):                     # expert 3: never routed to during calibration
            assert f"model.layers.{layer}.block_sparse_moe.experts.3.{proj}.q_weight" in names
    assert not any(n.endswith("gate.q_weight") for n in names)


@pytest.mark.parametrize("bpw", [4.0, 8.0])
@pytest.mark.parametrize("arch", EXL2_ARCHS)
def test_quantized_greedy_through_the_dynamic_generator(arch, bpw, converted):
    from tests.test_arch_exl2 import dynamic_greedy, forward_greedy
    from tests.test_arch_exl2 import load as load_with_tokenizer

    model, tokenizer = load_with_tokenizer(converted(arch)[1][bpw])
    assert dynamic_greedy(model, tokenizer) == forward_greedy(model)


@pytest.mark.parametrize("attn_backend", ["sdpa", "matmul"])
def test_fp16_greedy_through_the_dynamic_generator_matches_transformers(arch, attn_backend, tiny_model_factory,
                                                                         monkeypatch, tmp_path):
    import shutil

    from tests.test_arch_exl2 import NEW_TOKENS, PROMPT, dynamic_greedy
    from tests.test_arch_exl2 import load as load_with_tokenizer

    model_dir, hf = tiny_model_factory(arch)
    shutil.copytree(model_dir, tmp_path / "m")
    write_tokenizer(tmp_path / "m")
    monkeypatch.setenv("EXLLAMA_ATTN_BACKEND", attn_backend)
    model, tokenizer = load_with_tokenizer(tmp_path / "m")
    want = hf.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
                       attention_mask=torch.ones_like(PROMPT))[0, PROMPT.shape[1]:].tolist()
    assert dynamic_greedy(model, tokenizer) == want


@pytest.mark.parametrize("cache_class,bound,max_flips", [("ExLlamaV2Cache_Q8", 0.03, MAX_FLIPS),
                                                          ("ExLlamaV2Cache_Q4", 0.35, 0.4)])
def test_quantized_cache_tracks_the_fp16_cache(arch, cache_class, bound, max_flips, tiny_model_factory):
    """test_arch_exl2's bounds (relative RMS of the logits' difference) on the tokens routed as with the FP16
    cache; Q4's larger perturbation reroutes more tokens (measured: at most 4 of 24)."""
    import exllamav2

    model = load(tiny_model_factory(arch)[0])
    ids = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(12))

    def run(cache):
        def steps(m):
            parts = [m.forward(ids[:, :12], cache)]
            return torch.cat(parts + [m.forward(ids[:, i : i + 1], cache) for i in range(12, 24)], dim=1)
        return routed_logits(model, steps)

    ref, ref_routes = run(ExLlamaV2Cache(model, max_seq_len=64))
    got, got_routes = run(getattr(exllamav2, cache_class)(model, max_seq_len=64))
    moved = flipped(ref_routes, got_routes, ids.shape)
    assert moved.float().mean() <= max_flips
    rel_rms = ((got - ref)[~moved].pow(2).mean().sqrt() / ref.std()).item()
    assert rel_rms < bound


@pytest.mark.parametrize("paged", [False, True])
def test_extension_matches_pytorch_path(arch, paged, real_kernels, tiny_model_factory, monkeypatch):  # noqa: F811
    """The MoE models through the real kernels (emulated CUDA on the CPU, or a GPU) against the PyTorch twins,
    both in float16: within 1% on the tokens routed alike, few rerouted; top-1 against transformers >= 90%."""
    from exllamav2 import ext

    load_kernels, _ = real_kernels
    monkeypatch.setenv("EXLLAMA_ATTN_BACKEND", "matmul")
    model_dir, hf = tiny_model_factory(arch)
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(6))
    with_kernels, routes_k = routed_logits(load_kernels(model_dir), lambda m: model_logits(m, ids, paged, 6))
    monkeypatch.setattr(ext, "kernels_for", lambda device: None)
    without, routes = routed_logits(load_kernels(model_dir), lambda m: model_logits(m, ids, paged, 6))
    moved = flipped(routes, routes_k, ids.shape)
    assert moved.float().mean() <= MAX_FLIPS
    assert (with_kernels - without)[~moved].abs().max().item() < 1e-2 * without.abs().max().item()
    with torch.no_grad():
        assert (with_kernels.argmax(-1) == hf(ids).logits.argmax(-1)).float().mean().item() >= 0.9


def test_speculative_decoding_with_a_dense_draft(tiny_model_factory, tmp_path):
    """An MoE main model drafted by a dense model (the tiny Llama, same vocabulary): greedy output equals the
    generator's without drafting (the main model verifies several tokens per pass through the grouped path)."""
    import shutil

    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler
    from exllamav2.tokenizer import ExLlamaV2Tokenizer

    dirs = []
    for arch in ("mixtral", "llama"):
        shutil.copytree(tiny_model_factory(arch)[0], tmp_path / arch)
        write_tokenizer(tmp_path / arch)
        dirs.append(tmp_path / arch)
    main, draft = load(dirs[0]), load(dirs[1])
    tok = ExLlamaV2Tokenizer(main.config)
    ids = prompt(12, seed=9)

    def run(**kw) -> list[int]:
        gen = ExLlamaV2DynamicGenerator(main, ExLlamaV2Cache(main, max_seq_len=256), tok, **kw)
        gen.enqueue(ExLlamaV2DynamicJob(ids, 24, gen_settings=ExLlamaV2Sampler.Settings.greedy(), stop_conditions=[]))
        out = []
        while gen.num_remaining_jobs():
            for r in gen.iterate():
                if r["stage"] == "streaming":
                    out += r["token_ids"][0].tolist()
        return out

    plain = run()
    drafted = run(draft_model=draft, draft_cache=ExLlamaV2Cache(draft, max_seq_len=256), num_draft_tokens=4)
    assert len(plain) == 24 and drafted == plain


def _gptq(w: torch.Tensor, group: int = 32) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """4-bit GPTQ tensors of weight `w` [out, in] (symmetric per group and column: zero 7, so w = (q - 8) * scale),
    and the weight they dequantize to, in fp16 arithmetic as the loader does."""
    from exllamav2.quant.exl2 import pack_codes

    wt = w.T.float()                                                   # [K, N]
    k, n = wt.shape
    scales = (wt.view(k // group, group, n).abs().amax(1) / 7).clamp_min(1e-4).half()      # [G, N]
    per_row = scales.float().repeat_interleave(group, 0)
    q = (wt / per_row).round().clamp(-8, 7).to(torch.int64) + 8
    zeros = torch.full((n, k // group), 7, dtype=torch.int64)
    tensors = {"qweight": pack_codes(q, 4), "qzeros": pack_codes(zeros, 4).T.contiguous(), "scales": scales}
    dq = ((q - 8).half() * scales.repeat_interleave(group, 0)).T      # fp16(q - (z + 1)) * scale, in fp16
    return tensors, dq


def test_gptq_experts_load(tiny_model_factory, tmp_path):
    """A GPTQ MoE checkpoint (every expert 4-bit GPTQ, router FP16) loads, experts through the GPTQ path, and
    matches transformers running the dequantized weights."""
    import shutil

    import transformers
    from safetensors.torch import load_file, save_file

    model_dir, _ = tiny_model_factory("mixtral")
    tensors = load_file(str(next(Path(model_dir).glob("*.safetensors"))))
    out = {}
    for name, t in tensors.items():
        if ".experts." in name and name.endswith(".weight"):
            q, dq = _gptq(t)
            out.update({name.removesuffix("weight") + s: v for s, v in q.items()})
            tensors[name] = dq
        else:
            out[name] = t
    for name, layout in (("gptq", out), ("dequantized", tensors)):
        shutil.copytree(model_dir, tmp_path / name, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file(layout, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized", dtype=torch.float32,
                                                           attn_implementation="eager")
    model = load(tmp_path / "gptq")
    assert all(lin.is_quant() for m in moe_modules(model) for e in m.experts for lin in e.linears())
    ids = prompt(seed=13)
    with torch.no_grad():
        assert_matches(model.forward(ids), hf(ids).logits)


@pytest.mark.parametrize("paged", [False, True])
def test_exl2_experts_through_the_kernels(paged, real_kernels, converted, monkeypatch):  # noqa: F811
    """The 4.0 bpw Mixtral's experts through the extension's quantized matmul, one QMatrix per expert projection
    (emulated CUDA on the CPU, or a GPU), against the PyTorch twins in float16: within 2% on the tokens routed
    alike (the bound test_kernel_dispatch.py holds the EXL2 demo model to), few rerouted."""
    from exllamav2 import ext

    load_kernels, kernels = real_kernels
    monkeypatch.setenv("EXLLAMA_ATTN_BACKEND", "matmul")
    exl2_dir = converted("mixtral")[1][4.0]
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(6))
    model = load_kernels(exl2_dir)
    with_kernels, routes_k = routed_logits(model, lambda m: model_logits(m, ids, paged, 6))
    experts = sum(len(m.experts) for m in moe_modules(model))
    assert kernels.calls["QMatrix"] >= 3 * experts - 3 * 2     # every expert a token reached (expert 3 may not be)
    monkeypatch.setattr(ext, "kernels_for", lambda device: None)
    without, routes = routed_logits(load_kernels(exl2_dir), lambda m: model_logits(m, ids, paged, 6))
    moved = flipped(routes, routes_k, ids.shape)
    assert moved.float().mean() <= MAX_FLIPS
    assert (with_kernels - without)[~moved].abs().max().item() < 2e-2 * without.abs().max().item()


@pytest.mark.parametrize("moe_arch", ["mixtral", "qwen2_moe", "llama4"])
def test_base_and_streaming_generators(moe_arch, tiny_model_factory, tmp_path):
    """The other two generators on an MoE model: greedy equals transformers' generate (base: a left-padded batch of
    two equals each prompt alone; streaming: 20 tokens)."""
    import shutil

    from exllamav2.generator import ExLlamaV2BaseGenerator, ExLlamaV2Sampler, ExLlamaV2StreamingGenerator
    from exllamav2.tokenizer import ExLlamaV2Tokenizer
    from tests.test_generators import hf_greedy

    model_dir, hf = tiny_model_factory(moe_arch)
    shutil.copytree(model_dir, tmp_path / "m")
    write_tokenizer(tmp_path / "m")
    model = load(tmp_path / "m")
    tok = ExLlamaV2Tokenizer(model.config)
    greedy = ExLlamaV2Sampler.Settings.greedy
    prompts = ["Return the value", "Split the string at each separator and"]
    base = ExLlamaV2BaseGenerator(model, ExLlamaV2Cache(model, batch_size=2, max_seq_len=256), tok)
    batch = base.generate_simple(prompts, greedy(), 12, add_bos=True, completion_only=True, stop_token=None)
    single = [base.generate_simple(p, greedy(), 12, add_bos=True, completion_only=True, stop_token=None)
              for p in prompts]
    assert batch == single
    ids = tok.encode(prompts[1], add_bos=True)
    want = hf_greedy(hf, ids, 20)
    stream = ExLlamaV2StreamingGenerator(model, ExLlamaV2Cache(model, max_seq_len=256), tok)
    stream.set_stop_conditions([])
    stream.begin_stream_ex(ids, greedy())
    got: list[int] = []
    while len(got) < 20:
        got += stream.stream_ex()["chunk_token_ids"][0].tolist()
    assert got[:20] == want


def test_decoder_sparse_step(tmp_path):
    """Qwen2-MoE with decoder_sparse_step 2: layers 1 and 3 sparse, 0 and 2 dense (intermediate_size), as
    transformers builds them; logits match."""
    spec = ("Qwen2MoeConfig", {**MOE_SPECS["qwen2_moe"][1], "decoder_sparse_step": 2, "num_hidden_layers": 4})
    model_dir, hf = build_tiny_model("qwen2_moe_step", tmp_path, spec=spec)
    model = load(model_dir)
    assert [isinstance(m, ExLlamaV2MoEMLP) for m in model.modules[2:-2:2]] == [False, True, False, True]
    ids = prompt(seed=21)
    with torch.no_grad():
        assert_matches(model.forward(ids), hf(ids).logits)
