"""Drop-in check: what upstream exllamav2 0.3.2 exports, and what real clients (TabbyAPI,
text-generation-webui, ExUI, formatron) import, call and read, works here from the same module paths.

Expected names and parameter lists are upstream's (shared/reference/upstream-api-and-exl2-format.md §1,
attention-backends-and-clients.md §5); results are checked against transformers on a tiny random Llama
where a number is involved. Tensor parallelism is NOT implemented: its names import (a client would otherwise
fail at import) and using them raises NotImplementedError naming the alternative. Vision runs for Qwen2-VL and
Qwen2.5-VL (tests/test_vision_qwen.py); on any other model the tower refuses by name.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import importlib.util
import inspect
import time

import pytest
import torch

import exllamav2
from exllamav2 import (ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Cache_8bit, ExLlamaV2Cache_Q4, ExLlamaV2Cache_Q6,
                       ExLlamaV2Cache_Q8, ExLlamaV2Cache_TP, ExLlamaV2Config, ExLlamaV2Lora,
                       ExLlamaV2MultimodalProjector, ExLlamaV2Tokenizer, ExLlamaV2VisionTower, Intervention,
                       SeqTensor, Timer)
from exllamav2.generator import (ExLlamaV2DynamicGeneratorAsync, ExLlamaV2DynamicJobAsync, ExLlamaV2Sampler,
                                 ExLlamaV2StreamingGenerator)
from tests.test_lora import make_adapter

VOCAB = 250

# 1. names, from the module paths clients use ----------------------------------------------------

EXPORTS = {
    "exllamav2": [
        "__version__", "ExLlamaV2", "ExLlamaV2CacheBase", "ExLlamaV2Cache", "ExLlamaV2Cache_Q4", "ExLlamaV2Cache_Q6",
        "ExLlamaV2Cache_Q8", "ExLlamaV2Cache_8bit", "ExLlamaV2Cache_TP", "ExLlamaV2Config", "ExLlamaV2Tokenizer",
        "ExLlamaV2Lora", "SeqTensor", "Timer", "Intervention", "ExLlamaV2MultimodalProjector", "ExLlamaV2VisionTower",
        "model_init",
    ],
    "exllamav2.generator": [
        "ExLlamaV2Sampler", "ExLlamaV2BaseGenerator", "ExLlamaV2StreamingGenerator", "ExLlamaV2DynamicGenerator",
        "ExLlamaV2DynamicJob", "ExLlamaV2DynamicGeneratorAsync", "ExLlamaV2DynamicJobAsync", "ExLlamaV2MMEmbedding",
        "ExLlamaV2PostSamplingHook", "ExLlamaV2PostSamplingResult",
    ],
    "exllamav2.generator.filters": ["ExLlamaV2Filter", "ExLlamaV2SelectFilter", "ExLlamaV2PrefixFilter"],
    "exllamav2.generator.base": ["ExLlamaV2Filter", "ExLlamaV2BaseGenerator"],
    "exllamav2.attn": [
        "ExLlamaV2Attention", "has_flash_attn", "has_flash_attn_with_paged", "has_flash_attn_with_window",
        "has_flash_attn_with_softcap", "has_xformers", "has_lower_right_sdpa", "assert_paged_attn",
    ],
    "exllamav2.architecture": ["RopeStyle"],
    "exllamav2.embedding": ["EMBEDDING_INDEX"],
    "exllamav2.ext": ["exllamav2_ext", "none_tensor"],
    "exllamav2.cache": [
        "ExLlamaV2CacheBase", "ExLlamaV2Cache", "ExLlamaV2Cache_8bit", "ExLlamaV2Cache_Q4", "ExLlamaV2Cache_Q6",
        "ExLlamaV2Cache_Q8", "ExLlamaV2Cache_TP",
    ],
    "exllamav2.config": ["ExLlamaV2Config"],
    "exllamav2.model": ["ExLlamaV2"],
    "exllamav2.tokenizer": ["ExLlamaV2Tokenizer"],
    "exllamav2.lora": ["ExLlamaV2Lora"],
    "exllamav2.module": ["Intervention"],
    "exllamav2.util": ["Timer", "SeqTensor"],
    "exllamav2.device": ["ExLlamaV2DeviceContext"],
    "exllamav2.version": ["__version__"],
}


@pytest.mark.parametrize("module,name", [(m, n) for m, names in EXPORTS.items() for n in names])
def test_name_imports_from_upstream_path(module, name):
    mod = importlib.import_module(module)
    exec(f"from {module} import {name}", {})     # the statement clients write, not just getattr
    assert getattr(mod, name) is not None or name == "exllamav2_ext"


def test_reexports_are_the_same_objects():
    from exllamav2.model.attention import ExLlamaV2Attention as layer_attn
    from exllamav2.generator import base, filters

    assert importlib.import_module("exllamav2.attn").ExLlamaV2Attention is layer_attn
    assert base.ExLlamaV2Filter is filters.ExLlamaV2Filter
    cache_mod = importlib.import_module("exllamav2.cache")
    for name in ("ExLlamaV2Cache_8bit", "ExLlamaV2Cache_Q4", "ExLlamaV2Cache_Q6", "ExLlamaV2Cache_Q8"):
        assert getattr(cache_mod, name) is getattr(exllamav2, name)
        assert issubclass(getattr(exllamav2, name), exllamav2.ExLlamaV2CacheBase)


def test_version_is_at_least_tabbys_minimum():
    def parse(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split("+")[0].split(".")[:3])

    assert parse(exllamav2.__version__) >= (0, 3, 1)
    try:
        installed = importlib.metadata.version("exllamav2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("exllamav2 is not installed in this environment (only importable from the tree)")
    assert parse(installed) >= (0, 3, 1)
    assert importlib.util.find_spec("exllamav2") is not None


def test_module_constants_and_flags():
    from exllamav2 import attn
    from exllamav2.architecture import RopeStyle
    from exllamav2.model.embedding import EMBEDDING_INDEX
    from exllamav2.ext import none_tensor

    assert EMBEDDING_INDEX == 1_000_000_000
    assert {"NONE", "GPTJ", "NEOX"} <= set(RopeStyle.__members__)
    assert none_tensor.device.type == "meta" and tuple(none_tensor.shape) == (1, 1)
    for flag in ("has_flash_attn", "has_flash_attn_with_paged", "has_xformers", "has_lower_right_sdpa"):
        assert isinstance(getattr(attn, flag), bool), flag
    # truthful: a backend cannot be reported available when its package is not installed
    if importlib.util.find_spec("flash_attn") is None:
        assert not attn.has_flash_attn and not attn.has_flash_attn_with_paged
    if importlib.util.find_spec("xformers") is None:
        assert not attn.has_xformers


# 2. parameter names, in upstream's order (positional callers depend on the order) ---------------

def _cls(path: str):
    module, _, rest = path.rpartition(":")
    obj = importlib.import_module(module)
    for part in rest.split("."):
        obj = getattr(obj, part)
    return obj


SIGNATURES = {
    "exllamav2:ExLlamaV2Config.__init__": ["model_dir"],
    "exllamav2:ExLlamaV2Config.prepare": ["no_tensors"],
    "exllamav2:ExLlamaV2Config.arch_compat_overrides": ["quiet", "warn_only"],
    "exllamav2:ExLlamaV2Config.set_low_mem": [],
    "exllamav2:ExLlamaV2.__init__": ["config", "lazy_load", "archparams"],
    "exllamav2:ExLlamaV2.load": ["gpu_split", "lazy", "stats", "callback", "callback_gen", "progress"],
    "exllamav2:ExLlamaV2.load_gen": ["gpu_split", "lazy", "stats", "callback", "callback_gen"],
    "exllamav2:ExLlamaV2.load_autosplit": ["cache", "reserve_vram", "last_id_only", "callback", "callback_gen",
                                           "progress"],
    "exllamav2:ExLlamaV2.load_autosplit_gen": ["cache", "reserve_vram", "last_id_only", "callback", "callback_gen"],
    "exllamav2:ExLlamaV2.load_tp": ["gpu_split", "callback", "callback_gen", "progress", "expect_cache_tokens",
                                    "expect_cache_base"],
    "exllamav2:ExLlamaV2.load_tp_gen": ["gpu_split", "callback", "callback_gen", "expect_cache_tokens",
                                        "expect_cache_base"],
    "exllamav2:ExLlamaV2.unload": [],
    "exllamav2:ExLlamaV2.get_cache_devices": [],
    "exllamav2:ExLlamaV2.set_device_map": ["allocation", "embed_cpu"],
    "exllamav2:ExLlamaV2.get_device_context": ["device_idx", "scratch"],
    "exllamav2:ExLlamaV2.is_quant": [],
    "exllamav2:ExLlamaV2.update_loras": [],
    "exllamav2:ExLlamaV2.forward": ["input_ids", "cache", "input_mask", "preprocess_only", "last_id_only", "loras",
                                    "return_last_state", "position_offsets", "abort_event", "cpu_logits", "**"],
    "exllamav2:ExLlamaV2Cache.__init__": ["model", "batch_size", "max_seq_len", "copy_from", "lazy",
                                          "num_key_value_heads", "fixed_device"],
    "exllamav2:ExLlamaV2Cache_TP.__init__": ["model", "base", "batch_size", "max_seq_len"],
    "exllamav2:ExLlamaV2CacheBase.get_kv_state": ["layer_idx", "batch_size", "offset", "width", "page_size",
                                                  "cache_seqlens", "block_table"],
    "exllamav2:ExLlamaV2CacheBase.store_kv_state": ["layer_idx", "batch_size", "offset", "width", "page_size",
                                                    "cache_seqlens", "block_table"],
    "exllamav2:ExLlamaV2CacheBase.copy_states": ["target", "from_column", "from_columns", "to_column", "to_columns",
                                                 "from_row", "from_rows", "to_row", "to_rows"],
    "exllamav2:ExLlamaV2CacheBase.reset": [],
    "exllamav2:ExLlamaV2CacheBase.clone": [],
    "exllamav2:ExLlamaV2CacheBase.footprint": [],
    "exllamav2:ExLlamaV2CacheBase.all_tensors": [],
    "exllamav2:ExLlamaV2CacheBase.roll_left": [],
    "exllamav2:ExLlamaV2Tokenizer.__init__": ["config", "lazy_init", "force_json", "force_spm"],
    "exllamav2:ExLlamaV2Tokenizer.encode": ["text", "add_bos", "add_eos", "encode_special_tokens", "return_offsets",
                                            "embeddings"],
    "exllamav2:ExLlamaV2Tokenizer.decode": ["ids", "decode_special_tokens"],
    "exllamav2:ExLlamaV2Tokenizer.get_id_to_piece_list": ["include_special_tokens"],
    "exllamav2:ExLlamaV2Lora.__init__": ["model", "lora_config_path", "lora_path", "lora_scaling"],
    "exllamav2:ExLlamaV2Lora.unload": [],
    "exllamav2:SeqTensor.__init__": ["shape", "dtype", "seq_dim", "device", "init_cap"],
    "exllamav2:Intervention.__init__": ["inner", "pre_forward", "post_forward"],
    "exllamav2:ExLlamaV2VisionTower.__init__": ["config"],
    "exllamav2:ExLlamaV2MultimodalProjector.__init__": ["config"],
    "exllamav2:ExLlamaV2VisionTower.load": ["gpu_split", "lazy", "stats", "callback", "callback_gen", "progress"],
    "exllamav2:ExLlamaV2VisionTower.load_gen": ["gpu_split", "lazy", "stats", "callback", "callback_gen"],
    "exllamav2:ExLlamaV2VisionTower.unload": [],
    "exllamav2:ExLlamaV2VisionTower.get_image_embeddings": ["model", "tokenizer", "image", "text_alias",
                                                            "embeddings_cpu"],
    "exllamav2.generator:ExLlamaV2Sampler.sample": ["logits", "settings", "sequence_ids", "random", "tokenizer",
                                                    "prefix_token", "return_top_tokens", "blocked_tokens", "filters",
                                                    "filter_prefer_eos", "sync"],
    "exllamav2.generator:ExLlamaV2Sampler.Settings.disallow_tokens": ["tokenizer", "tokens"],
    "exllamav2.generator:ExLlamaV2Sampler.Settings.allow_tokens": ["tokenizer", "tokens"],
    "exllamav2.generator:ExLlamaV2Sampler.Settings.clone": [],
    "exllamav2.generator:ExLlamaV2Sampler.Settings.greedy_clone": [],
    "exllamav2.generator:ExLlamaV2BaseGenerator.__init__": ["model", "cache", "tokenizer"],
    "exllamav2.generator:ExLlamaV2BaseGenerator.generate_simple": [
        "prompt", "gen_settings", "num_tokens", "seed", "token_healing", "encode_special_tokens",
        "decode_special_tokens", "loras", "stop_token", "add_bos", "abort_event", "input_embeddings",
        "completion_only", "filters", "filter_prefer_eos"],
    "exllamav2.generator:ExLlamaV2StreamingGenerator.__init__": ["model", "cache", "tokenizer", "draft_model",
                                                                 "draft_cache", "num_speculative_tokens"],
    "exllamav2.generator:ExLlamaV2StreamingGenerator.begin_stream": ["input_ids", "gen_settings", "token_healing",
                                                                     "loras"],
    "exllamav2.generator:ExLlamaV2StreamingGenerator.begin_stream_ex": [
        "input_ids", "gen_settings", "token_healing", "loras", "input_mask", "position_offsets",
        "return_probabilities", "return_top_tokens", "return_logits", "abort_event", "input_embeddings",
        "decode_special_tokens", "banned_strings", "filters", "filter_prefer_eos"],
    "exllamav2.generator:ExLlamaV2StreamingGenerator.stream_ex": ["ban_tokens"],
    "exllamav2.generator:ExLlamaV2StreamingGenerator.stream": [],
    "exllamav2.generator:ExLlamaV2StreamingGenerator.set_stop_conditions": ["stop_conditions"],
    "exllamav2.generator:ExLlamaV2StreamingGenerator.reset_sd_stats": [],
    "exllamav2.generator:ExLlamaV2StreamingGenerator.get_sd_stats": [],
    "exllamav2.generator:ExLlamaV2DynamicGenerator.__init__": [
        "model", "cache", "tokenizer", "max_batch_size", "max_seq_len", "max_chunk_size", "max_q_size",
        "draft_model", "draft_cache", "num_draft_tokens", "use_ngram_draft", "max_ngram", "max_sampling_threads",
        "min_sampling_threads", "paged", "filter_background_eval"],
    "exllamav2.generator:ExLlamaV2DynamicGenerator.generate": [
        "prompt", "max_new_tokens", "min_new_tokens", "seed", "gen_settings", "token_healing",
        "encode_special_tokens", "decode_special_tokens", "stop_conditions", "add_bos", "abort_event",
        "completion_only", "filters", "filter_prefer_eos", "return_last_results", "embeddings", "banned_strings"],
    "exllamav2.generator:ExLlamaV2DynamicGenerator.enqueue": ["job"],
    "exllamav2.generator:ExLlamaV2DynamicGenerator.cancel": ["job"],
    "exllamav2.generator:ExLlamaV2DynamicGenerator.iterate": [],
    "exllamav2.generator:ExLlamaV2DynamicGenerator.num_remaining_jobs": [],
    "exllamav2.generator:ExLlamaV2DynamicGenerator.clear_queue": [],
    "exllamav2.generator:ExLlamaV2DynamicGenerator.warmup": [],
    "exllamav2.generator:ExLlamaV2DynamicGenerator.set_loras": ["loras"],
    "exllamav2.generator:ExLlamaV2DynamicGenerator.reset_page_table": [],
    "exllamav2.generator:ExLlamaV2DynamicJob.__init__": [
        "input_ids", "max_new_tokens", "min_new_tokens", "max_skips", "gen_settings", "seed", "stop_conditions",
        "decode_special_tokens", "return_top_tokens", "return_logits", "return_probs", "filters",
        "filter_prefer_eos", "token_healing", "identifier", "banned_strings", "embeddings"],
    "exllamav2.generator:ExLlamaV2DynamicGeneratorAsync.__init__": ["*", "**"],
    "exllamav2.generator:ExLlamaV2DynamicJobAsync.__init__": ["generator", "*", "**"],
    "exllamav2.generator.filters:ExLlamaV2Filter.__init__": ["model", "tokenizer"],
    "exllamav2.generator.filters:ExLlamaV2Filter.clone": ["c"],
    "exllamav2.generator.filters:ExLlamaV2Filter.begin": ["prefix_str"],
    "exllamav2.generator.filters:ExLlamaV2Filter.feed": ["token"],
    "exllamav2.generator.filters:ExLlamaV2Filter.next": [],
    "exllamav2.generator.filters:ExLlamaV2Filter.reset": [],
    "exllamav2.generator.filters:ExLlamaV2Filter.use_background_worker": [],
    "exllamav2.generator.filters:ExLlamaV2Filter.can_mask_logits": [],
    "exllamav2.generator.filters:ExLlamaV2Filter.prepare_logit_mask": [],
    "exllamav2.generator.filters:ExLlamaV2Filter.mask_logits": ["logits"],
    "exllamav2.generator.filters:ExLlamaV2SelectFilter.__init__": ["model", "tokenizer", "options",
                                                                   "case_insensitive"],
    "exllamav2.generator.filters:ExLlamaV2PrefixFilter.__init__": ["model", "tokenizer", "prefix_strings"],
    "exllamav2.model_init:add_args": ["parser"],
    "exllamav2.model_init:print_options": ["args"],
    "exllamav2.model_init:check_args": ["args"],
    "exllamav2.model_init:init": ["args", "quiet", "allow_auto_split", "skip_load", "benchmark", "max_batch_size",
                                  "max_input_len", "max_output_len", "progress"],
    "exllamav2.model_init:post_init_load": ["model", "args", "quiet", "allow_auto_split", "benchmark", "progress"],
}

_KIND = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}


@pytest.mark.parametrize("path", sorted(SIGNATURES))
def test_parameters_match_upstream(path):
    params = [p for p in inspect.signature(_cls(path)).parameters.values() if p.name != "self"]
    names = [_KIND.get(p.kind, p.name) for p in params]
    want = SIGNATURES[path]
    # upstream's parameters come first and in upstream's order; anything after them is an addition
    assert names[: len(want)] == want, f"{path}: {names}"
    extra = [p for p in params[len(want):] if p.kind not in _KIND]
    assert all(p.default is not inspect.Parameter.empty for p in extra), f"{path}: new required parameters {extra}"


def test_lora_from_directory_takes_model_path_scaling_positionally():
    params = list(inspect.signature(ExLlamaV2Lora.from_directory).parameters)
    assert params[0] == "model" and params[2] == "lora_scaling" and len(params) == 3


def test_sampler_settings_fields_clients_set():
    s = ExLlamaV2Sampler.Settings()
    # TabbyAPI and text-generation-webui assign every one of these
    for name in ("temperature", "temperature_last", "smoothing_factor", "top_k", "top_p", "top_a", "min_p", "tfs",
                 "typical", "mirostat", "mirostat_tau", "mirostat_eta", "skew", "xtc_probability", "xtc_threshold",
                 "max_temp", "min_temp", "temp_exponent", "token_repetition_penalty", "token_repetition_range",
                 "token_repetition_decay", "token_frequency_penalty", "token_presence_penalty", "dry_multiplier",
                 "dry_allowed_length", "dry_base", "dry_range", "dry_sequence_breakers", "cfg_scale", "token_bias"):
        assert hasattr(s, name), name
    g = ExLlamaV2Sampler.Settings.greedy()
    assert (g.temperature, g.token_repetition_penalty, g.top_p, g.top_k) == (1.0, 1.0, 0.0, 1)


def test_filter_hooks_formatron_uses():
    from exllamav2.generator.base import ExLlamaV2Filter

    assert ExLlamaV2Filter.allow_return_type_list is True      # formatron returns lists when this exists
    f = ExLlamaV2Filter(None, None)
    assert f.sequence_str == "" and f.use_background_worker() is False and f.can_mask_logits() is False
    c = f.clone()
    assert type(c) is ExLlamaV2Filter and c is not f


def test_model_init_flags():
    from exllamav2 import model_init

    parser = argparse.ArgumentParser()
    model_init.add_args(parser)
    args = parser.parse_args(
        "-m d -gs auto -tp -l 4096 -rs 2 -ra 1.5 -ry 4 -nfa -nxf -nsdpa -ng -lm -ept 2 -lq4 -fst -ic -chunk 512".split()
    )
    assert (args.model_dir, args.gpu_split, args.length, args.chunk_size) == ("d", "auto", 4096, 512)
    assert args.tensor_parallel and args.no_flash_attn and args.no_xformers and args.no_sdpa and args.no_graphs
    assert args.low_mem and args.load_q4 and args.ignore_compatibility and args.experts_per_token == 2


# 3. small upstream helpers ---------------------------------------------------------------------

def test_timer_measures_the_block():
    with Timer() as t:
        time.sleep(0.05)
    assert 0.045 <= t.interval < 1.0
    assert t.end_time - t.start_time == pytest.approx(t.interval)


def test_seq_tensor_grows_in_pages_and_keeps_data():
    ref = torch.arange(2 * 600 * 3, dtype=torch.float32).view(2, 600, 3)
    s = SeqTensor((2, 0, 3), torch.float32, seq_dim=-2)
    assert s.seq_dim == 1 and len(s) == 0 and not s and s.seq_cap == SeqTensor.PAGE_SIZE
    s.append(ref[:, :100])
    s.append(SeqTensor.from_tensor(ref[:, 100:300], 1))          # crosses a page boundary
    s.append(ref[:, 300:])
    assert len(s) == 600 and s.seq_cap % SeqTensor.PAGE_SIZE == 0 and s.seq_cap >= 600
    assert torch.equal(s.torch(), ref)
    assert torch.equal(s.torch_slice(10, 20), ref[:, 10:20])
    assert torch.equal(s.torch_slice(None, 5), ref[:, :5]) and torch.equal(s.torch_slice(590, None), ref[:, 590:])
    assert torch.equal(s.slice(3, 7).torch(), ref[:, 3:7])
    c = s.clone(drop=4)
    assert torch.equal(c.torch(), ref[:, :596])
    c.tensor.zero_()
    assert torch.equal(s.torch(), ref)                             # a clone owns its storage
    s.truncate(50)
    assert torch.equal(s.torch(), ref[:, :50])
    with pytest.raises(ValueError):
        s.truncate(51)
    s.set(ref[:, :2])
    assert torch.equal(s.torch(), ref[:, :2])
    s.clear()
    assert len(s) == 0


# 4. tiny model with a tokenizer, loaded the way clients load it -------------------------------

@pytest.fixture(scope="module")
def loaded(tiny):
    model = ExLlamaV2(ExLlamaV2Config(str(tiny[0])))
    model.load()
    return model


def test_assert_paged_attn_agrees_with_the_attention_plan(loaded):
    """Upstream's guard asserted flash-attn 2.5.7+ before paged generation. Here every backend pages
    (README: attention plan), so it passes without flash-attn, and the plan backs that: every cache
    device has a paged path and a paged dynamic generator can be built on it."""
    from exllamav2 import attn
    from exllamav2.generator import ExLlamaV2DynamicGenerator

    assert attn.assert_paged_attn() is None
    plans = [loaded.attn_plan.device_plan(d) for d in loaded.get_cache_devices()]
    assert plans and all(p.paged and p.paged_impl in ("block_table", "gather", "kernel") for p in plans)
    gen = ExLlamaV2DynamicGenerator(loaded, ExLlamaV2Cache(loaded, max_seq_len=512), ExLlamaV2Tokenizer(loaded.config))
    assert gen.paged and gen.page_size == 256 and gen.table.num_pages == 2


def test_arch_compat_overrides_leaves_a_softcap_sliding_window_config_as_it_was(tiny_model_factory):
    """Upstream switched backends off here for models with logit softcapping or sliding windows (Gemma 2);
    here the attention selector weighs those needs per device, so the config must stay as it was."""
    cfg = ExLlamaV2Config(str(tiny_model_factory("gemma2")[0]))
    assert cfg.attn_logit_softcapping and cfg.sliding_window
    before = dict(vars(cfg))
    for kw in ({}, {"quiet": True}, {"warn_only": True}):
        cfg.arch_compat_overrides(**kw)
        assert vars(cfg) == before, kw
    assert not (cfg.no_flash_attn or cfg.no_xformers or cfg.no_sdpa)


def test_dynamic_job_and_generator_use_only_each_others_public_methods():
    """generator/dynamic.py: the job and the generator reach each other (and anything else) only through
    public members; a private one is touched through `self` alone. The interface they use is documented
    in the module docstring and exists on both classes."""
    import ast

    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob
    from exllamav2.generator import dynamic

    tree = ast.parse(inspect.getsource(dynamic))
    private = [f"line {n.lineno}: {ast.unparse(n)}" for n in ast.walk(tree)
               if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
               and not (isinstance(n.value, ast.Name) and n.value.id == "self")]
    assert private == []
    job_side = ("prepare_for_queue", "pages_needed", "activate", "is_prefill_done", "prefill_chunk", "verify",
                "deallocate_pages")
    generator_side = ("caches", "write_prompt_tokens", "record_written")
    for cls, names in ((ExLlamaV2DynamicJob, job_side), (ExLlamaV2DynamicGenerator, generator_side)):
        for name in names:
            assert callable(getattr(cls, name)) and getattr(cls, name).__doc__, name
            assert f"`{name}`" in dynamic.__doc__, name


def test_forward_refuses_unknown_keywords_and_takes_upstreams(loaded):
    from exllamav2.model.forward_args import FORWARD_KWARGS

    ids = torch.tensor([[1, 2, 3]])
    cache = ExLlamaV2Cache(loaded, max_seq_len=256)
    with pytest.raises(TypeError, match=r"keyword argument 'input_masks'; it takes input_ids, cache, input_mask, "
                                        r"preprocess_only.*cpu_logits, attn_params, indexed_embeddings"):
        loaded.forward(ids, cache, input_masks=None)        # a misspelt input_mask upstream ignored silently
    with pytest.raises(TypeError, match=r"arguments 'bogus', 'past_len'"):
        loaded.forward(ids, cache, past_len=0, bogus=1)
    assert cache.current_seq_len == 0, "refused before any work"
    # upstream's forward passes these on to forward_chunk / the modules: each is still taken
    assert set(FORWARD_KWARGS) == {"attn_params", "indexed_embeddings", "extract_state_indices", "mrope_positions"}
    want = loaded.forward(ids)
    for name in FORWARD_KWARGS:
        assert torch.equal(loaded.forward(ids, **{name: None}), want), name


def test_config_defaults_and_client_spellings():
    cfg = ExLlamaV2Config()
    assert cfg.model_dir is None and cfg.vision_model_type is None
    assert (cfg.max_batch_size, cfg.max_input_len, cfg.max_attention_size, cfg.max_output_len) == (1, 2048, 2048**2, None)
    assert (cfg.scale_pos_emb, cfg.scale_alpha_value, cfg.load_in_q4, cfg.max_dq_size) == (1.0, 1.0, False, 512 * 1024**2)
    for flag in ("no_flash_attn", "no_xformers", "no_sdpa", "no_graphs"):
        assert isinstance(getattr(cfg, flag), bool)
    cfg.fasttensors = True                                   # deprecated upstream, still assignable (ExUI)
    cfg.no_flash_attention = True
    assert cfg.no_flash_attn is True
    cfg.no_flash_attn = False
    assert cfg.no_flash_attention is False
    cfg.max_attn_size = 512**2                               # ExUI's spelling
    assert cfg.max_attention_size == 512**2 and cfg.max_attn_size == 512**2


def test_set_low_mem():
    cfg = ExLlamaV2Config()
    cfg.set_low_mem()
    assert (cfg.max_input_len, cfg.max_attention_size, cfg.max_output_len) == (1024, 1024**2, 1024)
    cfg = ExLlamaV2Config()
    cfg.max_output_len = 16
    cfg.set_low_mem()
    assert cfg.max_output_len == 16                         # caps, never raises


def test_prepared_config_attributes_clients_read(tiny):
    hf_cfg = tiny[1].config
    cfg = ExLlamaV2Config()
    cfg.model_dir = str(tiny[0])                            # TabbyAPI / text-generation-webui order
    cfg.prepare()
    before = dict(vars(cfg))
    cfg.arch_compat_overrides()
    assert vars(cfg) == before                              # nothing to override: the selector decides
    for ours, theirs in (("hidden_size", "hidden_size"), ("intermediate_size", "intermediate_size"),
                         ("num_attention_heads", "num_attention_heads"), ("num_hidden_layers", "num_hidden_layers"),
                         ("num_key_value_heads", "num_key_value_heads"), ("vocab_size", "vocab_size"),
                         ("max_seq_len", "max_position_embeddings"), ("bos_token_id", "bos_token_id"),
                         ("eos_token_id", "eos_token_id"), ("pad_token_id", "pad_token_id")):
        assert getattr(cfg, ours) == getattr(hf_cfg, theirs), ours
    assert cfg.head_dim == hf_cfg.hidden_size // hf_cfg.num_attention_heads
    assert cfg.vision_model_type is None
    cfg.max_seq_len = 128                                   # set after prepare; the cache follows it
    cfg.num_experts_per_token = 2
    model = ExLlamaV2(cfg)
    model.load()
    assert ExLlamaV2Cache(model).max_seq_len == 128


def test_model_attributes(loaded):
    from exllamav2.attn import ExLlamaV2Attention

    m = loaded
    assert m.loaded and m.tp_context is None
    assert m.modules_dict["model.layers.0.self_attn"] is m.modules[1]
    assert m.modules_dict["model.layers.1.mlp.down_proj"] is m.modules[4].down_proj
    assert m.modules_dict["lm_head"] is m.modules[-1]
    assert m.modules[m.head_layer_idx] is m.modules[-1]
    assert isinstance(m.modules[m.last_kv_layer_idx], ExLlamaV2Attention)
    assert not any(isinstance(x, ExLlamaV2Attention) for x in m.modules[m.last_kv_layer_idx + 1:])
    n = m.config.num_hidden_layers
    assert m.cache_map == {i: str(m.modules[m.last_kv_layer_idx].device) for i in range(n)}
    assert m.get_cache_devices() == [m.modules[1].device]
    assert m.is_quant() is False


def test_load_progress_protocol(tiny):
    """TabbyAPI does `for module, modules in load_gen(split, callback_gen=...)`, creates its progress bar at
    module == 0 and finishes at module == modules; it passes [] as the split on one GPU."""
    def progress(module, modules):
        yield module, modules

    model = ExLlamaV2(ExLlamaV2Config(str(tiny[0])))
    seen = [value for value in model.load_gen([], callback_gen=progress)]
    n = len(model.modules)
    assert seen == [(i, n) for i in range(n + 1)]
    assert model.loaded
    model.unload()
    assert not model.loaded

    cache = ExLlamaV2Cache(model, max_seq_len=256, lazy=True, batch_size=1)
    seen = [v for v in model.load_autosplit_gen(cache, reserve_vram=[96 * 1024**2], last_id_only=True,
                                                callback_gen=progress)]
    assert seen[0] == (0, n) and seen[-1] == (n, n)
    assert all(t is not None for t in cache.key_states)       # the cache exists once the last report arrives


def test_lazy_load_places_without_loading(tiny):
    model = ExLlamaV2(ExLlamaV2Config(str(tiny[0])))
    model.load(lazy=True)
    assert all(m.device is not None for m in model.modules)
    assert model.modules[1].q_proj.weight is None and not model.loaded


def test_set_device_map(tiny):
    model = ExLlamaV2(ExLlamaV2Config(str(tiny[0])))
    left = model.set_device_map([1.0, 2.0])
    assert len(left) == 2 and all(0 <= a <= b for a, b in zip(left, [1.0, 2.0]))
    assert model.modules[0].device == torch.device("cpu")    # the embedding stays in system memory
    assert all(m.device is not None for m in model.modules)
    assert set(model.cache_map) == set(range(model.config.num_hidden_layers))
    if torch.cuda.is_available():       # what is no longer left is exactly what the layers need
        used = (3.0 - sum(left)) * 1024**3
        assert used == pytest.approx(sum(m.weight_footprint() for m in model.modules[1:]), abs=4)
    model.set_device_map([1.0], embed_cpu=False)
    assert model.modules[0].device == model.modules[1].device


def test_get_device_context_cpu(loaded):
    assert loaded.get_device_context(-1) is None
    with pytest.raises(ValueError, match="no CUDA device 99"):
        loaded.get_device_context(99)


@pytest.mark.cuda
def test_get_device_context_gpu(tiny):
    model = ExLlamaV2(ExLlamaV2Config(str(tiny[0])))
    model.load()
    ctx = model.get_device_context(0)
    tables = model.rope_tables(torch.device("cuda", 0))
    assert ctx.ready and torch.equal(ctx.cos, tables.cos) and torch.equal(ctx.sin, tables.sin)
    assert ctx.backend is model.attn_plan.backend_for(torch.device("cuda", 0))
    assert model.get_device_context(0) is ctx


def test_update_loras_follows_layer_devices(tiny, tmp_path):
    """An adapter made before its layers move (e.g. before load) must end up on their devices."""
    model = ExLlamaV2(ExLlamaV2Config(str(tiny[0])))
    make_adapter(tmp_path / "lora", tiny[1])
    lora = ExLlamaV2Lora.from_directory(model, str(tmp_path / "lora"), 1.0)
    assert lora in set(model.loras)
    target = model.modules[1].q_proj
    target.set_device(torch.device("meta"))                 # stands in for a GPU: a device the CPU is not
    model.update_loras()
    a, b = lora.weights[target.key]
    assert a.device.type == "meta" and b.device.type == "meta"
    other = model.modules[1].v_proj.key
    assert lora.weights[other][0].device.type == "cpu"
    lora.unload()
    assert lora not in set(model.loras)


def test_intervention_hooks_match_transformers_forward_hook(tiny, loaded):
    """Scaling the output of decoder layer 0 through an Intervention equals doing it with a forward hook
    on the same layer in transformers."""
    model, hf = loaded, tiny[1]
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    base = model.forward(ids)
    seen = {}

    def scale(h, *args, **kwargs):
        seen.update(kwargs)
        return h * 0.5

    mlp0 = model.modules[2]
    model.modules[2] = Intervention(mlp0, post_forward=scale)
    try:
        assert model.modules[2].layer_idx == 0 and model.modules[2].device == mlp0.device
        ours = model.forward(ids)
        model.modules[2] = Intervention(mlp0, pre_forward=lambda h, *a, **k: h, post_forward=lambda h, *a, **k: h)
        assert torch.equal(model.forward(ids), base)      # identity hooks change nothing
    finally:
        model.modules[2] = mlp0
    assert {"cache", "attn_params", "loras"} <= set(seen)

    def hf_scale(module, inputs, output):
        return (output[0] * 0.5, *output[1:]) if isinstance(output, tuple) else output * 0.5

    handle = hf.model.layers[0].register_forward_hook(hf_scale)
    try:
        with torch.no_grad():
            ref = hf(ids).logits
    finally:
        handle.remove()
    tol = 1e-2 * ref.abs().max().item()
    assert (ours[..., :VOCAB] - ref).abs().max().item() < tol
    assert (ours - base).abs().max().item() > tol            # the hook really changed the result


# 5. caches ------------------------------------------------------------------------------------

CACHE_TYPES = [ExLlamaV2Cache, ExLlamaV2Cache_8bit, ExLlamaV2Cache_Q4, ExLlamaV2Cache_Q6, ExLlamaV2Cache_Q8]


@pytest.mark.parametrize("cls", CACHE_TYPES, ids=lambda c: c.__name__)
def test_cache_constructor_keywords_and_clone(loaded, cls):
    model = loaded
    cache = cls(model, batch_size=1, max_seq_len=256, copy_from=None, lazy=False, num_key_value_heads=None,
                fixed_device=None)
    assert cls(model, 1, 256).max_seq_len == 256 and cls(model, lazy=True).key_states[0] is None
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(4))
    model.forward(ids, cache, preprocess_only=True)
    assert cache.current_seq_len == 10
    clone = cache.clone()
    copied = cls(model, max_seq_len=256, copy_from=cache)
    for other in (clone, copied):
        assert type(other) is cls and other.current_seq_len == 10
        assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr()
                   for a, b in zip(cache.all_tensors(), other.all_tensors()))
    # a clone continues exactly as the original would, and writing to it leaves the original alone
    nxt = torch.tensor([[7]])
    a = model.forward(nxt, cache)
    b = model.forward(nxt, clone)
    assert torch.equal(a, b)
    clone.key_states[0].zero_()
    assert cache.key_states[0].any()
    cache.current_seq_len = 3                               # clients rewind by assignment
    assert cache.current_seq_len == 3
    cache.reset()
    assert cache.current_seq_len == 0 and cache.footprint() > 0


@pytest.mark.parametrize("cls", CACHE_TYPES, ids=lambda c: c.__name__)
def test_roll_left_drops_the_oldest_position(loaded, cls):
    cache = cls(loaded, batch_size=2, max_seq_len=256)
    gen = torch.Generator().manual_seed(5)
    for t in cache.all_tensors():
        t.copy_(torch.randint(0, 200, t.shape, generator=gen).to(t.dtype))
    cache.current_seq_len = 9
    before = [t.clone() for t in cache.all_tensors()]
    cache.roll_left()
    assert cache.current_seq_len == 8
    for old, new in zip(before, cache.all_tensors()):
        assert torch.equal(new[:, :8], old[:, 1:9])
        assert torch.equal(new[:, 9:], old[:, 9:])           # beyond the held length nothing moves
    cache.current_seq_len = 0
    with pytest.raises(ValueError, match="empty cache"):
        cache.roll_left()


# 6. tokenizer ---------------------------------------------------------------------------------

def test_tokenizer_attributes_and_tabby_class_reset(tiny, monkeypatch):
    from tokenizers import Tokenizer

    cfg = ExLlamaV2Config(str(tiny[0]))
    # TabbyAPI clears these class attributes before creating each tokenizer
    for name in ("unspecial_piece_to_id", "unspecial_id_to_piece", "extended_id_to_piece", "extended_piece_to_id"):
        monkeypatch.setattr(ExLlamaV2Tokenizer, name, {}, raising=False)
    tok = ExLlamaV2Tokenizer(cfg)
    ref = Tokenizer.from_file(str(tiny[0] / "tokenizer.json"))
    assert (tok.bos_token_id, tok.eos_token_id) == (cfg.bos_token_id, cfg.eos_token_id)
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert tok.pad_token_id == cfg.pad_token_id == 0        # config.json's pad_token_id comes first, as upstream
    assert tok.unk_token_id == ref.token_to_id("<unk>")
    assert tok.newline_token == "\n" and tok.space_token == " "
    for name in ("extended_id_to_piece", "extended_piece_to_id", "unspecial_id_to_piece", "unspecial_piece_to_id",
                 "tokenizer_config_dict"):
        assert isinstance(getattr(tok, name), dict), name
    assert tok.actual_vocab_size == ref.get_vocab_size() and tok.get_vocab_size() == ref.get_vocab_size()
    # formatron reads the backend through tokenizer_model
    backend = tok.tokenizer_model
    assert backend is tok.tokenizer and backend.vocab_size() == ref.get_vocab_size()
    assert [backend.id_to_piece(i) for i in range(20)] == [ref.id_to_token(i) for i in range(20)]
    assert len(backend.vocab) == backend.vocab_size()

    text = "Open the file and read it"
    ids = tok.encode(text, add_bos=True, encode_special_tokens=True, embeddings=[])
    assert ids.shape[0] == 1 and ids[0, 0].item() == tok.bos_token_id
    assert ids[0, 1:].tolist() == ref.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids[0, 1:]) == ref.decode(ids[0, 1:].tolist())            # 1-D: a str (formatron)
    two_d = tok.decode(torch.tensor([ids[0, 1:].tolist()]), decode_special_tokens=True)
    assert isinstance(two_d, list) and two_d[0] == ref.decode(ids[0, 1:].tolist())  # 2-D: a list even for one


# 7. client flows ------------------------------------------------------------------------------

def test_text_generation_webui_flow(tiny):
    """modules/exllamav2.py: config by attribute, load(split), every cache type, get_logits and streaming."""
    model_dir, hf = tiny
    config = ExLlamaV2Config()
    config.model_dir = str(model_dir)
    config.prepare()
    config.max_seq_len = 256
    config.scale_pos_emb, config.scale_alpha_value = 1.0, 1.0
    config.no_flash_attn = config.no_xformers = config.no_sdpa = False
    config.num_experts_per_token = int(0)
    model = ExLlamaV2(config)
    model.load(None)
    tokenizer = ExLlamaV2Tokenizer(config)
    ids = tokenizer.encode("The function returns the value of the", add_bos=True, encode_special_tokens=True)
    with torch.no_grad():
        ref = hf(ids).logits[:, -1:]
    for cache_type in CACHE_TYPES:
        cache = cache_type(model, lazy=False)
        # get_logits()
        cache.current_seq_len = 0
        model.forward(ids[:, :-1], cache, input_mask=None, preprocess_only=True, loras=None)
        logits = model.forward(ids[:, -1:], cache, input_mask=None, loras=None).float().cpu()
        tol = (1e-2 if cache_type is ExLlamaV2Cache else 0.25) * ref.abs().max().item()
        assert (logits[..., :VOCAB] - ref).abs().max().item() < tol, cache_type.__name__
    generator = ExLlamaV2StreamingGenerator(model, cache, tokenizer)
    settings = ExLlamaV2Sampler.Settings()
    settings.disallow_tokens(tokenizer, [tokenizer.eos_token_id])
    generator.begin_stream(ids, settings, loras=None)
    chunk, eos, _ = generator.stream()
    assert isinstance(chunk, str) and eos is False
    generator.reset_sd_stats()
    assert len(generator.get_sd_stats()) == 5


def test_tabbyapi_flow(tiny):
    """backends/exllamav2/model.py: compatibility-mode config, autosplit with a lazy cache, the async
    dynamic generator with keyword arguments, and the result keys Tabby reads."""
    model_dir, _ = tiny
    config = ExLlamaV2Config()
    config.model_dir = str(model_dir.resolve())
    config.max_seq_len = 4096
    config.prepare()
    before = dict(vars(config))
    config.arch_compat_overrides()
    assert vars(config) == before
    assert not config.vision_model_type
    config.max_output_len = 16
    config.max_input_len, config.max_attention_size = 256, 256**2
    config.no_flash_attn = True                               # Tabby's compatibility mode
    model = ExLlamaV2(config)
    cache = ExLlamaV2Cache_Q4(model, max_seq_len=256, lazy=True, batch_size=1)
    for _ in model.load_autosplit_gen(cache, reserve_vram=[96 * 1024**2], last_id_only=True, callback_gen=None):
        pass
    model.forward(torch.zeros((1, config.max_input_len), dtype=torch.long), cache=cache, preprocess_only=True)
    tokenizer = ExLlamaV2Tokenizer(config)
    ids = torch.tensor([tokenizer.encode("Split the string at each", add_bos=True).flatten().tolist()])

    async def run():
        gen = ExLlamaV2DynamicGeneratorAsync(model=model, cache=cache, draft_model=None, draft_cache=None,
                                             tokenizer=tokenizer, max_batch_size=1, paged=False)
        assert gen.generator.max_batch_size == 1 and not gen.generator.current_loras
        gen.generator.set_loras([])
        settings = ExLlamaV2Sampler.Settings.greedy()
        job = ExLlamaV2DynamicJobAsync(
            gen, input_ids=ids, max_new_tokens=6, min_new_tokens=0, gen_settings=settings,
            stop_conditions=[tokenizer.eos_token_id], decode_special_tokens=True, filters=[], filter_prefer_eos=False,
            return_probs=True, return_top_tokens=3, return_logits=False, banned_strings=[], token_healing=False,
            identifier="req-1", embeddings=[])
        results = [r async for r in job]
        await gen.close()
        return job, results

    job, results = asyncio.run(run())
    assert not job.cancelled
    assert all(r["identifier"] == "req-1" and "stage" in r for r in results)
    streaming = [r for r in results if r["stage"] == "streaming"]
    assert streaming and all({"text", "token_ids", "eos"} <= set(r) for r in streaming)
    assert all({"top_k_tokens", "top_k_probs"} <= set(r) for r in streaming if r["token_ids"].numel())
    last = results[-1]
    assert last["eos"] and last["eos_reason"] in ("max_new_tokens", "stop_token", "stop_string")
    for key in ("prompt_tokens", "cached_tokens", "time_prefill", "new_tokens", "time_generate", "time_enqueued"):
        assert key in last, key
    assert last["prompt_tokens"] == ids.shape[-1] and last["new_tokens"] <= 6
    if last["eos_reason"] == "stop_token":
        assert "eos_triggering_token_str" in last


# 8. not implemented: names import, use raises and names the alternative -----------------------

def test_tensor_parallel_is_not_implemented(loaded):
    for call in (lambda: ExLlamaV2Cache_TP(loaded, base=ExLlamaV2Cache, max_seq_len=256, batch_size=1),
                 lambda: loaded.load_tp(None),
                 lambda: loaded.load_tp_gen(None, callback_gen=None, expect_cache_base=ExLlamaV2Cache,
                                            expect_cache_tokens=256)):
        with pytest.raises(NotImplementedError, match="tensor parallelism is not implemented") as e:
            call()
        assert "load_autosplit" in str(e.value) and "gpu_split" in str(e.value)
    assert issubclass(ExLlamaV2Cache_TP, exllamav2.ExLlamaV2CacheBase)


def test_model_init_tensor_parallel_flag_raises(loaded):
    from exllamav2 import model_init

    parser = argparse.ArgumentParser()
    model_init.add_args(parser)
    with pytest.raises(NotImplementedError, match="tensor parallelism"):
        model_init.post_init_load(loaded, parser.parse_args(["-m", "x", "-tp"]), quiet=True)


def test_vision_on_a_text_model_is_refused(tiny):
    """A text model has no vision tower: vision_model_type is None and the tower refuses it by name (the vision
    models themselves are tested in tests/test_vision_qwen.py)."""
    cfg = ExLlamaV2Config(str(tiny[0]))
    assert cfg.vision_model_type is None
    for cls in (ExLlamaV2VisionTower, ExLlamaV2MultimodalProjector):
        with pytest.raises(ValueError, match="LlamaForCausalLM has no vision tower"):
            cls(cfg)
