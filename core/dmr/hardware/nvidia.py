"""The NVIDIA probe through NVML (`nvidia-ml-py`); silent where there is no driver."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from dmr.hookspecs import hookimpl
from dmr.records import AcceleratorInfo

log = logging.getLogger(__name__)


def probe_nvidia() -> list[AcceleratorInfo]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []  # no driver or no device: the usual case on a CPU machine
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            devices.append(
                AcceleratorInfo(
                    name=str(pynvml.nvmlDeviceGetName(handle)),
                    kind="cuda",
                    index=index,
                    total_memory=int(memory.total),
                    free_memory=int(memory.free),
                    driver=str(driver),
                )
            )
        return devices
    except pynvml.NVMLError as error:
        log.warning("NVML probe failed: %s", error)
        return []
    finally:
        pynvml.nvmlShutdown()


@hookimpl
def dmr_probe_hardware() -> Sequence[AcceleratorInfo]:
    return probe_nvidia()
