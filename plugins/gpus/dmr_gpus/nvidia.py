"""The NVIDIA probe through NVML (`nvidia-ml-py`): silent where there is no driver,
an error for `dmr status` where the driver answers a query with a failure."""

from __future__ import annotations

from collections.abc import Sequence

from dmr.sdk import AcceleratorInfo, hookimpl

from dmr_gpus.tools import GpuProbeError

VENDOR_ID = 0x10DE  # PCI vendor ID, as Vulkan reports it


def probe_nvidia() -> list[AcceleratorInfo]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []  # no driver or no device: the usual case on a machine without one
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
                    details={"source": "nvml"},
                )
            )
        return devices
    except pynvml.NVMLError as error:
        raise GpuProbeError(f"NVML: {error}") from error
    finally:
        pynvml.nvmlShutdown()


@hookimpl
def dmr_probe_hardware() -> Sequence[AcceleratorInfo]:
    return probe_nvidia()
