"""The impure side of the selector: gather the real inputs, plan, probe each GPU's choice, re-plan
around probe failures, log the result. Also answers upstream's module-level `has_*` flags.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import replace
from typing import Any, Sequence

import torch

from .devices import DeviceInfo, describe_devices, visible_devices
from .env import attn_environ, parse_env
from .installed import InstalledBackends, at_least, find_installed
from .probe import probe
from .selector import AttentionPlan, AttnFlags, DevicePlan, ModelNeeds, instantiate, normalize_dtype, plan_attention

log = logging.getLogger(__name__)

# (device, backend, dtype, needs, backend options) -> failure reason or None; a probe runs once
_probed: dict[tuple, str | None] = {}


def _probe_once(plan: AttentionPlan, device_plan: DevicePlan) -> str | None:
    needs = plan.needs
    key = (
        device_plan.device,
        device_plan.backend,
        plan.dtype,
        needs.head_dim,
        needs.softcap,
        bool(needs.sliding_window),
        bool(needs.attention_chunk),
        device_plan.sdpa_kernels,
        device_plan.paged_impl,
        device_plan.fallback,
    )
    if key not in _probed:
        _probed[key] = probe(
            lambda: instantiate(device_plan.backend, device_plan),
            plan.torch_dtype,
            needs.head_dim,
            window=bool(needs.sliding_window),
            softcap=needs.softcap,
            chunk=bool(needs.attention_chunk),
        )
    return _probed[key]


def resolve_plan(
    devices: Sequence[DeviceInfo],
    flags: AttnFlags,
    environ: dict[str, str],
    needs: ModelNeeds,
    installed: InstalledBackends | None = None,
    probe_gpus: bool = True,
) -> AttentionPlan:
    """Plan, then probe the choice on every GPU; a failed probe rejects that backend on that device
    (with the reason) and the device is planned again. A forced backend that fails raises.
    probe_gpus=False plans from the facts alone and touches no GPU."""
    installed = installed or find_installed()
    failures: dict[tuple[str, str], str] = {}
    while True:
        plan = plan_attention(devices, flags, environ, installed, needs, probe_failures=failures)
        new = {}
        for device_plan in plan.devices:
            if device_plan.device.is_cuda and probe_gpus:
                reason = _probe_once(plan, device_plan)
                if reason:
                    new[(device_plan.device.label, device_plan.backend)] = reason
        if not new:
            return plan
        for (label, backend), reason in new.items():
            log.warning("attention: %s does not work on %s (%s); trying the next backend", backend, label, reason)
        failures.update(new)


def resolve_attention(
    config: Any, devices: Sequence[torch.device | str], dtype: torch.dtype | str | None = None, probe_gpus: bool = True
) -> AttentionPlan:
    """The attention plan for a model whose layers (and draft model) run on `devices`.

    Reads from `config`: head_dim, torch_dtype, attn_logit_softcapping, sliding_window and the flags
    no_flash_attn (alias no_flash_attention), no_xformers, no_sdpa; and the EXLLAMA_* attention
    variables from the environment, now. `dtype`, when given, is what the model really runs
    attention in and replaces config.torch_dtype. Raises AttentionConfigError before anything is
    loaded when a forced backend cannot run or a setting is invalid. Logs one INFO line.
    probe_gpus=False gives a provisional plan: no GPU is probed (none gets a CUDA context) and nothing is logged.
    """
    needs = ModelNeeds.from_config(config)
    if dtype is not None:
        needs = replace(needs, dtype=normalize_dtype(dtype))
    plan = resolve_plan(describe_devices(devices), AttnFlags.from_config(config), attn_environ(), needs,
                        probe_gpus=probe_gpus)
    if probe_gpus:
        log.info(plan.summary())
    return plan


# upstream's module flags ------------------------------------------------------------------------


def _importable(load) -> bool:
    try:
        load()
        return True
    except Exception as error:  # a broken install means "not available", never a crash
        log.debug("attention: %s failed: %s", getattr(load, "__module__", load), error)
        return False


@functools.cache
def machine_flags() -> dict[str, bool]:
    """Upstream's `has_*` flags, truthful for this machine: flash-attn/xformers count only when
    installed, not disabled by the environment, able to run on every visible GPU and importable.
    flash_attn is never imported when some visible GPU (or the lack of one) rules it out."""
    from .backends.flash import SOFTCAP_VERSION, WINDOW_VERSION, FlashAttnBackend
    from .backends.flash import load_kernels as load_flash
    from .backends.sdpa import SdpaBackend
    from .backends.xformers import XformersBackend
    from .backends.xformers import load_kernels as load_xformers

    env = parse_env(attn_environ())
    installed = find_installed()
    gpus = [d for d in visible_devices() if d.is_cuda]
    needs = ModelNeeds()

    def runs_everywhere(cls) -> bool:
        return bool(gpus) and all(not cls.validate(d, needs, installed) for d in gpus)

    flash = not env.no_flash_attn and runs_everywhere(FlashAttnBackend) and _importable(load_flash)
    version = installed.flash_attn
    return {
        "has_flash_attn": flash,
        "has_flash_attn_with_paged": flash and FlashAttnBackend.paged_mode(installed) == "block_table",
        "has_flash_attn_with_window": flash and at_least(version, WINDOW_VERSION),
        "has_flash_attn_with_softcap": flash and at_least(version, SOFTCAP_VERSION),
        "has_xformers": not env.no_xformers and runs_everywhere(XformersBackend) and _importable(load_xformers),
        "has_lower_right_sdpa": not env.no_sdpa and not SdpaBackend.validate(DeviceInfo.cpu(), needs, installed),
    }


def assert_paged_attn() -> None:
    """Upstream's guard before paged (batched) generation, which asserted flash-attn 2.5.7+. Here
    every backend implements paged attention (flash-attn with block tables, the others by gathering
    pages), so paged generation is always available and this never raises."""
