"""GPU probes for dmr, one entry point per backend (docs/scheduler.md, "Hardware probes").

Each module implements `dmr_probe_hardware`: a machine without that GPU, its
driver or its tool gets no device and no error; a tool that fails or prints
something unreadable raises `GpuProbeError`, which `dmr status` shows.
"""

from dmr_gpus.tools import GpuProbeError

__all__ = ["GpuProbeError"]
