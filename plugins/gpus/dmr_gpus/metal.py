"""The Apple Metal probe: `system_profiler SPDisplaysDataType -json` (macOS only; the
tool exists nowhere else, so elsewhere there is no device and no error).

A GPU counts when the report says it supports Metal (`spdisplays_mtlgpufamilysupport`
on current macOS, `spdisplays_metalfamily` or `spdisplays_metal` on older releases).
Apple silicon has no VRAM of its own: its memory is the machine's unified memory
(total, and the available memory as free, as psutil reads them from the kernel, the
`hw.memsize` sysctl for the total). A discrete GPU of an Intel Mac reports its VRAM
(`spdisplays_vram`, "8 GB"); macOS gives no free figure for it, so free is its total.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import psutil
from dmr.sdk import AcceleratorInfo, hookimpl

from dmr_gpus.tools import GpuProbeError, find_tool, quote, run_tool

SYSTEM_PROFILER_ARGS = ("SPDisplaysDataType", "-json")
METAL_KEYS = ("spdisplays_mtlgpufamilysupport", "spdisplays_metalfamily", "spdisplays_metal")
VRAM_KEYS = ("spdisplays_vram", "_spdisplays_vram", "spdisplays_vram_shared")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(MB|GB|TB)\s*$", re.IGNORECASE)
_UNITS = {"MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def parse_size(text: str) -> int:
    """system_profiler's "16 GB" / "1536 MB" (binary units, as macOS means them here)."""
    match = _SIZE.match(text)
    if not match:
        raise GpuProbeError(f"system_profiler gave a VRAM size it does not explain: {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _name(item: Mapping[str, Any], index: int) -> str:
    name = str(item.get("sppci_model") or item.get("_name") or f"Metal GPU {index}")
    # Older releases name Apple silicon by a localisation key ("kHW_AppleM1Item").
    return name.removeprefix("kHW_").removesuffix("Item")


def parse_displays(output: str) -> list[AcceleratorInfo]:
    try:
        report = json.loads(output)
    except json.JSONDecodeError as error:
        raise GpuProbeError(f"system_profiler printed no JSON ({error}): {quote(output)}") from None
    items = report.get("SPDisplaysDataType") if isinstance(report, dict) else None
    if not isinstance(items, list):
        raise GpuProbeError("system_profiler's JSON has no SPDisplaysDataType list")
    devices: list[AcceleratorInfo] = []
    for item in items:
        if not isinstance(item, dict) or not any(item.get(key) for key in METAL_KEYS):
            continue
        index = len(devices)
        details = {"source": "system_profiler"}
        if item.get("sppci_cores"):
            details["gpu_cores"] = str(item["sppci_cores"])
        vram = next((str(item[key]) for key in VRAM_KEYS if item.get(key)), None)
        if vram is None:
            memory = psutil.virtual_memory()
            total, free = int(memory.total), int(memory.available)
            details["memory"] = "unified"
        else:
            total = free = parse_size(vram)
            details["memory"] = "dedicated (free memory not reported by macOS)"
        devices.append(
            AcceleratorInfo(
                name=_name(item, index),
                kind="metal",
                index=index,
                total_memory=total,
                free_memory=free,
                details=details,
            )
        )
    return devices


async def probe_metal() -> list[AcceleratorInfo]:
    tool = find_tool("system_profiler")
    if tool is None:
        return []
    return parse_displays(await run_tool([tool, *SYSTEM_PROFILER_ARGS]))


@hookimpl
async def dmr_probe_hardware() -> Sequence[AcceleratorInfo]:
    return await probe_metal()
