"""Memory-aware admission: which device a runner goes to and what it may evict.

DMR starts runners without looking at memory, so a second large model can run
a GPU out of memory. Here each device has a budget (the probed free memory, or
`DMR_MEMORY_BUDGET`) and a runner is admitted only when its estimate fits next
to the runners already there, after evicting idle ones, least recently used
first.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from dmr.errors import InvalidRequestError

if TYPE_CHECKING:
    from dmr.records import AcceleratorInfo, MemoryEstimate

__all__ = [
    "Admission",
    "DeviceBudget",
    "Resident",
    "bytes_needed",
    "choose_device",
    "device_key",
    "format_bytes",
    "memory_budget",
    "plan_admission",
]


def format_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"


def choose_device(
    devices: Sequence[AcceleratorInfo], device_kinds: Collection[str] | None = None
) -> AcceleratorInfo:
    """Of the devices the engine runs on (`EngineSpec.device_kinds`; any when None),
    the GPU with the most free memory when there is one, else the CPU."""
    if not devices:
        raise RuntimeError("the hardware probe found no device, not even the CPU")
    usable = [d for d in devices if device_kinds is None or d.kind in device_kinds]
    if not usable:
        found = ", ".join(sorted({device.kind for device in devices}))
        raise InvalidRequestError(
            f"the engine runs on {', '.join(sorted(device_kinds or ()))} devices;"
            f" this machine has {found}"
        )
    gpus = [device for device in usable if device.is_gpu]
    if gpus:
        return max(gpus, key=lambda device: device.free_memory)
    return usable[0]


def device_key(device: AcceleratorInfo) -> tuple[str, int]:
    """(kind, index) on this machine; a cluster node's devices are told apart by node."""
    kind = device.kind if device.node is None else f"{device.kind}@{device.node}"
    return (kind, device.index)


def memory_budget(device: AcceleratorInfo, override: int | None) -> int:
    """Bytes runners may hold on `device`: `override` (`DMR_MEMORY_BUDGET`) when set, else
    the device's probed free memory."""
    return override if override is not None else device.free_memory


def bytes_needed(device: AcceleratorInfo, estimate: MemoryEstimate) -> int:
    # On a GPU the admission question is VRAM; host RAM spill-over is not budgeted.
    return estimate.device_bytes if device.is_gpu else estimate.total


@dataclass(frozen=True)
class DeviceBudget:
    device: AcceleratorInfo
    budget: int  # bytes runners may hold on this device


class Resident(Protocol):
    """What admission needs to know of a loaded runner."""

    @property
    def device_key(self) -> tuple[str, int]: ...
    @property
    def memory(self) -> int: ...
    @property
    def evictable(self) -> bool: ...
    @property
    def last_used(self) -> float: ...


@dataclass(frozen=True)
class Admission:
    """The answer for one runner that wants `needed` bytes on a device."""

    fits: bool  # True: admit after evicting `evict`
    never_fits: bool  # larger than the whole budget
    evict: tuple[Resident, ...]


def plan_admission(
    needed: int,
    budget: int,
    residents: Iterable[Resident],
    *,
    may_evict: Callable[[Resident], bool] | None = None,
) -> Admission:
    """Whether `needed` bytes fit; idle residents (that `may_evict` allows, when given)
    are evicted least recently used first."""
    if needed > budget:
        return Admission(fits=False, never_fits=True, evict=())
    residents = list(residents)
    free = budget - sum(resident.memory for resident in residents)
    if needed <= free:
        return Admission(fits=True, never_fits=False, evict=())
    evict: list[Resident] = []
    idle = sorted(
        (r for r in residents if r.evictable and (may_evict is None or may_evict(r))),
        key=lambda r: r.last_used,
    )
    for resident in idle:
        evict.append(resident)
        free += resident.memory
        if needed <= free:
            return Admission(fits=True, never_fits=False, evict=tuple(evict))
    return Admission(fits=False, never_fits=False, evict=())
