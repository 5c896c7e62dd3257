"""Rotary position embedding: frequency tables for each scaling scheme, and their application.

Frequencies follow the published recipes (linear, NTK alpha, llama3, YaRN) so results match the
HuggingFace reference implementations; tables are computed in fp32 once per device.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch


if TYPE_CHECKING:
    from ..config import ExLlamaV2Config


# Used when a client sets a knob to None (or 0): upstream treats a falsy value as "not set".
_KNOB_DEFAULTS = {"scale_pos_emb": 1.0, "scale_alpha_value": 1.0, "rotary_embedding_base": 10000.0}


def rope_knob(config: "ExLlamaV2Config", name: str) -> float:
    """A positive RoPE setting of the config; None/0/missing give the default, as upstream. Clients set
    these from optional CLI flags (chat.py's draft path: scale_pos_emb = args.rope_scale, often None)."""
    value = getattr(config, name, None)
    if not value:
        return _KNOB_DEFAULTS[name]
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"config.{name} must be a number, got {value!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"config.{name} must be a positive number (or None for {_KNOB_DEFAULTS[name]}), got {value}")
    return value


def inv_freq_and_scale(config: "ExLlamaV2Config", local: bool = False) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (rotary_dim/2,) fp32 and the attention factor applied to cos/sin. With `local`,
    those of the sliding layers' own unscaled RoPE (Gemma 3's rope_local_base_freq)."""
    dim = config.rotary_dim
    base = config.rope_local_base if local else rope_knob(config, "rotary_embedding_base")
    alpha = rope_knob(config, "scale_alpha_value")
    if alpha != 1.0:                                       # static NTK-aware scaling
        base *= alpha ** (dim / (dim - 2))
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    params = {} if local else getattr(config, "rope_scaling", None) or {}
    rope_type = "default" if local else getattr(config, "rope_type", None) or "default"
    orig_len = getattr(config, "original_max_seq_len", None) or config.max_seq_len
    attention_factor = 1.0
    if rope_type == "llama3":
        inv = _llama3(inv, params, orig_len)
    elif rope_type == "yarn":
        inv, attention_factor = _yarn(dim, base, params, orig_len)
    elif rope_type in LONGROPE:
        inv, attention_factor = inv / _param_list(params, "short_factor", dim), float(params["attention_factor"])
    return inv.float(), attention_factor


LONGROPE = ("longrope", "su")


def _param_list(p: dict, key: str, dim: int) -> torch.Tensor:
    return torch.tensor(p[key], dtype=torch.float64)[: dim // 2]


def long_inv_freq(config: "ExLlamaV2Config", local: bool = False) -> torch.Tensor | None:
    """LongRoPE's inverse frequencies for sequences past original_max_seq_len; None for other RoPE types."""
    if local or getattr(config, "rope_type", None) not in LONGROPE:
        return None
    short, _ = inv_freq_and_scale(config)
    short_factor = _param_list(config.rope_scaling, "short_factor", config.rotary_dim)
    long_factor = _param_list(config.rope_scaling, "long_factor", config.rotary_dim)
    return (short.double() * short_factor / long_factor).float()


def _param(p: dict, key: str, rope_type: str) -> float:
    """A required rope_scaling parameter, refused by name when absent or None."""
    value = p.get(key)
    if value is None:
        raise ValueError(f"rope_scaling of type {rope_type!r} needs {key!r} (got {p!r}); set it in "
                         f"config.rope_scaling or the model's config.json")
    return float(value)


def _llama3(inv: torch.Tensor, p: dict, orig_len: int) -> torch.Tensor:
    factor, lo, hi = (_param(p, k, "llama3") for k in ("factor", "low_freq_factor", "high_freq_factor"))
    lo_wavelen, hi_wavelen = orig_len / lo, orig_len / hi
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > lo_wavelen, inv / factor, inv)
    smooth = (orig_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= hi_wavelen) & (wavelen <= lo_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(dim: int, base: float, p: dict, orig_len: int) -> tuple[torch.Tensor, float]:
    factor = _param(p, "factor", "yarn")
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    extrapolation = 1.0 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attention_factor)


class RopeTables:
    """cos/sin tables (length, rotary_dim) for one device, grown on demand."""

    def __init__(self, config: "ExLlamaV2Config", device: torch.device, local: bool = False) -> None:
        self.inv_freq, self.attention_factor = inv_freq_and_scale(config, local)
        # LongRoPE switches to its long factors for a forward reaching past original_max_seq_len, as
        # transformers does per call (keys cached before the switch keep their rotation)
        self._short_long = (self.inv_freq, long_inv_freq(config, local))
        self.switch_len = config.original_max_seq_len
        # linear scaling belongs to the model's RoPE; the sliding layers' own is unscaled
        self.scale_pos_emb = 1.0 if local else rope_knob(config, "scale_pos_emb")
        self.device = device
        self.cos = self.sin = None
        self._build(max(config.max_seq_len, 1))
        self.mrope_component = _mrope_component(config.mrope_section, device) if config.mrope_section else None

    def _build(self, length: int) -> None:
        t = torch.arange(length, dtype=torch.float32) / self.scale_pos_emb
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * self.attention_factor).to(self.device)
        self.sin = (emb.sin() * self.attention_factor).to(self.device)

    def reserve(self, positions: torch.Tensor) -> None:
        """Grow the tables (doubling) so that every position in `positions` has a row."""
        self._reserve_rows(int(positions.max()) + 1 if positions.numel() else 0)

    def _reserve_rows(self, needed: int) -> None:
        if self._short_long[1] is not None:
            inv = self._short_long[needed > self.switch_len]
            if inv is not self.inv_freq:
                self.inv_freq = inv
                self._build(max(needed, self.cos.shape[0]))
        if needed > self.cos.shape[0]:
            self._build(max(needed, 2 * self.cos.shape[0]))

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, L) -> cos, sin (B, L, 1, rotary_dim)."""
        self.reserve(positions)
        positions = positions.clamp(min=0).to(self.device)
        return self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)

    def lookup_range(self, start: int, length: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions start .. start + length - 1 (start >= 0) for every row of a batch -> cos, sin (batch, length,
        1, rotary_dim), as `lookup` gives them: read-only slices of the tables for one row (a decode step's lookup
        without index tensors), copies for more."""
        self._reserve_rows(start + length)
        shape = (batch, length, 1, self.cos.shape[-1])
        return tuple(t[start:start + length].view(1, length, 1, -1).expand(shape).contiguous()
                     for t in (self.cos, self.sin))

    def lookup_mrope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MRoPE: positions (3, B, L) (temporal, height, width) -> cos, sin (B, L, 1, rotary_dim), each frequency
        taken from the component its mrope_section gives it (Qwen2-VL)."""
        if self.mrope_component is None:
            raise ValueError("3-D (MRoPE) positions were given, but this model's RoPE has no mrope_section")
        self.reserve(positions)
        positions = positions.clamp(min=0).to(self.device)
        index = self.mrope_component.view(1, 1, 1, -1).expand(1, *positions.shape[1:], -1)
        cos = torch.gather(self.cos[positions], 0, index)[0]
        sin = torch.gather(self.sin[positions], 0, index)[0]
        return cos.unsqueeze(2), sin.unsqueeze(2)


def _mrope_component(section: list[int], device: torch.device) -> torch.Tensor:
    """For each rotary dimension, which position component (0 t, 1 h, 2 w) rotates it; both halves of the
    table share the layout."""
    half = torch.repeat_interleave(torch.arange(len(section)), torch.tensor(section))
    return torch.cat((half, half)).to(device)
