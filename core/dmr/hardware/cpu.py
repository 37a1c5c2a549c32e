"""The CPU probe: always one device, the host's cores and memory."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence

import psutil

from dmr.hookspecs import hookimpl
from dmr.records import AcceleratorInfo


def probe_cpu() -> AcceleratorInfo:
    memory = psutil.virtual_memory()
    return AcceleratorInfo(
        name=platform.processor() or platform.machine() or "cpu",
        kind="cpu",
        index=0,
        total_memory=memory.total,
        free_memory=memory.available,
        cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    )


@hookimpl
def dmr_probe_hardware() -> Sequence[AcceleratorInfo]:
    return [probe_cpu()]
