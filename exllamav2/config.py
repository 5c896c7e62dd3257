"""ExLlamaV2Config: reads a HuggingFace model directory into the sizes and switches the model needs.

Attention switches (no_flash_attn, no_xformers, no_sdpa) are only recorded here; the attention
selector (exllamav2/attn/) combines them with the environment when the model is built.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from .architecture import ArchParams, arch_params_for
from .config_check import validate_config, validate_generation_config
from .errors import ConfigError
from .stloader import SafetensorsIndex
from .vision_config import read_mrope_section, read_vision_config

log = logging.getLogger(__name__)

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope", "su")
ALLOW_UNKNOWN_ARCH_VAR = "EXLLAMA_ALLOW_UNKNOWN_ARCH"
CPU_DTYPE_VAR = "EXLLAMA_CPU_DTYPE"
CPU_DTYPES = ("auto", "float32", "bfloat16")


def _env_allows_unknown_arch() -> bool:
    value = os.environ.get(ALLOW_UNKNOWN_ARCH_VAR, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{ALLOW_UNKNOWN_ARCH_VAR}={value!r}: expected 1 or 0")


def _env_cpu_dtype() -> str:
    value = os.environ.get(CPU_DTYPE_VAR, "").strip().lower() or "auto"
    if value not in CPU_DTYPES:
        raise ConfigError(f"{CPU_DTYPE_VAR}={value!r}: expected one of {', '.join(CPU_DTYPES)}")
    return value


def _read_json(path: Path, required: bool = True) -> dict:
    if not path.exists():
        if required:
            raise FileNotFoundError(
                f"{path} not found: a model directory needs config.json (HuggingFace format)"
            )
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e


# config.json activation names -> the MLP's activation (exllamav2.model.mlp.ACTIVATION_FUNCTIONS)
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu_fast": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


class _Reader:
    """Reads a key from config.json, or from its text_config (multimodal checkpoints nest the text model)."""

    def __init__(self, raw: dict, path: Path) -> None:
        # DBRX nests its attention and MLP settings in attn_config and ffn_config
        self.sources = tuple(s for s in (raw, *(raw.get(k) for k in ("text_config", "attn_config", "ffn_config")))
                             if isinstance(s, dict))
        self.path = path
        self.defaults: dict = {}        # the architecture row's config_defaults, once the row is known

    def __call__(self, *names: str, default: Any = None, required: bool = False) -> Any:
        for name in names:
            for src in self.sources:
                if name in src and src[name] is not None:
                    return src[name]
        for name in names:      # the family's own default, only where config.json does not have the key at all
            if name in self.defaults and not any(name in src for src in self.sources):
                return self.defaults[name]
        if required:
            raise ConfigError(f"{self.path}: missing required key {names[0]!r}")
        return default


class ExLlamaV2Config:
    def __init__(self, model_dir: str | None = None, *, allow_unknown_arch: bool = False) -> None:
        self.model_dir = model_dir
        # Load an architecture missing from the table as Llama anyway (also EXLLAMA_ALLOW_UNKNOWN_ARCH=1).
        # Off by default: a model that merely resembles Llama gives fluent garbage when run as one.
        self.allow_unknown_arch = allow_unknown_arch
        # activations on the CPU (ours): 'bfloat16' where the CPU multiplies it natively (AVX512-BF16, AMX), else
        # 'float32'; 'auto' picks, EXLLAMA_CPU_DTYPE gives the default
        self.cpu_dtype = _env_cpu_dtype()
        self.max_batch_size = 1
        self.max_input_len = 2048
        self.max_attention_size = 2048**2
        self.max_output_len: int | None = None
        self.scale_pos_emb = 1.0
        self.scale_alpha_value = 1.0
        self.no_flash_attn = False
        self.no_xformers = False
        self.no_sdpa = False
        self.attn_backend: str | None = None   # 'auto' or a backend name: replaces EXLLAMA_ATTN_BACKEND (ours)
        self.no_graphs = False
        self.fasttensors = False          # accepted for compatibility; no effect (as upstream since 0.2.3)
        self.load_in_q4 = False
        self.max_dq_size = 512 * 1024**2
        self.num_experts_per_token: int | None = None
        self.arch: ArchParams | None = None
        self.tensor_files: list[str] = []
        self.tensor_file_map: dict[str, str] = {}
        self.index: SafetensorsIndex | None = None
        self.checkpoint_offset_qzeros = 0
        self.quantization_config: dict = {}
        self.vision_model_type: str | None = None   # set by prepare() for the vision families vlm/ runs
        self.mrope_section: list[int] | None = None  # Qwen2-VL's MRoPE: rotary frequencies per t/h/w component
        if model_dir is not None:
            self.prepare()

    # upstream and client spellings of the same switches
    @property
    def no_flash_attention(self) -> bool:
        return self.no_flash_attn

    @no_flash_attention.setter
    def no_flash_attention(self, value: bool) -> None:
        self.no_flash_attn = bool(value)

    @property
    def max_attn_size(self) -> int:
        return self.max_attention_size

    @max_attn_size.setter
    def max_attn_size(self, value: int) -> None:
        self.max_attention_size = value

    def set_low_mem(self) -> None:
        self.max_input_len = 1024
        self.max_attention_size = 1024**2
        self.max_output_len = 1024 if self.max_output_len is None else min(self.max_output_len, 1024)

    # reading -------------------------------------------------------------------------------

    def prepare(self, no_tensors: bool = False) -> None:
        if self.model_dir is None:
            raise ConfigError("ExLlamaV2Config.prepare(): set model_dir first")
        mdir = Path(self.model_dir)
        if not mdir.is_dir():
            raise FileNotFoundError(f"model directory {mdir} does not exist or is not a directory")
        cfg_path = mdir / "config.json"
        raw = _read_json(cfg_path)
        validate_config(raw, cfg_path)          # types and ranges, before any value is converted
        gen = _read_json(mdir / "generation_config.json", required=False)
        validate_generation_config(gen, mdir / "generation_config.json")
        read = _Reader(raw, cfg_path)

        self._read_architecture(raw, read, cfg_path)
        self._read_sizes(read, cfg_path)
        self._read_moe(read, cfg_path)
        self._read_scales(read)
        self._read_token_ids(read, gen)
        self.max_seq_len = int(read("max_position_embeddings", "max_sequence_length", "n_positions", "max_seq_len",
                                    default=2048))
        self.original_max_seq_len = self.max_seq_len
        self._read_sliding_window(read)
        self._read_rope(read, cfg_path)
        read_vision_config(self, raw, mdir)
        self._read_attention_kinds(read, cfg_path)

        self.quantization_config = raw.get("quantization_config") or {}
        if self.quantization_config.get("checkpoint_format") == "gptq_v2":
            self.checkpoint_offset_qzeros = 1

        if not no_tensors:
            self._index_tensors(mdir)

    def _read_architecture(self, raw: dict, read: "_Reader", cfg_path: Path) -> None:
        archs = raw.get("architectures")
        if not archs:
            raise ConfigError(
                f"{cfg_path}: no 'architectures' entry; add e.g. \"architectures\": [\"LlamaForCausalLM\"]"
            )
        if len(archs) != 1:
            raise ConfigError(f"{cfg_path}: expected exactly one architecture, found {archs}")
        self.architecture = archs[0]
        allow = self.allow_unknown_arch or _env_allows_unknown_arch()
        text_type = (raw.get("text_config") or {}).get("model_type")
        self.arch = arch_params_for(self.architecture, allow_unknown=allow, source=str(cfg_path),
                                    text_model_type=text_type)
        read.defaults = self.arch.config_defaults
        for switch in self.arch.refuse_if:
            if read(switch):
                raise ConfigError(f"{cfg_path}: {switch}: true is not supported for {self.architecture} (its extra "
                                  f"parts are not built, so the output would be wrong)")

    def _read_sizes(self, read: "_Reader", cfg_path: Path) -> None:
        self.hidden_size = int(read("hidden_size", "d_model", "n_embd", required=True))
        self.num_hidden_layers = int(read("num_hidden_layers", "n_layer", "n_layers", required=True))
        self.num_attention_heads = int(read("num_attention_heads", "n_head", "n_heads", required=True))
        if self.arch.kv_heads_key:
            self.num_key_value_heads = int(read(self.arch.kv_heads_key, default=self.num_attention_heads))
        else:                                                  # GPT-2: MHA; GPTBigCode: multi_query, one kv head
            self.num_key_value_heads = 1 if read("multi_query", default=False) else self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{cfg_path}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        self.num_key_value_groups = self.num_attention_heads // self.num_key_value_heads
        self.head_dim = int(read("head_dim", default=self.hidden_size // self.num_attention_heads))
        mult = self.arch.default_intermediate_mult      # GPT-2's n_inner: null means mult x hidden
        # the dense MLP's size (Llama 4: intermediate_size_mlp; its intermediate_size is the experts')
        self.intermediate_size = int(read("n_inner", default=mult * self.hidden_size) if mult else
                                     read("intermediate_size_mlp", "intermediate_size", "ffn_hidden_size",
                                          required=True))
        self.vocab_size = int(read("vocab_size", required=True))
        self.norm_eps = float(read("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon", "norm_eps",
                                   default=1e-5))
        self.tie_word_embeddings = bool(read("tie_word_embeddings", default=self.arch.default_tie_word_embeddings))
        self.torch_dtype = read("torch_dtype", "dtype", default="float16")
        act = read(self.arch.activation_key, default="silu")
        act = act.get("name") if isinstance(act, dict) else act       # DBRX: ffn_act_fn {"name": "silu"}
        if act not in ACTIVATIONS:
            raise ConfigError(f"{cfg_path}: {self.arch.activation_key} {act!r} is not supported "
                              f"(supported: {', '.join(ACTIVATIONS)})")
        self.activation = ACTIVATIONS[act]

    def _read_moe(self, read: "_Reader", cfg_path: Path) -> None:
        """Mixture-of-experts sizes, read for every model as upstream does (clients read num_experts and
        num_experts_per_token); checked and completed only where the row has an MoE layout (exllamav2/moe.py)."""
        self.num_experts = read("num_local_experts", "num_experts", "moe_num_experts", default=None)
        self.num_experts_per_token = read("num_experts_per_tok", "moe_top_k", default=None)
        self.default_experts_per_token = self.num_experts_per_token
        if self.arch.moe is None:
            return
        for name, value in (("num_local_experts/num_experts", self.num_experts),
                            ("num_experts_per_tok", self.num_experts_per_token)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{cfg_path}: {self.architecture} needs {name} as a positive integer, got {value!r}")
        if self.num_experts_per_token > self.num_experts:
            raise ConfigError(f"{cfg_path}: num_experts_per_tok {self.num_experts_per_token} exceeds the "
                              f"{self.num_experts} experts")
        self.moe_intermediate_size = int(read("moe_intermediate_size", "ffn_hidden_size", "intermediate_size",
                                              default=self.intermediate_size))
        self.shared_expert_intermediate_size = int(read("shared_expert_intermediate_size", "intermediate_size",
                                                        default=self.intermediate_size))
        spec_norm = self.arch.moe.renormalize
        self.moe_norm_topk_prob = bool(read("norm_topk_prob", default=False)) if spec_norm is None else spec_norm
        p = read("moe_normalize_expert_weights", default=None)      # DBRX: top-k weights over their p-norm
        if p is not None:
            if float(p) != 1.0:
                raise ConfigError(f"{cfg_path}: moe_normalize_expert_weights {p} is not supported (only 1, the sum)")
            self.moe_norm_topk_prob = True
        self._read_moe_layers(read, cfg_path)

    def _read_moe_layers(self, read: "_Reader", cfg_path: Path) -> None:
        """Which layers are sparse: Llama 4's moe_layers where given; else every decoder_sparse_step-th
        (Qwen-MoE; Llama 4's interleave_moe_layer_step) except Qwen-MoE's mlp_only_layers."""
        explicit = read("moe_layers", default=None)
        if explicit is not None:
            n = self.num_hidden_layers
            if not isinstance(explicit, list) or not all(isinstance(i, int) and 0 <= i < n for i in explicit):
                raise ConfigError(f"{cfg_path}: moe_layers must list layer indices from 0 to {n - 1}, got {explicit!r}")
            self.moe_layers = [i in explicit for i in range(n)]
            return
        step = int(read("decoder_sparse_step", "interleave_moe_layer_step", default=1))
        dense = set(read("mlp_only_layers", default=[]))
        if step < 1:
            raise ConfigError(f"{cfg_path}: decoder_sparse_step must be at least 1, got {step}")
        self.moe_layers = [i not in dense and (i + 1) % step == 0 for i in range(self.num_hidden_layers)]

    def _read_scales(self, read: "_Reader") -> None:
        """Softcaps and the multipliers some architectures apply (Granite's four, Gemma's embedding scale)."""
        self.attn_logit_softcapping = read("attn_logit_softcapping", default=None)
        self.final_logit_softcapping = read("final_logit_softcapping", default=None)
        self.query_pre_attn_scalar = read("query_pre_attn_scalar", default=None)
        self.attention_multiplier = read("attention_multiplier", default=None)
        clip = read("clip_qkv", default=None)              # OLMoE (DBRX: attn_config.clip_qkv)
        self.clip_qkv = None if clip is None else float(clip)
        # Granite's residual_multiplier; MiniCPM's scale_depth / sqrt(layers)
        depth = read("scale_depth", default=None)
        self.residual_multiplier = float(read("residual_multiplier", default=1.0)) * (
            1.0 if depth is None else float(depth) / self.num_hidden_layers**0.5)
        # Cohere multiplies the logits by logit_scale, Granite divides them by logits_scaling, MiniCPM by
        # hidden_size / dim_model_base
        base = read("dim_model_base", default=None)
        self.logit_scale = float(read("logit_scale", default=1.0)) / float(read("logits_scaling", default=1.0)) * (
            1.0 if base is None else float(base) / self.hidden_size)
        sqrt_hidden = self.hidden_size**0.5 if self.arch.embed_scale_sqrt_hidden else 1.0
        # Granite's embedding_multiplier, MiniCPM's scale_emb
        self.embed_scale = sqrt_hidden * float(read("embedding_multiplier", "scale_emb", default=1.0))

    def _read_token_ids(self, read: "_Reader", gen: dict) -> None:
        # None when the checkpoint does not say: the tokenizer then reads tokenizer_config.json
        self.bos_token_id = read("bos_token_id", default=gen.get("bos_token_id"))
        eos = read("eos_token_id", default=gen.get("eos_token_id"))
        gen_eos = gen.get("eos_token_id")
        self.eos_token_id_list = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if isinstance(gen_eos, list):
            self.eos_token_id_list += [e for e in gen_eos if e not in self.eos_token_id_list]
        self.eos_token_id = self.eos_token_id_list[0] if self.eos_token_id_list else None
        self.pad_token_id = read("pad_token_id", default=None)

    def _read_sliding_window(self, read) -> None:
        window = read("sliding_window", default=0) or 0
        if read("use_sliding_window", default=True) is False:
            window = 0
        self.sliding_window = int(window)
        layer_types = read("layer_types", default=None)
        if not self.sliding_window:
            self.swa_layers = [False] * self.num_hidden_layers
        elif layer_types:
            self.swa_layers = [t == "sliding_attention" for t in layer_types]
        elif self.arch.alternating_swa:
            self.swa_layers = [i % 2 == 0 for i in range(self.num_hidden_layers)]
        else:
            self.swa_layers = [True] * self.num_hidden_layers

    def _read_rope(self, read: "_Reader", cfg_path: Path) -> None:
        # transformers >= 5 writes rope_parameters (per layer type for Gemma 3); older checkpoints
        # rope_theta + rope_scaling (+ rope_local_base_freq)
        params = dict(read("rope_parameters", default=None) or {})
        local = None
        if "full_attention" in params or "sliding_attention" in params:
            local = params.get("sliding_attention")
            params = dict(params.get("full_attention") or {})
        scaling = read("rope_scaling", default=None)
        if scaling:
            params.update(scaling)
        self.rotary_embedding_base = float(params.get("rope_theta", read("rope_theta", default=10000.0)))
        # transformers 5 moved Phi's partial_rotary_factor into rope_parameters
        self.partial_rotary_factor = float(params.get("partial_rotary_factor") or
                                           read("partial_rotary_factor", default=1.0))
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        rope_type, self.mrope_section = read_mrope_section(params, rope_type, self.head_dim, cfg_path)
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"{cfg_path}: unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        self.rope_type = rope_type
        self.rope_scaling = params if rope_type != "default" else None
        if rope_type == "linear":
            self.scale_pos_emb = float(params["factor"])
        elif rope_type in ("llama3", "yarn"):
            self.original_max_seq_len = int(
                params.get("original_max_position_embeddings") or self.original_max_seq_len
            )
        elif rope_type in ("longrope", "su"):
            self._read_longrope(params, read, cfg_path)
        elif rope_type == "dynamic":
            # Dynamic NTK equals plain RoPE within the trained context; beyond it, set
            # scale_alpha_value (static NTK alpha) as upstream users do.
            log.info("rope type 'dynamic': using plain RoPE; set scale_alpha_value to extend the context")
        self._read_rope_layers(read, local, cfg_path)

    def _read_longrope(self, params: dict, read: "_Reader", cfg_path: Path) -> None:
        """Phi-3's LongRoPE: short factors up to original_max_position_embeddings, long ones beyond, and an
        attention factor from the ratio of the two context lengths (kept in rope_scaling)."""
        orig = params.get("original_max_position_embeddings") or read("original_max_position_embeddings")
        if orig is None:
            raise ConfigError(f"{cfg_path}: rope type {self.rope_type!r} needs original_max_position_embeddings")
        self.original_max_seq_len = int(orig)
        for name in ("short_factor", "long_factor"):
            if len(params.get(name) or ()) != self.rotary_dim // 2:
                raise ConfigError(f"{cfg_path}: rope_scaling {name} needs {self.rotary_dim // 2} values (one per "
                                  f"rotary frequency), got {len(params.get(name) or ())}")
        if params.get("attention_factor") is None:
            factor = params.get("factor") or self.max_seq_len / self.original_max_seq_len
            params["attention_factor"] = (1.0 if factor <= 1.0 else
                                          math.sqrt(1 + math.log(factor) / math.log(self.original_max_seq_len)))

    def _read_rope_layers(self, read: "_Reader", local: dict | None, cfg_path: Path) -> None:
        """Which layers rotate (SmolLM3's and Llama 4's no_rope_layers: 1 = RoPE) and the base of the
        sliding layers' unscaled RoPE where it differs (Gemma 3's local layers)."""
        if local is not None and (local.get("rope_type") or "default") != "default":
            raise ConfigError(f"{cfg_path}: rope type {local['rope_type']!r} for sliding layers is not supported")
        theta = local.get("rope_theta") if local is not None else read("rope_local_base_freq", default=None)
        self.rope_local_base = None if theta is None else float(theta)
        flags = read("no_rope_layers", default=None)
        if not flags:       # Llama 4 writes [] for "from no_rope_layer_interval": every n-th layer has no RoPE
            interval = int(read("no_rope_layer_interval", default=0) or 0)
            flags = [int(not interval or (i + 1) % interval != 0) for i in range(self.num_hidden_layers)]
        if len(flags) < self.num_hidden_layers:
            raise ConfigError(f"{cfg_path}: no_rope_layers has {len(flags)} entries for "
                              f"{self.num_hidden_layers} layers")
        self.rope_layers = [bool(f) for f in flags[: self.num_hidden_layers]]
        if self.arch.global_nope and self.sliding_window:       # hybrid models rotate only the sliding layers
            self.rope_layers = [r and swa for r, swa in zip(self.rope_layers, self.swa_layers)]

    def _read_attention_kinds(self, read: "_Reader", cfg_path: Path) -> None:
        """Llama 4's attention switches, per layer: chunked local attention (layer_types' chunked_attention, else
        the RoPE layers when attention_chunk_size is set: a query sees only the keys of its own chunk of
        attention_chunk_size positions), temperature tuning on the NoPE layers (queries scaled by
        1 + attn_scale * log(1 + floor((position + 1) / floor_scale))) and use_qk_norm (ArchParams.qk_l2_norm)."""
        chunk = int(read("attention_chunk_size", default=0) or 0)
        layer_types = read("layer_types", default=None)
        if layer_types:
            unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention", "chunked_attention"})
            if unknown or len(layer_types) < self.num_hidden_layers:
                raise ConfigError(f"{cfg_path}: layer_types needs one of full_attention, sliding_attention or "
                                  f"chunked_attention per layer ({self.num_hidden_layers}); got {layer_types!r}")
            chunked = [t == "chunked_attention" for t in layer_types[: self.num_hidden_layers]]
        else:
            chunked = [bool(chunk) and rope for rope in self.rope_layers]
        if any(chunked) and chunk < 1:
            raise ConfigError(f"{cfg_path}: layer_types has chunked_attention layers but attention_chunk_size is "
                              f"{chunk or 'not set'}; give the chunk size in tokens")
        self.chunked_layers = chunked
        self.attention_chunk_size = chunk if any(chunked) else 0
        self.attn_temperature = None     # (floor_scale, attn_scale) for the NoPE layers, or None
        if read("attn_temperature_tuning", default=False):
            floor, scale = float(read("floor_scale", default=8192)), float(read("attn_scale", default=0.1))
            if floor <= 0:
                raise ConfigError(f"{cfg_path}: floor_scale must be positive for attn_temperature_tuning, got {floor}")
            self.attn_temperature = (floor, scale)
        self.qk_l2_norm = bool(self.arch.qk_l2_norm and read("use_qk_norm", default=False))

    def _index_tensors(self, mdir: Path) -> None:
        files = sorted(glob.glob(str(mdir / "*.safetensors")))
        if not files:
            raise FileNotFoundError(
                f"no *.safetensors files in {mdir}: weights must be in safetensors format "
                f"(convert .bin/.pt checkpoints first; pickle files are never loaded)"
            )
        self.tensor_files = files
        self.index = SafetensorsIndex(files)
        self.tensor_file_map = {name: self.index.file_of(name) for name in self.index.keys()}
        self.arch = self.arch.with_keys_for(self.index.has)

    # compatibility ---------------------------------------------------------------------------

    def arch_compat_overrides(self, quiet: bool = False, warn_only: bool = False) -> None:
        """Upstream switched backends off here for models needing softcap or sliding windows.

        The attention selector now checks every backend against the model's needs per device and
        records why it rejects one, so nothing needs overriding; this stays callable for clients.
        """
        if not quiet:
            log.debug("arch_compat_overrides: backend compatibility is decided by the attention selector")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor) // 2 * 2

    def rope_local(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` uses the sliding layers' own RoPE base (Gemma 3)."""
        return self.rope_local_base is not None and self.swa_layers[layer_idx]

    @property
    def attn_scale(self) -> float:
        if self.attention_multiplier is not None:       # Granite
            return float(self.attention_multiplier)
        if self.query_pre_attn_scalar:
            return float(self.query_pre_attn_scalar) ** -0.5
        return 1.0 / math.sqrt(self.head_dim)

    @property
    def dtype(self) -> torch.dtype:
        """Weight dtype on a GPU. EXL2 kernels and Turing are fp16-only, so bf16 checkpoints run in fp16."""
        return torch.float16
