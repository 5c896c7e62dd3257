"""The attention selector: a matrix of rigs x flags x environment x installed packages against the
rules of issue 3, written out below as a plain oracle; forced backends; model needs; the probe and
re-planning; upstream's has_* flags; and fake/broken flash_attn and xformers installs.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import exllamav2.attn.resolve as resolve
from exllamav2.attn import AttentionConfigError, AttnFlags, DeviceInfo, InstalledBackends, ModelNeeds, plan_attention
from exllamav2.attn.env import parse_env
from exllamav2.attn.installed import find_installed, version_tuple
from exllamav2.attn.probe import probe
from exllamav2.attn.backends.sdpa import SdpaBackend
from tests.fakes import FAKES

TORCH = "2.13.0"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_machine_flags():
    resolve.machine_flags.cache_clear()
    yield
    resolve.machine_flags.cache_clear()


def rig(*caps):
    """Devices from capabilities; None is the CPU."""
    devices, index = [], 0
    for cap in caps:
        if cap is None:
            devices.append(DeviceInfo.cpu())
        else:
            devices.append(DeviceInfo.gpu(index, cap, name=f"test sm_{cap[0]}{cap[1]}"))
            index += 1
    return tuple(devices)


def config(**overrides):
    """The attributes resolve_attention reads from an ExLlamaV2Config."""
    values = dict(
        head_dim=64, torch_dtype="float16", attn_logit_softcapping=None, sliding_window=0,
        no_flash_attn=False, no_xformers=False, no_sdpa=False,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


# the matrix --------------------------------------------------------------------------------------

RIGS = {
    "cpu": (None,),
    "sm61": ((6, 1),),
    "sm70": ((7, 0),),
    "sm75": ((7, 5),),
    "sm80": ((8, 0),),
    "sm86": ((8, 6),),
    "sm89": ((8, 9),),
    "sm90": ((9, 0),),
    "sm86+sm75": ((8, 6), (7, 5)),
    "sm89+sm75": ((8, 9), (7, 5)),
}

INSTALLED = {
    "none": InstalledBackends(torch=TORCH),
    "flash": InstalledBackends(torch=TORCH, flash_attn="2.8.3"),
    "xformers": InstalledBackends(torch=TORCH, xformers="0.0.33"),
    "both": InstalledBackends(torch=TORCH, flash_attn="2.8.3", xformers="0.0.28.post3"),
    "old_flash": InstalledBackends(torch=TORCH, flash_attn="2.1.2"),
    "old_xformers": InstalledBackends(torch=TORCH, xformers="0.0.20"),
}

# name -> (config flags, environment, backends that end up disabled)
SWITCHES = {
    "defaults": (AttnFlags(), {}, set()),
    "flag no_flash_attn": (AttnFlags(no_flash_attn=True), {}, {"flash_attn"}),
    "env NO_FLASH_ATTN=1": (AttnFlags(), {"EXLLAMA_NO_FLASH_ATTN": "1"}, {"flash_attn"}),
    "env NO_FLASH_ATTN=0": (AttnFlags(), {"EXLLAMA_NO_FLASH_ATTN": "0"}, set()),
    "env NO_FLASH_ATTN empty": (AttnFlags(), {"EXLLAMA_NO_FLASH_ATTN": ""}, set()),
    "flag no_xformers": (AttnFlags(no_xformers=True), {}, {"xformers"}),
    "env NO_XFORMERS=true": (AttnFlags(), {"EXLLAMA_NO_XFORMERS": "true"}, {"xformers"}),
    "flag no_sdpa": (AttnFlags(no_sdpa=True), {}, {"sdpa"}),
    "env NO_SDPA=Yes": (AttnFlags(), {"EXLLAMA_NO_SDPA": "Yes"}, {"sdpa"}),
    "env off, flag on": (AttnFlags(no_flash_attn=True), {"EXLLAMA_NO_FLASH_ATTN": "off"}, {"flash_attn"}),
    "everything off": (
        AttnFlags(no_flash_attn=True, no_sdpa=True),
        {"EXLLAMA_NO_XFORMERS": "on"},
        {"flash_attn", "xformers", "sdpa"},
    ),
    "env BACKEND=auto": (AttnFlags(), {"EXLLAMA_ATTN_BACKEND": "auto"}, set()),
}


def can_run(name: str, cap, installed: InstalledBackends) -> bool:
    """Issue 3's rules for a plain fp16 model, written out directly."""
    if name == "flash_attn":
        return cap is not None and cap >= (8, 0) and installed.flash_attn is not None and (
            version_tuple(installed.flash_attn) >= (2, 2, 1)
        )
    if name == "xformers":
        return cap is not None and cap >= (6, 0) and installed.xformers is not None and (
            version_tuple(installed.xformers) >= (0, 0, 24)
        )
    return True   # sdpa (torch 2.13) and matmul run anywhere


def expected_backend(cap, installed: InstalledBackends, disabled: set[str]) -> str:
    order = ("flash_attn", "xformers", "sdpa", "matmul")
    return next(name for name in order if name not in disabled and can_run(name, cap, installed))


@pytest.mark.parametrize("rig_name", RIGS)
@pytest.mark.parametrize("installed_name", INSTALLED)
@pytest.mark.parametrize("switch", SWITCHES)
def test_selector_matrix(rig_name, installed_name, switch):
    flags, env, disabled = SWITCHES[switch]
    installed = INSTALLED[installed_name]
    devices = rig(*RIGS[rig_name])
    plan = plan_attention(devices, flags, env, installed, ModelNeeds())

    assert [p.device for p in plan.devices] == list(devices)
    for device, cap in zip(plan.devices, RIGS[rig_name]):
        assert device.backend == expected_backend(cap, installed, disabled), device
        assert device.paged
        assert device.reason
        for name, why in device.rejected:
            assert why and name != device.backend
        if cap is not None and cap < (8, 0):
            assert device.backend != "flash_attn"
            assert "flash" not in device.sdpa_kernels and "cudnn" not in device.sdpa_kernels
            assert "needs sm_80+" in device.rejected_dict["flash_attn"]
        if device.backend == "sdpa":
            assert device.sdpa_kernels
        for name in disabled:
            assert "disabled by" in device.rejected_dict[name]


@pytest.mark.parametrize("rig_name", RIGS)
@pytest.mark.parametrize("installed_name", ["none", "both"])
@pytest.mark.parametrize("forced", ["flash_attn", "xformers", "sdpa", "matmul"])
def test_forced_backend_runs_everywhere_or_fails_naming_the_device(rig_name, installed_name, forced):
    installed = INSTALLED[installed_name]
    caps = RIGS[rig_name]
    devices = rig(*caps)
    env = {"EXLLAMA_ATTN_BACKEND": forced}
    blocked = [device for device, cap in zip(devices, caps) if not can_run(forced, cap, installed)]
    if not blocked:
        plan = plan_attention(devices, AttnFlags(), env, installed, ModelNeeds())
        assert {p.backend for p in plan.devices} == {forced}
        assert all("forced" in p.reason for p in plan.devices)
        return
    with pytest.raises(AttentionConfigError) as raised:
        plan_attention(devices, AttnFlags(), env, installed, ModelNeeds())
    message = str(raised.value)
    device = blocked[0]
    assert device.label in message and device.sm in message
    assert "Backends that can run there: " in message and "sdpa" in message.split("Backends that can run there: ")[1]


def test_forcing_a_disabled_backend_is_a_conflict():
    with pytest.raises(AttentionConfigError, match="EXLLAMA_ATTN_BACKEND=sdpa.*disabled by config no_sdpa"):
        plan_attention(rig((7, 5)), AttnFlags(no_sdpa=True), {"EXLLAMA_ATTN_BACKEND": "sdpa"}, INSTALLED["none"], ModelNeeds())
    with pytest.raises(AttentionConfigError, match="EXLLAMA_NO_XFORMERS=1"):
        plan_attention(
            rig((7, 5)), AttnFlags(), {"EXLLAMA_ATTN_BACKEND": "xformers", "EXLLAMA_NO_XFORMERS": "1"},
            INSTALLED["xformers"], ModelNeeds(),
        )


def test_mixed_rig_is_decided_per_device_not_by_any_gpu():
    plan = plan_attention(rig((8, 6), (7, 5)), AttnFlags(), {}, INSTALLED["flash"], ModelNeeds())
    assert plan.device_plan("cuda:0").backend == "flash_attn"
    assert plan.device_plan("cuda:0").paged_impl == "block_table"
    assert plan.device_plan("cuda:1").backend == "sdpa"
    assert plan.device_plan("cuda:1").sdpa_kernels == ("efficient", "math")
    assert plan.device_plan("cuda:1").paged_impl == "gather"
    with pytest.raises(AttentionConfigError, match=r"cuda:1 \(test sm_75, sm_75\).*needs sm_80\+"):
        plan_attention(rig((8, 6), (7, 5)), AttnFlags(), {"EXLLAMA_ATTN_BACKEND": "flash_attn"}, INSTALLED["flash"], ModelNeeds())


# environment -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,disabled", [("1", True), ("TRUE", True), (" yes ", True), ("on", True),
                                            ("0", False), ("false", False), ("No", False), ("off", False), ("", False)])
def test_env_booleans_are_read_by_value(value, disabled):
    assert parse_env({"EXLLAMA_NO_SDPA": value}).no_sdpa is disabled


@pytest.mark.parametrize("var", ["EXLLAMA_NO_FLASH_ATTN", "EXLLAMA_NO_XFORMERS", "EXLLAMA_NO_SDPA"])
def test_env_boolean_garbage_is_an_error_not_a_guess(var):
    with pytest.raises(AttentionConfigError, match=f"{var}='maybe' is not a boolean"):
        plan_attention(rig(None), AttnFlags(), {var: "maybe"}, INSTALLED["none"], ModelNeeds())


def test_env_backend_name_is_checked():
    with pytest.raises(AttentionConfigError, match="valid values: auto, flash_attn, xformers, sdpa, matmul"):
        parse_env({"EXLLAMA_ATTN_BACKEND": "flash"})
    assert parse_env({"EXLLAMA_ATTN_BACKEND": " SDPA "}).backend == "sdpa"
    assert parse_env({"EXLLAMA_ATTN_BACKEND": "auto"}).backend is None


def test_env_is_read_at_selection_time(monkeypatch):
    monkeypatch.setenv("EXLLAMA_NO_SDPA", "1")
    plan = resolve.resolve_attention(config(), ["cpu"])
    assert plan.device_plan("cpu").backend == "matmul"
    monkeypatch.setenv("EXLLAMA_NO_SDPA", "0")
    assert resolve.resolve_attention(config(), ["cpu"]).device_plan("cpu").backend == "sdpa"


# model needs -------------------------------------------------------------------------------------


def test_bf16_never_planned_below_sm80():
    needs = ModelNeeds(dtype="bfloat16")
    mixed = plan_attention(rig((8, 6), (7, 5)), AttnFlags(), {}, INSTALLED["flash"], needs)
    assert mixed.dtype == "float16" and "bfloat16 needs sm_80+ (cuda:1 is sm_75)" in mixed.notes[0]
    assert mixed.needs.dtype == "bfloat16"   # what the model asked for is kept for the report
    ampere = plan_attention(rig((8, 6), (9, 0)), AttnFlags(), {}, INSTALLED["flash"], needs)
    assert ampere.dtype == "bfloat16" and not ampere.notes
    assert plan_attention(rig(None), AttnFlags(), {}, INSTALLED["none"], needs).dtype == "bfloat16"


@pytest.mark.parametrize(
    "needs,installed,cap,backend,rejection",
    [
        # softcap: only flash-attn 2.6+ and matmul can apply it
        (ModelNeeds(softcap=50.0), "both", (8, 6), "flash_attn", None),
        (ModelNeeds(softcap=50.0), "both", (7, 5), "matmul", ("xformers", "softcapping")),
        (ModelNeeds(softcap=50.0), "none", None, "matmul", ("sdpa", "softcapping")),
        (ModelNeeds(softcap=50.0), "flash_2.5.8", (8, 6), "matmul", ("flash_attn", "softcapping needs flash-attn 2.6+")),
        # sliding window needs flash-attn 2.3+; SDPA and xformers apply it with a mask
        (ModelNeeds(sliding_window=4096), "flash_2.2.1", (8, 6), "sdpa", ("flash_attn", "sliding window needs flash-attn 2.3+")),
        (ModelNeeds(sliding_window=4096), "both", (7, 5), "xformers", None),
        # chunked local attention (Llama 4): only SDPA and matmul mask it; flash-attn and xformers are refused
        (ModelNeeds(attention_chunk=8192), "both", (8, 6), "sdpa", ("flash_attn", "chunked local attention")),
        (ModelNeeds(attention_chunk=8192), "both", (7, 5), "sdpa", ("xformers", "chunked local attention")),
        (ModelNeeds(attention_chunk=8192), "both", (9, 0), "sdpa", ("xformers", "chunked local attention")),
        # dtype and head_dim limits of flash-attn
        (ModelNeeds(dtype="float32"), "flash", (8, 6), "sdpa", ("flash_attn", "float16 or bfloat16")),
        (ModelNeeds(head_dim=512), "flash", (9, 0), "sdpa", ("flash_attn", "head_dim 512")),
        (ModelNeeds(head_dim=80), "flash", (8, 9), "flash_attn", None),
    ],
)
def test_backends_that_cannot_honour_the_model_are_rejected(needs, installed, cap, backend, rejection):
    versions = {**INSTALLED, "flash_2.5.8": InstalledBackends(torch=TORCH, flash_attn="2.5.8"),
                "flash_2.2.1": InstalledBackends(torch=TORCH, flash_attn="2.2.1")}
    plan = plan_attention(rig(cap), AttnFlags(), {}, versions[installed], needs)
    device = plan.devices[0]
    assert device.backend == backend
    if rejection:
        name, text = rejection
        assert text in device.rejected_dict[name]


def test_forcing_flash_attn_on_a_chunked_model_names_the_reason():
    with pytest.raises(AttentionConfigError, match="flash_attn cannot run on cuda:0.*chunked local attention"):
        plan_attention(rig((8, 6)), AttnFlags(), {"EXLLAMA_ATTN_BACKEND": "flash_attn"}, INSTALLED["both"],
                       ModelNeeds(attention_chunk=8192))


def test_flash_fallback_for_masks_is_sdpa_unless_sdpa_cannot_serve():
    plan = plan_attention(rig((8, 6)), AttnFlags(), {}, INSTALLED["flash"], ModelNeeds())
    assert plan.devices[0].fallback == "sdpa" and plan.devices[0].sdpa_kernels == ("flash", "efficient", "math")
    capped = plan_attention(rig((8, 6)), AttnFlags(), {}, INSTALLED["flash"], ModelNeeds(softcap=30.0))
    assert capped.devices[0].fallback == "matmul" and capped.devices[0].sdpa_kernels == ()


def test_old_flash_pages_by_gathering():
    plan = plan_attention(rig((8, 0)), AttnFlags(), {}, InstalledBackends(torch=TORCH, flash_attn="2.5.6"), ModelNeeds())
    assert plan.devices[0].backend == "flash_attn" and plan.devices[0].paged_impl == "gather"


def test_old_torch_has_no_sdpa():
    plan = plan_attention(rig(None), AttnFlags(), {}, InstalledBackends(torch="2.2.2"), ModelNeeds())
    assert plan.devices[0].backend == "matmul"
    assert "torch 2.3+" in plan.devices[0].rejected_dict["sdpa"]


def test_plan_is_pure_and_inputs_are_hashable():
    args = (rig((8, 6), (7, 5)), AttnFlags(no_xformers=True), {"EXLLAMA_NO_SDPA": "0"}, INSTALLED["both"], ModelNeeds())
    assert plan_attention(*args) == plan_attention(*args)
    assert len({args[0], args[1], args[3], args[4]}) == 4   # frozen dataclasses hash
    assert "DeviceInfo(index=1, name='test sm_75', capability=(7, 5)" in repr(args[0][1])


def test_summary_line_says_what_runs_where_and_why():
    plan = plan_attention(rig((7, 5)), AttnFlags(), {}, INSTALLED["flash"], ModelNeeds())
    assert plan.summary() == (
        "attention: sdpa (efficient, math) on cuda:0 test sm_75 sm_75; "
        "flash_attn rejected: needs sm_80+, cuda:0 is sm_75; xformers rejected: not installed"
    )


def test_describe_and_json_carry_every_reason():
    plan = plan_attention(rig((8, 9), (7, 5)), AttnFlags(no_xformers=True), {"EXLLAMA_NO_SDPA": "0"},
                          INSTALLED["both"], ModelNeeds())
    data = plan.as_dict()
    assert data["environment"]["EXLLAMA_NO_SDPA"] == "0" and data["environment"]["EXLLAMA_ATTN_BACKEND"] is None
    assert data["installed"] == {"torch": TORCH, "flash_attn": "2.8.3", "xformers": "0.0.28.post3"}
    first, second = data["devices"]
    assert (first["device"], first["capability"], first["backend"], first["paged"]) == ("cuda:0", "8.9", "flash_attn", True)
    assert (second["device"], second["capability"], second["backend"]) == ("cuda:1", "7.5", "sdpa")
    assert second["sdpa_kernels"] == ["efficient", "math"]
    assert second["rejected"] == {"xformers": "disabled by config no_xformers", "flash_attn": "needs sm_80+, cuda:1 is sm_75"}
    table = plan.describe()
    assert "rejected flash_attn: needs sm_80+, cuda:1 is sm_75" in table
    assert "rejected xformers: disabled by config no_xformers" in table


# resolve: the impure entry point -----------------------------------------------------------------


def test_resolve_attention_on_cpu(caplog):
    with caplog.at_level(logging.INFO, logger="exllamav2.attn.resolve"):
        plan = resolve.resolve_attention(config(torch_dtype=torch.bfloat16), [torch.device("cpu"), "cpu"])
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [plan.summary()]
    assert len(plan.devices) == 1 and plan.dtype == "bfloat16"
    backend = plan.backend_for(torch.device("cpu"))
    assert isinstance(backend, SdpaBackend) and backend.kernels == ("flash", "math")
    assert plan.backend_for("cpu") is backend
    assert plan.paged_for("cpu")
    with pytest.raises(KeyError, match="cuda:3 is not in the attention plan"):
        plan.device_plan("cuda:3")


def test_resolve_reads_config_flags_and_alias():
    plan = resolve.resolve_attention(config(no_flash_attention=True, no_sdpa=True), ["cpu"])
    assert plan.flags == AttnFlags(no_flash_attn=True, no_sdpa=True)
    assert plan.devices[0].backend == "matmul"
    needs = resolve.resolve_attention(config(attn_logit_softcapping=30.0, sliding_window=None), ["cpu"]).needs
    assert needs == ModelNeeds(head_dim=64, dtype="float16", softcap=30.0, sliding_window=0)
    with pytest.raises(AttentionConfigError, match="torch_dtype 'int8'"):
        resolve.resolve_attention(config(torch_dtype="int8"), ["cpu"])


def test_failed_probe_moves_to_the_next_backend(monkeypatch):
    probed = []

    def fake_probe(plan, device_plan):
        probed.append(device_plan.backend)
        return "probe failed: RuntimeError: no kernel image" if device_plan.backend == "xformers" else None

    monkeypatch.setattr(resolve, "_probe_once", fake_probe)
    plan = resolve.resolve_plan(rig((7, 5)), AttnFlags(), {}, ModelNeeds(), INSTALLED["xformers"])
    assert probed == ["xformers", "sdpa"]
    device = plan.devices[0]
    assert device.backend == "sdpa"
    assert device.rejected_dict["xformers"] == "probe failed: RuntimeError: no kernel image"
    with pytest.raises(AttentionConfigError, match="EXLLAMA_ATTN_BACKEND=xformers cannot run on cuda:0.*no kernel image"):
        resolve.resolve_plan(rig((7, 5)), AttnFlags(), {"EXLLAMA_ATTN_BACKEND": "xformers"}, ModelNeeds(), INSTALLED["xformers"])


def test_probe_runs_a_backend_and_reports_wrong_results():
    assert probe(lambda: SdpaBackend("cpu"), torch.float32, 16) is None
    assert probe(lambda: SdpaBackend("cpu"), torch.float16, 64, window=True) is None

    class Wrong(SdpaBackend):
        def attend(self, q, k, v, meta, **kwargs):
            return super().attend(q, k, v, meta, **kwargs) * 1.5

    assert "probe attend differs from matmul" in probe(lambda: Wrong("cpu"), torch.float32, 16)


def test_probe_of_ampere_only_flash_reports_its_error(fakes):
    from exllamav2.attn.backends.flash import FlashAttnBackend

    fakes("ampere_only")
    reason = probe(lambda: FlashAttnBackend("cpu"), torch.float16, 64)
    assert reason == "probe failed: RuntimeError: FlashAttention only supports Ampere GPUs or newer."


# fake and broken installs ------------------------------------------------------------------------


def test_fake_flash_on_turing_is_rejected_and_never_imported(fakes, monkeypatch):
    fakes("ampere_only")
    installed = find_installed()
    assert installed.flash_attn == "2.8.3"
    plan = plan_attention(rig((7, 5)), AttnFlags(), {}, installed, ModelNeeds())
    assert plan.devices[0].backend != "flash_attn"
    assert plan.devices[0].rejected_dict["flash_attn"] == "needs sm_80+, cuda:0 is sm_75"
    monkeypatch.setattr(resolve, "visible_devices", lambda: rig((7, 5)))
    import exllamav2.attn as attn

    assert attn.has_flash_attn is False and attn.has_flash_attn_with_paged is False
    assert "flash_attn" not in sys.modules
    # upstream's guard raised here (no paged flash-attn); here it passes because the plan still pages, by gathering
    assert attn.assert_paged_attn() is None
    assert (plan.devices[0].paged, plan.devices[0].paged_impl) == (True, "gather")


def test_has_flags_on_an_ampere_machine_import_flash(fakes, monkeypatch):
    fakes("ampere_only")
    monkeypatch.setattr(resolve, "visible_devices", lambda: rig((8, 6)))
    import exllamav2.attn as attn

    assert attn.has_flash_attn and attn.has_flash_attn_with_paged
    assert attn.has_flash_attn_with_window and attn.has_flash_attn_with_softcap
    assert "flash_attn" in sys.modules
    assert attn.has_lower_right_sdpa
    # upstream's guard passes here as upstream's did, because the plan pages through flash-attn's block tables
    assert attn.assert_paged_attn() is None
    plan = plan_attention(rig((8, 6)), AttnFlags(), {}, find_installed(), ModelNeeds()).devices[0]
    assert (plan.backend, plan.paged, plan.paged_impl) == ("flash_attn", True, "block_table")


def test_has_flags_respect_the_environment(fakes, monkeypatch):
    fakes("ampere_only")
    monkeypatch.setattr(resolve, "visible_devices", lambda: rig((8, 6)))
    monkeypatch.setenv("EXLLAMA_NO_FLASH_ATTN", "yes")
    monkeypatch.setenv("EXLLAMA_NO_SDPA", "1")
    import exllamav2.attn as attn

    assert not attn.has_flash_attn and not attn.has_lower_right_sdpa
    assert "flash_attn" not in sys.modules


def test_broken_installs_are_not_available_and_do_not_raise(fakes, monkeypatch):
    fakes("broken")
    monkeypatch.setattr(resolve, "visible_devices", lambda: rig((8, 6)))
    installed = find_installed()
    assert (installed.flash_attn, installed.xformers) == ("2.8.3", "0.0.33")
    flags = resolve.machine_flags()
    assert flags["has_flash_attn"] is False and flags["has_xformers"] is False
    from exllamav2.attn.backends.flash import FlashAttnBackend

    assert probe(lambda: FlashAttnBackend("cpu"), torch.float16, 64).startswith("probe failed: ImportError: ")


def test_import_exllamav2_survives_broken_flash_attn_and_xformers():
    code = (
        "import exllamav2, exllamav2.attn as a\n"
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('flash_attn') and importlib.util.find_spec('xformers')\n"
        "print(a.has_flash_attn, a.has_xformers, a.has_lower_right_sdpa)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXLLAMA_")}
    env["PYTHONPATH"] = os.pathsep.join([str(FAKES / "broken"), str(REPO)])
    env["CUDA_VISIBLE_DEVICES"] = ""   # the question is the import, whatever GPUs this machine has
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "True"]


def test_probe_passes_working_flash_and_xformers_glue(fakes):
    from exllamav2.attn.backends.flash import FlashAttnBackend
    from exllamav2.attn.backends.xformers import XformersBackend

    fakes("reference")
    flash = lambda: FlashAttnBackend("cpu", paged_native=True, fallback=SdpaBackend("cpu"))  # noqa: E731
    assert probe(flash, torch.float16, 64, window=True) is None
    assert probe(flash, torch.float16, 64, softcap=30.0) is None
    assert probe(lambda: XformersBackend("cpu"), torch.float16, 64, window=True) is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_probe_on_this_gpu(monkeypatch):
    from exllamav2.attn.backends.matmul import MatmulBackend
    from exllamav2.attn.backends.metadata import AttnMetadata

    monkeypatch.setattr(resolve, "_probed", {})
    plan = resolve.resolve_attention(config(), ["cuda:0"], dtype=torch.float16)
    device = plan.devices[0]
    if device.device.capability < (8, 0):
        assert device.backend != "flash_attn" and "flash" not in device.sdpa_kernels
    assert [reason for reason in resolve._probed.values() if reason is None]   # the chosen backend passed
    q = torch.randn(2, 3, 4, 64, device="cuda:0", dtype=torch.float16)
    k = torch.randn(2, 9, 2, 64, device="cuda:0", dtype=torch.float16)
    meta = AttnMetadata(batch_size=2, q_len=3, k_len=9, past_len=6)
    out = plan.backend_for("cuda:0").attend(q, k, k, meta, scale=0.125)
    torch.testing.assert_close(out, MatmulBackend("cuda:0").attend(q, k, k, meta, scale=0.125), atol=1e-2, rtol=1e-2)
