"""Sizes and parameter counts as Docker Model Runner prints them (`1.23 GiB`, `135.00 M`).

A module of its own: the CLI prints them without importing the packaging code.
"""

from __future__ import annotations

__all__ = ["human_parameters", "human_size"]


def human_size(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def human_parameters(count: int) -> str:
    for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return str(count)
