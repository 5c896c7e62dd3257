"""Device placement for gpu_split, computed without a GPU (placement is bookkeeping, not CUDA calls)."""

from __future__ import annotations

import pytest
import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from exllamav2.attn.layer import ExLlamaV2Attention
from exllamav2.model import autosplit_budgets


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
    monkeypatch.setattr(model, "_place", lambda budgets, per_layer: placed.append(budgets))
    monkeypatch.setattr(cache, "create_state_tensors", lambda: None)
    monkeypatch.setattr(model, "_load_modules", lambda *args: iter(()))
    model.load_autosplit(cache, reserve_vram=[1000], last_id_only=True)
    assert placed == [[4000, 0]]        # cuda:1 keeps the default reserve (96 MiB, more than it has free)


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
    from exllamav2 import model as model_module
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
