"""The attention-backend selector: a pure function from (devices, flags, env, installed, model needs)
to a per-device plan, with a reason for every choice and every rejected candidate.

It makes no CUDA calls and imports no kernel package; `resolve.py` gathers the real inputs, probes
the choices and re-plans around failures. Precedence of config flags and environment variables is
documented in `env.py`.

Rules, per device (never by any() over the visible GPUs):
- CUDA sm_80+: flash_attn, xformers, sdpa, matmul (first usable wins).
- CUDA below sm_80: xformers, sdpa, matmul; SDPA there may only use its mem-efficient and math
  kernels (never its flash or cuDNN kernels). flash_attn is rejected by its own capability check.
- CPU: sdpa, matmul.
- bfloat16 is never planned when any GPU of the model is below sm_80: the plan runs float16.
- A backend that cannot honour the model's needs (softcap, window, chunked attention, dtype, head_dim) is
  rejected with the reason, so e.g. a softcapped model on Turing gets matmul.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch

from .backends.backend import AttentionBackend
from .devices import DeviceInfo
from .env import ATTN_VARS, BACKEND_NAMES, VAR_BACKEND, VAR_NO, AttentionConfigError, parse_backend, parse_env
from .installed import InstalledBackends
from .registry import backend_class
from .backends.sdpa import allowed_kernels

PRIORITY: dict[str, tuple[str, ...]] = {
    "cuda sm_80+": ("flash_attn", "xformers", "sdpa", "matmul"),
    "cuda below sm_80": ("xformers", "sdpa", "matmul"),
    "cpu": ("sdpa", "matmul"),
}

_DTYPES = {
    "float16": "float16", "half": "float16", "fp16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float32": "float32", "float": "float32", "fp32": "float32",
    "auto": "float16",
}


def capability_class(device: DeviceInfo) -> str:
    if not device.is_cuda:
        return "cpu"
    return "cuda sm_80+" if device.capability >= (8, 0) else "cuda below sm_80"


def normalize_dtype(value: Any) -> str:
    """'float16' | 'bfloat16' | 'float32' from a torch.dtype, a config string or None (= float16)."""
    if value is None:
        return "float16"
    text = str(value).removeprefix("torch.").strip().lower()
    if text not in _DTYPES:
        raise AttentionConfigError(f"torch_dtype {value!r} is not supported; use float16, bfloat16 or float32")
    return _DTYPES[text]


@dataclass(frozen=True)
class AttnFlags:
    no_flash_attn: bool = False
    no_xformers: bool = False
    no_sdpa: bool = False
    # config.attn_backend (model_init's --attn-backend): None leaves EXLLAMA_ATTN_BACKEND in charge; 'auto' or a
    # backend name replaces it
    backend: str | None = None

    @classmethod
    def from_config(cls, config: Any) -> "AttnFlags":
        return cls(
            no_flash_attn=bool(getattr(config, "no_flash_attn", False) or getattr(config, "no_flash_attention", False)),
            no_xformers=bool(getattr(config, "no_xformers", False)),
            no_sdpa=bool(getattr(config, "no_sdpa", False)),
            backend=getattr(config, "attn_backend", None),
        )

    def forced(self, env: Mapping[str, str]) -> tuple[str | None, str]:
        """The backend forced by config.attn_backend, else by the environment, and what forced it."""
        if self.backend is not None:
            name = parse_backend("config.attn_backend", self.backend)
            return name, f"config.attn_backend={name}"
        name = parse_env(env).backend
        return name, f"{VAR_BACKEND}={name}"


@dataclass(frozen=True)
class ModelNeeds:
    head_dim: int = 128
    dtype: str = "float16"
    softcap: float = 0.0        # attention logit softcapping; 0 = none
    sliding_window: int = 0     # 0 = none (a model with any windowed layer needs it)
    attention_chunk: int = 0    # chunked local attention (Llama 4): 0 = none, else the chunk in tokens

    @classmethod
    def from_config(cls, config: Any) -> "ModelNeeds":
        return cls(
            head_dim=int(config.head_dim),
            dtype=normalize_dtype(getattr(config, "torch_dtype", None)),
            softcap=float(getattr(config, "attn_logit_softcapping", None) or 0.0),
            sliding_window=int(getattr(config, "sliding_window", None) or 0),
            attention_chunk=int(getattr(config, "attention_chunk_size", None) or 0),
        )


@dataclass(frozen=True)
class DevicePlan:
    device: DeviceInfo
    backend: str
    reason: str                             # why this backend
    sdpa_kernels: tuple[str, ...]           # kernels SDPA may use here; () when SDPA is not used here
    paged: bool                             # paged attention (dynamic generator batching) available
    paged_impl: str                         # 'block_table' (flash-attn's own) or 'gather' (pages gathered)
    fallback: str | None                    # runs the masks the backend can't express (flash_attn only)
    rejected: tuple[tuple[str, str], ...]   # (backend, reason) of every backend that can't run here

    @property
    def rejected_dict(self) -> dict[str, str]:
        return dict(self.rejected)

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device.label,
            "name": self.device.name,
            "capability": self.device.capability_str,
            "memory": self.device.memory,
            "backend": self.backend,
            "reason": self.reason,
            "sdpa_kernels": list(self.sdpa_kernels),
            "paged": self.paged,
            "paged_impl": self.paged_impl,
            "fallback": self.fallback,
            "rejected": self.rejected_dict,
        }


@dataclass(frozen=True)
class AttentionPlan:
    devices: tuple[DevicePlan, ...]
    dtype: str                              # what attention runs in on every device of the model
    forced: str | None
    flags: AttnFlags
    environ: tuple[tuple[str, str], ...]    # the attention variables seen
    installed: InstalledBackends
    needs: ModelNeeds                       # as the model asked (dtype may differ from `dtype`)
    notes: tuple[str, ...] = ()
    _instances: dict[str, AttentionBackend] = field(default_factory=dict, compare=False, repr=False)

    # lookups ----------------------------------------------------------------------------------

    def device_plan(self, device: torch.device | str | DeviceInfo) -> DevicePlan:
        label = _label(device)
        for plan in self.devices:
            if plan.device.label == label:
                return plan
        planned = ", ".join(p.device.label for p in self.devices)
        raise KeyError(
            f"{label} is not in the attention plan (planned: {planned}); "
            f"pass every device the model uses to resolve_attention"
        )

    def backend_for(self, device: torch.device | str | DeviceInfo) -> AttentionBackend:
        """The (cached) backend object for `device`. Constructing it imports the kernel package."""
        plan = self.device_plan(device)
        label = plan.device.label
        if label not in self._instances:
            self._instances[label] = instantiate(plan.backend, plan)
        return self._instances[label]

    def paged_for(self, device: torch.device | str | DeviceInfo) -> bool:
        return self.device_plan(device).paged

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    # reports ----------------------------------------------------------------------------------

    def summary(self) -> str:
        """The one log line: what runs where, and why not the better candidates."""
        parts = []
        for plan in self.devices:
            kernels = f" ({', '.join(plan.sdpa_kernels)})" if plan.backend == "sdpa" else ""
            where = plan.device.label if not plan.device.is_cuda else f"{plan.device.label} {plan.device.name} {plan.device.sm}"
            text = f"{plan.backend}{kernels} on {where}"
            better = BACKEND_NAMES[: BACKEND_NAMES.index(plan.backend)]
            skipped = [f"{name} rejected: {why}" for name, why in plan.rejected if name in better]
            parts.append("; ".join([text, *skipped]))
        return "attention: " + " | ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        seen = dict(self.environ)
        return {
            "environment": {name: seen.get(name) for name in ATTN_VARS},
            "forced": self.forced,
            "flags": asdict(self.flags),
            "installed": asdict(self.installed),
            "model_needs": asdict(self.needs),
            "dtype": self.dtype,
            "notes": list(self.notes),
            "devices": [plan.as_dict() for plan in self.devices],
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def describe(self) -> str:
        """A readable table of the plan with every reason."""
        seen = dict(self.environ)
        env = "  ".join(f"{name}={seen.get(name, '-')}" for name in ATTN_VARS)
        flags = ", ".join(k for k, v in asdict(self.flags).items() if v) or "none"
        installed = ", ".join(f"{k} {v or '-'}" for k, v in asdict(self.installed).items())
        needs = self.needs
        lines = [
            "attention plan",
            f"  environment: {env}",
            f"  config flags: {flags}",
            f"  installed: {installed}",
            f"  model: head_dim {needs.head_dim}, {self.dtype}, "
            f"softcap {needs.softcap or 'none'}, sliding window {needs.sliding_window or 'none'}, "
            f"attention chunk {needs.attention_chunk or 'none'}",
            *(f"  note: {note}" for note in self.notes),
            "",
        ]
        header = ("device", "name", "capability", "backend", "sdpa kernels", "paged")
        rows = [
            (
                p.device.label,
                p.device.name,
                p.device.capability_str or "-",
                p.backend,
                ", ".join(p.sdpa_kernels) or "-",
                f"yes ({p.paged_impl})" if p.paged else "no",
            )
            for p in self.devices
        ]
        widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines.append(fmt.format(*header).rstrip())
        for plan, row in zip(self.devices, rows):
            lines.append(fmt.format(*row).rstrip())
            lines.append(f"    chosen {plan.backend}: {plan.reason}")
            if plan.fallback:
                lines.append(f"    masks {plan.backend} cannot express go to: {plan.fallback}")
            lines.extend(f"    rejected {name}: {why}" for name, why in plan.rejected)
        return "\n".join(lines)


def _label(device: torch.device | str | DeviceInfo) -> str:
    if isinstance(device, DeviceInfo):
        return device.label
    device = torch.device(device)
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return f"cuda:{index}"
    return device.type


def instantiate(name: str, plan: DevicePlan) -> AttentionBackend:
    """Construct backend `name` for `plan`'s device with the options the plan decided."""
    cls = backend_class(name)
    device = plan.device.torch_device()
    if name == "sdpa":
        return cls(device, kernels=plan.sdpa_kernels)
    if name == "flash_attn":
        return cls(
            device,
            paged_native=plan.paged_impl == "block_table",
            fallback=instantiate(plan.fallback or "matmul", plan),
        )
    return cls(device)


# planning -------------------------------------------------------------------------------------


def _disabled(flags: AttnFlags, environ: Mapping[str, str]) -> dict[str, str]:
    env = parse_env(environ)
    reasons = {}
    for name, var in VAR_NO.items():
        why = []
        if getattr(flags, "no_" + name):
            why.append(f"config no_{name}")
        if env.disables(name):
            why.append(f"{var}={environ[var]}")
        if why:
            reasons[name] = "disabled by " + " and ".join(why)
    return reasons


def _plan_dtype(devices: Sequence[DeviceInfo], needs: ModelNeeds) -> tuple[str, tuple[str, ...]]:
    old = [d for d in devices if d.is_cuda and d.capability < (8, 0)]
    if needs.dtype == "bfloat16" and old:
        where = ", ".join(f"{d.label} is {d.sm}" for d in old)
        return "float16", (f"bfloat16 needs sm_80+ ({where}); attention runs in float16",)
    return needs.dtype, ()


def _reasons(
    name: str,
    device: DeviceInfo,
    disabled: Mapping[str, str],
    installed: InstalledBackends,
    needs: ModelNeeds,
    failures: Mapping[tuple[str, str], str],
) -> list[str]:
    reasons = [disabled[name]] if name in disabled else []
    reasons += backend_class(name).validate(device, needs, installed)
    if (device.label, name) in failures:
        reasons.append(failures[(device.label, name)])
    return reasons


def _plan_device(
    device: DeviceInfo,
    forced: tuple[str | None, str],
    disabled: Mapping[str, str],
    installed: InstalledBackends,
    needs: ModelNeeds,
    failures: Mapping[tuple[str, str], str],
) -> DevicePlan:
    order = PRIORITY[capability_class(device)]
    reasons = {name: _reasons(name, device, disabled, installed, needs, failures) for name in BACKEND_NAMES}
    usable = [name for name in order if not reasons[name]]
    where = f"{device.label} ({device.name}, {device.sm if device.is_cuda else 'no GPU'})"
    forced, forced_by = forced
    if forced:
        if reasons[forced]:
            undo = (f"unset {VAR_BACKEND} (or set it to one of those)" if forced_by.startswith(VAR_BACKEND)
                    else "set config.attn_backend to auto (or to one of those)")
            raise AttentionConfigError(
                f"{forced_by} cannot run on {where}: {'; '.join(reasons[forced])}. "
                f"Backends that can run there: {', '.join(usable) or 'none'}; {undo}."
            )
        chosen, why = forced, f"forced by {forced_by}"
    else:
        if not usable:
            detail = "; ".join(f"{name}: {', '.join(r)}" for name, r in reasons.items() if r)
            raise AttentionConfigError(f"no attention backend can run on {where}: {detail}")
        chosen = usable[0]
        why = f"first usable backend for {capability_class(device)} (priority {', '.join(order)})"
    fallback = None
    if chosen == "flash_attn":
        fallback = "sdpa" if not reasons["sdpa"] else "matmul"
    uses_sdpa = "sdpa" in (chosen, fallback)
    rejected = tuple((name, "; ".join(r)) for name, r in reasons.items() if r and name != chosen)
    return DevicePlan(
        device=device,
        backend=chosen,
        reason=why,
        sdpa_kernels=allowed_kernels(device) if uses_sdpa else (),
        paged=True,  # every backend pages: flash-attn natively, the others by gathering pages
        paged_impl=backend_class(chosen).paged_mode(installed),
        fallback=fallback,
        rejected=rejected,
    )


def plan_attention(
    devices: Sequence[DeviceInfo],
    flags: AttnFlags,
    env: Mapping[str, str],
    installed: InstalledBackends,
    needs: ModelNeeds,
    *,
    probe_failures: Mapping[tuple[str, str], str] | None = None,
) -> AttentionPlan:
    """Plan attention for every device of a model. Pure: same inputs, same plan; raises
    AttentionConfigError for unparseable env values, a forced backend that is also disabled or
    cannot run on some device, or a device no backend can serve.

    env: the process environment or any mapping (only the EXLLAMA_* attention variables are read).
    probe_failures: (device label, backend) -> reason, from real probes; those count as rejections.
    """
    devices = tuple(devices)
    if not devices:
        raise AttentionConfigError("no devices given to plan attention for; pass every device the model uses")
    forced, forced_by = flags.forced(env)
    disabled = _disabled(flags, env)
    if forced in disabled:
        raise AttentionConfigError(
            f"{forced_by} forces {forced}, but it is {disabled[forced]}; remove one of the two"
        )
    dtype, notes = _plan_dtype(devices, needs)
    planned = replace(needs, dtype=dtype)
    failures = probe_failures or {}
    return AttentionPlan(
        devices=tuple(_plan_device(d, (forced, forced_by), disabled, installed, planned, failures) for d in devices),
        dtype=dtype,
        forced=forced,
        flags=flags,
        environ=tuple((k, env[k]) for k in ATTN_VARS if k in env),
        installed=installed,
        needs=needs,
        notes=notes,
    )
