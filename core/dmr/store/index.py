"""`models.json`: which manifests the store holds and the tags pointing at them.

Readers never lock (the file is replaced atomically); writers take the store lock
for the whole read-modify-write, so concurrent writers never lose an update.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from filelock import FileLock

from dmr.errors import StoreError
from dmr.store.layout import StoreLayout, atomic_write

__all__ = ["IndexEntry", "ModelIndex"]


@dataclass
class IndexEntry:
    id: str  # sha256:<manifest digest>
    tags: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # layer digests, then the config digest

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "tags": list(self.tags), "files": list(self.files)}


class ModelIndex:
    def __init__(self, layout: StoreLayout) -> None:
        self.layout = layout
        # One lock for every mutation of the store (index, manifests, bundles, blob
        # removal): coarse, but mutations are short and it makes them serialisable.
        self.lock = FileLock(str(layout.lock_file), timeout=600)

    def read(self) -> list[IndexEntry]:
        path = self.layout.index_file
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as error:
            raise StoreError(f"cannot read the model index {path}: {error}") from error
        models = raw.get("models") if isinstance(raw, dict) else None
        entries: list[IndexEntry] = []
        for item in models or []:
            if not isinstance(item, dict) or not isinstance(item.get("id"), str):
                continue  # tolerate foreign junk rather than failing every request
            entries.append(
                IndexEntry(
                    id=item["id"],
                    tags=[t for t in item.get("tags") or [] if isinstance(t, str)],
                    files=[f for f in item.get("files") or [] if isinstance(f, str)],
                )
            )
        return entries

    def write(self, entries: list[IndexEntry]) -> None:
        body = {"models": [entry.to_json() for entry in entries]}
        atomic_write(self.layout.index_file, json.dumps(body, indent=2).encode())

    @contextmanager
    def locked(self) -> Iterator[None]:
        with self.lock:
            yield

    @contextmanager
    def update(self) -> Iterator[list[IndexEntry]]:
        """Read, let the caller change the list in place, write back (under the lock)."""
        with self.lock:
            entries = self.read()
            yield entries
            self.write(entries)
