"""The local model store (SPEC §3). Placeholder until the store lands."""

from __future__ import annotations

from pathlib import Path


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def open(cls, root: Path) -> Store:
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    def disk_usage(self) -> int:
        return 0
