"""What the selector knows about a device, and how it is found (at call time; nothing runs at import)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from .env import AttentionConfigError


@dataclass(frozen=True)
class DeviceInfo:
    index: int | None                          # CUDA ordinal; None for the CPU
    name: str
    capability: tuple[int, int] | None = None  # (major, minor); None for the CPU
    memory: int = 0                            # bytes; 0 when unknown
    rocm: bool = False                         # a HIP device reported through torch.cuda

    @classmethod
    def cpu(cls) -> "DeviceInfo":
        return cls(index=None, name="cpu")

    @classmethod
    def gpu(cls, index: int, capability: tuple[int, int], name: str = "", memory: int = 0) -> "DeviceInfo":
        return cls(index=index, name=name or f"sm_{capability[0]}{capability[1]} GPU", capability=capability, memory=memory)

    @property
    def is_cuda(self) -> bool:
        return self.capability is not None

    @property
    def label(self) -> str:
        """The torch device string: 'cuda:0' or 'cpu'."""
        return "cpu" if self.index is None else f"cuda:{self.index}"

    @property
    def sm(self) -> str:
        """'sm_75', or 'cpu'."""
        return "cpu" if self.capability is None else f"sm_{self.capability[0]}{self.capability[1]}"

    @property
    def capability_str(self) -> str | None:
        return None if self.capability is None else f"{self.capability[0]}.{self.capability[1]}"

    def torch_device(self) -> torch.device:
        return torch.device(self.label)


def describe_device(device: torch.device | str) -> DeviceInfo:
    """DeviceInfo of a real device. Queries CUDA, so call it when planning, not at import."""
    device = torch.device(device)
    if device.type == "cpu":
        return DeviceInfo.cpu()
    if device.type != "cuda":
        raise AttentionConfigError(f"device {device} is not supported; exllamav2 runs on CUDA GPUs and the CPU")
    if not torch.cuda.is_available():
        raise AttentionConfigError(f"device {device} was requested but torch sees no CUDA GPU (torch {torch.__version__})")
    index = torch.cuda.current_device() if device.index is None else device.index
    if not 0 <= index < torch.cuda.device_count():
        raise AttentionConfigError(
            f"device cuda:{index} does not exist; torch sees {torch.cuda.device_count()} GPU(s) "
            f"(check CUDA_VISIBLE_DEVICES and the gpu split)"
        )
    props = torch.cuda.get_device_properties(index)
    return DeviceInfo(
        index=index,
        name=props.name,
        capability=(props.major, props.minor),
        memory=props.total_memory,
        rocm=torch.version.hip is not None,
    )


def describe_devices(devices: Iterable[torch.device | str]) -> tuple[DeviceInfo, ...]:
    """DeviceInfo of each distinct device, in first-seen order."""
    seen: dict[str, DeviceInfo] = {}
    for device in devices:
        info = describe_device(device)
        seen.setdefault(info.label, info)
    if not seen:
        raise AttentionConfigError("no devices given to plan attention for; pass every device the model uses")
    return tuple(seen.values())


def visible_devices() -> tuple[DeviceInfo, ...]:
    """Every GPU torch can see, or the CPU when there is none."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return describe_devices(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    return (DeviceInfo.cpu(),)


def assumed_devices(spec: str) -> tuple[DeviceInfo, ...]:
    """Devices of an imagined rig: '7.5' or '8.6,7.5' (one capability per GPU, 'cpu' for the CPU)."""
    devices = []
    for item in spec.split(","):
        text = item.strip().lower()
        if text == "cpu":
            devices.append(DeviceInfo.cpu())
            continue
        try:
            major, minor = (int(part) for part in text.split("."))
        except ValueError:
            raise AttentionConfigError(
                f"capability {item.strip()!r} is not MAJOR.MINOR; write e.g. '7.5' or '8.6,7.5' (or 'cpu')"
            ) from None
        index = sum(d.is_cuda for d in devices)
        devices.append(DeviceInfo.gpu(index, (major, minor), name=f"assumed sm_{major}{minor}"))
    return tuple(devices)
