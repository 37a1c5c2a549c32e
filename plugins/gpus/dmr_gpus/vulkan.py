"""The Vulkan probe: `vulkaninfo`'s text report, for GPUs that no vendor probe covers
(Intel, AMD without ROCm, NVIDIA without NVML, and anything else with a Vulkan driver).

`vulkaninfo --summary` names the devices but not their memory, so the full report is
read: per `GPUn:` section, `VkPhysicalDeviceProperties` (deviceName, deviceType,
vendorID, driverVersion) and `VkPhysicalDeviceMemoryProperties`, whose heaps carry
`size` and, with VK_EXT_memory_budget, `budget` and `usage`. A device's memory is its
largest DEVICE_LOCAL heap; free is budget - usage (the heap's size without the
extension). CPU implementations (llvmpipe, lavapipe) are left out: they are the CPU.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from dmr.sdk import AcceleratorInfo, hookimpl

from dmr_gpus import nvidia, rocm
from dmr_gpus.tools import GpuProbeError, ToolFailedError, find_tool, quote, run_tool

CPU_DEVICE_TYPE = "PHYSICAL_DEVICE_TYPE_CPU"
DEVICE_LOCAL = "MEMORY_HEAP_DEVICE_LOCAL_BIT"
# What the loader says where there is no Vulkan driver: no device, not a fault.
NO_DRIVER_MARKERS = (
    "ERROR_INCOMPATIBLE_DRIVER",
    "Found no drivers",
    "ERROR_INITIALIZATION_FAILED",
    "No physical devices",
)
# Either line opens every vulkaninfo report, devices or none.
REPORT_MARKERS = ("VULKANINFO", "Vulkan Instance Version")
# Vendors with a probe of their own in this distribution, by entry-point name.
NATIVE_PROBES = {nvidia.VENDOR_ID: "nvidia", rocm.VENDOR_ID: "rocm"}

_GPU_HEADER = re.compile(r"^GPU(\d+):\s*$", re.MULTILINE)
_PROPERTY = re.compile(r"^\s*(\w+)\s*=\s*(.*?)\s*$")
_HEAP_HEADER = re.compile(r"^\s*memoryHeaps\[(\d+)\]:\s*$")
_HEAP_NUMBER = re.compile(r"^\s*(size|budget|usage)\s*=\s*(\d+)")


@dataclass
class Heap:
    size: int = 0
    budget: int | None = None
    usage: int | None = None
    device_local: bool = False

    @property
    def free(self) -> int:
        if self.budget is None:
            return self.size
        return max(self.budget - (self.usage or 0), 0)


@dataclass
class VulkanDevice:
    """One `GPUn:` section of the report."""

    number: int
    properties: dict[str, str] = field(default_factory=dict)
    heaps: list[Heap] = field(default_factory=list)

    @property
    def vendor_id(self) -> int | None:
        try:
            return int(self.properties.get("vendorID", ""), 16)
        except ValueError:
            return None


def _sections(report: str) -> Iterator[tuple[int, str]]:
    headers = list(_GPU_HEADER.finditer(report))
    ends = [header.start() for header in headers[1:]] + [len(report)]
    for header, end in zip(headers, ends, strict=False):  # no headers: nothing
        yield int(header.group(1)), report[header.end() : end]


def _parse_section(number: int, text: str) -> VulkanDevice:
    device = VulkanDevice(number)
    heap: Heap | None = None
    for line in text.splitlines():
        opened = _HEAP_HEADER.match(line)
        if opened:
            heap = Heap()
            device.heaps.append(heap)
            continue
        if heap is not None:
            number_line = _HEAP_NUMBER.match(line)
            if number_line:
                setattr(heap, number_line.group(1), int(number_line.group(2)))
                continue
            if DEVICE_LOCAL in line:
                heap.device_local = True
                continue
            if line.strip().startswith("memoryTypes"):
                heap = None  # the heaps' list is over
            continue
        prop = _PROPERTY.match(line)
        if prop and prop.group(1) not in device.properties:
            # The first value wins: later structures repeat some names.
            device.properties[prop.group(1)] = prop.group(2)
    return device


def parse_vulkaninfo(report: str) -> list[VulkanDevice]:
    """Every GPU section of `vulkaninfo`'s text report, CPU implementations included."""
    devices = [_parse_section(number, text) for number, text in _sections(report)]
    if not devices and not any(marker in report for marker in REPORT_MARKERS):
        raise GpuProbeError(f"vulkaninfo printed no Vulkan report: {quote(report)}")
    return devices


def to_accelerator(device: VulkanDevice) -> AcceleratorInfo:
    name = device.properties.get("deviceName") or f"Vulkan GPU {device.number}"
    local = [heap for heap in device.heaps if heap.device_local and heap.size > 0]
    if not local:
        raise GpuProbeError(
            f"vulkaninfo reports no device-local memory heap for GPU{device.number} ({name})"
        )
    heap = max(local, key=lambda candidate: candidate.size)
    details = {"source": "vulkaninfo"}
    for key, label in (("vendorID", "vendor_id"), ("deviceType", "device_type"),
                       ("driverName", "driver_name")):  # fmt: skip
        if device.properties.get(key):
            details[label] = device.properties[key]
    # driverVersion is "24.0.5 (100663301)": the readable part first.
    driver = device.properties.get("driverInfo") or device.properties.get("driverVersion", "")
    return AcceleratorInfo(
        name=name,
        kind="vulkan",
        index=device.number,
        total_memory=heap.size,
        free_memory=min(heap.free, heap.size),
        driver=driver.split(" (")[0] or None,
        details=details,
    )


def disabled_plugins() -> set[str]:
    # The same variable the core reads (docs/plugins.md): a native probe switched off
    # leaves its vendor's GPUs to Vulkan.
    raw = os.environ.get("DMR_DISABLED_PLUGINS", "")
    return {name.strip() for name in raw.split(",") if name.strip()}


async def covered_vendors(vendors: set[int]) -> set[int]:
    """The vendors whose own probe is enabled and finds a GPU: the same GPU must not be
    budgeted twice, as `cuda:0` and as `vulkan:0`."""
    disabled = disabled_plugins()
    covered = set()
    for vendor in vendors:
        name = NATIVE_PROBES.get(vendor)
        if name is None or name in disabled:
            continue
        try:
            found = nvidia.probe_nvidia() if name == "nvidia" else await rocm.probe_rocm()
        except GpuProbeError:
            continue  # that probe reports its own failure; Vulkan still sees the GPU
        if found:
            covered.add(vendor)
    return covered


async def probe_vulkan() -> list[AcceleratorInfo]:
    tool = find_tool("vulkaninfo")
    if tool is None:
        return []
    try:
        report = await run_tool([tool])
    except ToolFailedError as failed:
        if any(marker in failed.output + failed.error for marker in NO_DRIVER_MARKERS):
            return []
        raise
    found = parse_vulkaninfo(report)
    gpus = [d for d in found if d.properties.get("deviceType") != CPU_DEVICE_TYPE]
    covered = await covered_vendors({d.vendor_id for d in gpus if d.vendor_id is not None})
    return [to_accelerator(d) for d in gpus if d.vendor_id not in covered]


@hookimpl
async def dmr_probe_hardware() -> Sequence[AcceleratorInfo]:
    return await probe_vulkan()
