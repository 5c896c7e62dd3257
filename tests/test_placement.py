"""Device placement for gpu_split, computed without a GPU (placement is bookkeeping, not CUDA calls)."""

from __future__ import annotations

import pytest
import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from exllamav2.model.attention import ExLlamaV2Attention
from exllamav2.cache.quant import ExLlamaV2Cache_8bit, ExLlamaV2Cache_Q4, ExLlamaV2Cache_Q6, ExLlamaV2Cache_Q8
from exllamav2.model.model import autosplit_budgets


def test_split_fills_gpus_in_order(tiny_model_factory):
    model_dir, _ = tiny_model_factory("llama")
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    model.devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    sizes = [m.weight_footprint() for m in model.modules[1:]]
    first = sum(sizes[:2])                      # room for exactly the first attention + MLP
    model._assign_devices([first, sum(sizes)], 0)
    devices = [m.device for m in model.modules[1:]]
    assert devices[:2] == [torch.device("cuda", 0)] * 2
    assert set(devices[2:]) == {torch.device("cuda", 1)}
    assert model.modules[0].device == torch.device("cpu")          # embedding stays in system memory


def test_split_too_small_names_module_and_fix(tiny_model_factory):
    model_dir, _ = tiny_model_factory("llama")
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    model.devices = [torch.device("cuda", 0)]
    with pytest.raises(RuntimeError, match=r"model does not fit.*model\.layers\.\d.*gpu_split"):
        model._assign_devices([1000], 0)


def test_autosplit_counts_cache_per_layer(tiny_model_factory):
    model_dir, _ = tiny_model_factory("llama")
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    model.devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    sizes = [m.weight_footprint() for m in model.modules[1:]]
    cache_per_layer = 10_000
    # room for three modules' weights and one layer's cache: the second attention layer's cache
    # does not fit, so that layer (and everything after it) moves to GPU 1
    model._assign_devices([sum(sizes[:3]) + cache_per_layer, 10**9], cache_per_layer)
    attn_devs = [m.device for m in model.modules if isinstance(m, ExLlamaV2Attention)]
    assert attn_devs == [torch.device("cuda", 0), torch.device("cuda", 1)]


def test_autosplit_reserve_per_gpu():
    mib = 1024**2
    free = [8000 * mib, 6000 * mib]
    assert autosplit_budgets(free, None) == [7904 * mib, 5904 * mib]
    assert autosplit_budgets(free, 500 * mib) == [7500 * mib, 5500 * mib]
    assert autosplit_budgets(free, [100 * mib, 200 * mib]) == [7900 * mib, 5800 * mib]
    # TabbyAPI passes its autosplit_reserve ([96] MB by default) as a one-entry list on multi-GPU machines
    assert autosplit_budgets(free, [96 * mib]) == [7904 * mib, 5904 * mib]
    assert autosplit_budgets(free, [96 * mib, 0, 5]) == [7904 * mib, 6000 * mib]
    assert autosplit_budgets([10], [96 * mib]) == [0]


def test_autosplit_on_two_gpus_with_one_reserve_entry(tiny_model_factory, monkeypatch):
    """load_autosplit_gen's GPU branch, with torch.cuda faked: a one-entry reserve list on two GPUs (TabbyAPI's
    default) used to raise IndexError before anything was placed."""
    model_dir, _ = tiny_model_factory("llama")
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    model.devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    cache = ExLlamaV2Cache(model, max_seq_len=64, lazy=True)
    placed = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: ([5000, 7000][i], 10**6))
    monkeypatch.setattr(model, "_place", lambda budgets, *reserves: placed.append(budgets))
    monkeypatch.setattr(cache, "create_state_tensors", lambda: None)
    monkeypatch.setattr(model, "_load_modules", lambda *args: iter(()))
    model.load_autosplit(cache, reserve_vram=[1000], last_id_only=True)
    assert placed == [[4000, 0]]        # cuda:1 keeps the default reserve (96 MiB, more than it has free)


def test_autosplit_keeps_working_memory_on_every_gpu_it_uses(tiny_model_factory):
    model_dir, _ = tiny_model_factory("llama")
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    model.devices = [torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cuda", 2)]
    sizes = [m.weight_footprint() for m in model.modules[1:]]
    reserve, head_reserve = 50_000, 7_000
    # cuda:0 could hold every weight, but after the reserve only the first attention + MLP
    budgets = [sum(sizes[:2]) + reserve + sizes[2] - 1, 10**9, 10**9]
    left = model._assign_devices(budgets, 0, reserve, head_reserve)
    devices = [m.device.index for m in model.modules[1:]]
    assert devices == [0, 0] + [1] * (len(sizes) - 2)
    assert left == [sizes[2] - 1, 10**9 - reserve - sum(sizes[2:]) - head_reserve, 10**9]   # cuda:2 unused
    # the head's reserve alone moves the head to the next GPU
    budgets = [sum(sizes) + reserve + head_reserve - 1, 10**9, 10**9]
    model._assign_devices(budgets, 0, reserve, head_reserve)
    assert [m.device.index for m in model.modules[1:]] == [0] * (len(sizes) - 1) + [1]


def test_autosplit_that_cannot_fit_the_reserve_says_so(tiny_model_factory):
    model_dir, _ = tiny_model_factory("llama")
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    model.devices = [torch.device("cuda", 0)]
    total = sum(m.weight_footprint() for m in model.modules[1:])
    with pytest.raises(RuntimeError, match=r"does not fit.*working memory.*max_input_len"):
        model._assign_devices([total + 10], 0, 100)


def test_forward_reserve_grows_with_chunk_logits_and_quantized_working_tensors(tiny_model_factory):
    model_dir, _ = tiny_model_factory("llama")
    config = ExLlamaV2Config(str(model_dir))
    model = ExLlamaV2(config)
    fp16 = ExLlamaV2Cache(model, batch_size=2, max_seq_len=64, lazy=True)
    q4 = ExLlamaV2Cache_Q4(model, batch_size=2, max_seq_len=64, lazy=True)
    device, head = model._forward_reserve(fp16, last_id_only=False)
    # logits for every token of a chunk, or one row per sequence
    assert model._forward_reserve(fp16, last_id_only=True) == (device, head * 2 // config.max_input_len)
    # a quantized cache decodes into full-precision K/V for the whole cache, once per device
    q_device, q_head = model._forward_reserve(q4, last_id_only=False)
    assert (q_device - device, q_head) == (2 * 2 * 64 * config.num_key_value_heads * config.head_dim * 4, head)
    # activations scale with the chunk
    config.max_input_len //= 2
    half_device, half_head = model._forward_reserve(fp16, last_id_only=False)
    assert (2 * half_device, 2 * half_head) == (device, head)


@pytest.mark.parametrize("cls", [ExLlamaV2Cache, ExLlamaV2Cache_8bit, ExLlamaV2Cache_Q4, ExLlamaV2Cache_Q6,
                                 ExLlamaV2Cache_Q8])
def test_cache_bytes_per_layer_are_known_before_allocation(cls, tiny_model_factory):
    """load_autosplit places a lazy cache by footprint_per_layer: it must be what allocation then takes."""
    model_dir, _ = tiny_model_factory("llama")
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    lazy = cls(model, batch_size=3, max_seq_len=40, lazy=True)
    assert lazy.footprint() == 0
    lazy.create_state_tensors()
    assert lazy.footprint() == lazy.footprint_per_layer() * model.config.num_hidden_layers > 0
    if cls is not ExLlamaV2Cache:     # a quantized cache is smaller than the fp16 one
        assert lazy.footprint_per_layer() < ExLlamaV2Cache(model, 3, 40, lazy=True).footprint_per_layer()


def test_load_autosplit_places_by_the_cache_it_is_given(tiny_model_factory, monkeypatch):
    model_dir, _ = tiny_model_factory("llama")
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    model.devices = [torch.device("cuda", 0)]
    cache = ExLlamaV2Cache_Q4(model, max_seq_len=64, lazy=True)
    placed = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (10**9, 10**9))
    monkeypatch.setattr(model, "_place", lambda budgets, *reserves: placed.append(reserves))
    monkeypatch.setattr(cache, "create_state_tensors", lambda: None)
    monkeypatch.setattr(model, "_load_modules", lambda *args: iter(()))
    model.load_autosplit(cache, last_id_only=True)
    assert placed == [(cache.footprint_per_layer(), *model._forward_reserve(cache, True))]


@pytest.mark.cuda
def test_fp16_on_gpu_matches_transformers(arch, tiny_model_factory):
    model_dir, hf = tiny_model_factory(arch)
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    cache = ExLlamaV2Cache(model, max_seq_len=64, lazy=True)
    model.load_autosplit(cache)
    ids = torch.randint(3, 250, (1, 24), generator=torch.Generator().manual_seed(7))
    parts = [model.forward(ids[:, :12], cache)]
    for i in range(12, 24):
        parts.append(model.forward(ids[:, i : i + 1], cache))
    ours = torch.cat(parts, 1)[..., :250].cpu()
    with torch.no_grad():
        ref = hf(ids).logits
    assert (ours - ref).abs().max() < 2e-2 * ref.abs().max()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.98


def test_footprint_of_an_fp16_checkpoint_is_its_tensor_bytes(tiny_model_factory):
    """Placement counts unquantized linears as fp16 on the GPU: for an fp16 checkpoint, exactly its bytes."""
    from safetensors import safe_open

    model_dir, _ = tiny_model_factory("qwen2")            # with biases
    model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
    linears = [s for m in model.modules for s in getattr(m, "submodules", lambda: [m])()
               if type(s).__name__ == "ExLlamaV2Linear"]
    (file,) = model_dir.glob("*.safetensors")
    with safe_open(str(file), "pt") as f:
        on_disk = sum(f.get_tensor(f"{lin.key}.{s}").nbytes for lin in linears for s in ("weight", "bias")
                      if f"{lin.key}.{s}" in f.keys())
    assert sum(lin.weight_footprint() for lin in linears) == on_disk


def test_only_the_gpus_the_model_uses_are_probed(tiny_model_factory, monkeypatch, caplog):
    """Construction plans for every visible GPU without probing any (a probe gives a GPU a CUDA context, hundreds of
    MB); placement then plans and probes only the GPUs gpu_split actually fills. torch.cuda is faked."""
    from exllamav2.model import model as model_module
    from exllamav2.attn import resolve
    from exllamav2.attn.devices import DeviceInfo

    gpus = [torch.device("cuda", 0), torch.device("cuda", 1)]
    monkeypatch.setattr(model_module, "_visible_devices", lambda: gpus)
    monkeypatch.setattr(resolve, "describe_devices",
                        lambda devices: [DeviceInfo.gpu(torch.device(d).index, (8, 6)) for d in devices])
    probed = []
    monkeypatch.setattr(resolve, "_probe_once", lambda plan, device_plan: probed.append(device_plan.device.label))
    model_dir, _ = tiny_model_factory("llama")
    with caplog.at_level("INFO", logger="exllamav2.attn.resolve"):
        model = ExLlamaV2(ExLlamaV2Config(str(model_dir)))
        assert probed == [] and [p.device.label for p in model.attn_plan.devices] == ["cuda:0", "cuda:1"]
        assert not caplog.records                          # the provisional plan is not announced
        model._place([10**9, 10**9])                       # everything fits on cuda:0
    assert probed == ["cuda:0"] and [p.device.label for p in model.attn_plan.devices] == ["cuda:0"]
    assert len(caplog.records) == 1
