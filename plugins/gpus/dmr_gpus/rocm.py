"""The AMD ROCm probe: the `amdsmi` library when it imports, else the `rocm-smi` tool.

`amdsmi` (AMD SMI's Python binding, shipped with ROCm 6+ and on the package index)
loads `libamd_smi.so` when imported; where that fails, or the binding is absent,
`rocm-smi --showproductname --showmeminfo vram --showdriverversion --json` answers
the same facts. No library, no tool, or no driver: no device and no error.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from dmr.sdk import AcceleratorInfo, hookimpl

from dmr_gpus.tools import GpuProbeError, ToolFailedError, find_tool, quote, run_tool

VENDOR_ID = 0x1002  # PCI vendor ID, as Vulkan reports it
ROCM_BIN = "/opt/rocm/bin"
ROCM_SMI_ARGS = ("--showproductname", "--showmeminfo", "vram", "--showdriverversion", "--json")
TOTAL_KEY = "VRAM Total Memory (B)"
USED_KEY = "VRAM Total Used Memory (B)"
# rocm-smi renamed its product keys over releases ("Card series" in 5.x).
NAME_KEYS = ("Card Series", "Card series", "Card Model", "Card model")
# What rocm-smi says where the amdgpu driver has no GPU for it: no device, not a fault.
NO_GPU_MARKERS = ("No AMD GPUs", "amdgpu not found", "Driver not initialized", "No JSON data")


def import_amdsmi() -> ModuleType | None:
    try:
        return importlib.import_module("amdsmi")
    except (ImportError, OSError, KeyError):
        # The binding is absent, or present without ROCm's shared library (it
        # raises at import then): the tool may still be there.
        return None


def driver_version(amdsmi: Any, handle: Any) -> str | None:
    """Optional: some GPUs (virtual functions) do not answer it."""
    try:
        version = amdsmi.amdsmi_get_gpu_driver_info(handle).get("driver_version")
    except amdsmi.AmdSmiException:
        return None
    return str(version) if version else None


def probe_amdsmi(amdsmi: Any) -> list[AcceleratorInfo]:
    """Devices through the library; [] where its init fails (no driver loaded)."""
    try:
        amdsmi.amdsmi_init()
    except amdsmi.AmdSmiException:
        return []
    try:
        devices = []
        for index, handle in enumerate(amdsmi.amdsmi_get_processor_handles()):
            vram = amdsmi.AmdSmiMemoryType.VRAM
            total = int(amdsmi.amdsmi_get_gpu_memory_total(handle, vram))
            used = int(amdsmi.amdsmi_get_gpu_memory_usage(handle, vram))
            asic = amdsmi.amdsmi_get_gpu_asic_info(handle)
            driver = driver_version(amdsmi, handle)
            details = {"source": "amdsmi"}
            if asic.get("target_graphics_version"):
                details["gfx_version"] = str(asic["target_graphics_version"])
            devices.append(
                AcceleratorInfo(
                    name=str(asic.get("market_name") or f"AMD GPU {index}"),
                    kind="rocm",
                    index=index,
                    total_memory=total,
                    free_memory=max(total - used, 0),
                    driver=driver,
                    details=details,
                )
            )
        return devices
    except amdsmi.AmdSmiException as error:
        raise GpuProbeError(f"amdsmi: {error}") from error
    finally:
        with contextlib.suppress(amdsmi.AmdSmiException):  # the devices read stand
            amdsmi.amdsmi_shut_down()


def parse_rocm_smi_json(output: str) -> list[AcceleratorInfo]:
    """Devices from `rocm-smi ... --json`: one `cardN` object per GPU, plus an optional
    `system` object (the driver version). Warnings printed around the JSON are skipped."""
    start, end = output.find("{"), output.rfind("}")
    if start < 0 or end < start:
        if any(marker in output for marker in NO_GPU_MARKERS):
            return []
        raise GpuProbeError(f"rocm-smi printed no JSON: {quote(output)}")
    try:
        report = json.loads(output[start : end + 1])
    except json.JSONDecodeError as error:
        raise GpuProbeError(f"rocm-smi printed JSON that does not parse ({error})") from error
    if not isinstance(report, dict):
        raise GpuProbeError(f"rocm-smi printed {type(report).__name__}, not an object")
    system = report.get("system")
    driver = system.get("Driver version") if isinstance(system, dict) else None
    devices = []
    for key, card in report.items():
        if not key.startswith("card"):
            continue
        if not isinstance(card, dict) or TOTAL_KEY not in card or USED_KEY not in card:
            raise GpuProbeError(f"rocm-smi's {key} has no {TOTAL_KEY!r} and {USED_KEY!r}")
        try:
            index = int(key.removeprefix("card"))
            total = int(card[TOTAL_KEY])
            used = int(card[USED_KEY])
        except ValueError as error:
            raise GpuProbeError(f"rocm-smi's {key}: {error}") from error
        name = next((str(card[k]) for k in NAME_KEYS if card.get(k)), f"AMD GPU {index}")
        details = {"source": "rocm-smi"}
        if card.get("GFX Version"):
            details["gfx_version"] = str(card["GFX Version"])
        devices.append(
            AcceleratorInfo(
                name=name,
                kind="rocm",
                index=index,
                total_memory=total,
                free_memory=max(total - used, 0),
                driver=str(driver) if driver else None,
                details=details,
            )
        )
    return sorted(devices, key=lambda device: device.index)


async def probe_rocm() -> list[AcceleratorInfo]:
    amdsmi = import_amdsmi()
    if amdsmi is not None:
        return probe_amdsmi(amdsmi)
    tool = find_tool("rocm-smi", ROCM_BIN)
    if tool is None:
        return []
    try:
        output = await run_tool([tool, *ROCM_SMI_ARGS])
    except ToolFailedError as failed:
        if any(marker in failed.output + failed.error for marker in NO_GPU_MARKERS):
            return []
        raise
    return parse_rocm_smi_json(output)


@hookimpl
async def dmr_probe_hardware() -> Sequence[AcceleratorInfo]:
    return await probe_rocm()
