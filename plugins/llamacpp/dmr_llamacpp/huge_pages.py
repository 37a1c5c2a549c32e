"""Model weights in transparent huge pages, where the CPU computes from them.

A decode step reads every weight once, so on the CPU it is bound by how fast the
weights stream from memory, and with 4 KiB pages a step of a 0.6B Q8_0 model walks
about 140,000 pages. In memory that the kernel backs with 2 MiB pages, a bare
one-token step of that model took 24.2 ms instead of 27.9 ms with the file mapped,
SmolLM2's 8.5 instead of 9.2 ms (`python bench/weights_placement.py`,
docs/scheduler.md "Weights in huge pages").

llama.cpp maps the GGUF file (`mmap`) by default, as llama-server, Docker Model
Runner and Ollama run it: those are page-cache pages, which Linux maps 4 KiB at a
time. With `--no-mmap` it reads the weights into a buffer it allocates, and glibc
asks the kernel for huge pages for such large allocations when its tunable
`glibc.malloc.hugetlb=1` is set (glibc 2.35 and later; the kernel's
`transparent_hugepage` mode must not be `never`). Tunables are read when a
process starts, so the engine sets it in the runner's environment.

The cost: the weights are the runner's own memory, not shared page cache, and a
load copies them from the page cache into pages the kernel must first find and
clear: the 546 MiB model loaded in 1.2-2.5 s, against 1.1-1.4 s mapped. dmr's memory
estimate already counts the whole file for every runner.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["HUGE_PAGE_TUNABLE", "anon_huge_page_bytes", "huge_page_env", "huge_pages_available"]

HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# The first glibc with the `glibc.malloc.hugetlb` tunable; older ones ignore it.
FIRST_GLIBC = (2, 35)


def _glibc_version() -> tuple[int, int] | None:
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        return None
    if not text or not text.startswith("glibc "):
        return None
    try:
        major, minor = text.split()[1].split(".")[:2]
        return int(major), int(minor)
    except (IndexError, ValueError):
        return None


def _thp_mode(path: Path) -> str | None:
    """The kernel's selected mode, the bracketed word of "always [madvise] never"."""
    try:
        text = path.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def huge_pages_available(thp_mode: Path = THP_MODE, glibc: tuple[int, int] | None = None) -> bool:
    """Whether a runner started with `huge_page_env` gets its weights in huge pages:
    Linux's transparent huge pages on (`always` or `madvise`) and a glibc that knows the
    tunable. `glibc`: the version to judge (None: this process's; no glibc, no)."""
    version = glibc or _glibc_version()
    if version is None or version < FIRST_GLIBC:
        return False
    return _thp_mode(thp_mode) in {"always", "madvise"}


def huge_page_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The runner's `GLIBC_TUNABLES`: the tunable added to any the user set."""
    current = environ.get("GLIBC_TUNABLES", "")
    tunables = [part for part in current.split(":") if part]
    if not any(part.startswith("glibc.malloc.hugetlb=") for part in tunables):
        tunables.append(HUGE_PAGE_TUNABLE)  # a value the user chose stays theirs
    return {"GLIBC_TUNABLES": ":".join(tunables)}


def anon_huge_page_bytes(rollup: Path = Path("/proc/self/smaps_rollup")) -> int:
    """Bytes of this process's memory in transparent huge pages (0 where it cannot tell)."""
    try:
        text = rollup.read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024  # in kB
    return 0
