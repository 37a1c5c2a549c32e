"""llama.cpp's own default thread count, so the runner starts as llama-server does."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_threads"]


def default_threads(cpu_root: Path = Path("/sys/devices/system/cpu")) -> int:
    """One thread per physical core, as llama.cpp's `cpu_get_num_physical_cores`.

    Hyper-threads share a core's arithmetic units, so a second thread per core
    only adds waiting at the barriers of every matrix multiplication. llama.cpp
    counts the distinct `thread_siblings` masks; without sysfs it takes every
    logical CPU up to 4 and half of them beyond. (llama.cpp's extra rule for
    Intel hybrid CPUs, which leaves out the efficiency cores, is not copied:
    `--threads` sets it by hand there.)
    """
    siblings: set[str] = set()
    for path in cpu_root.glob("cpu[0-9]*/topology/thread_siblings"):
        try:
            siblings.add(path.read_text().strip())
        except OSError:
            continue
    if siblings:
        return len(siblings)
    logical = os.cpu_count() or 4
    return logical if logical <= 4 else logical // 2
