"""Where things live inside a store directory, shared with DMR's layout.

The layout: docs/compatibility.md §3.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dmr.errors import InvalidRequestError

__all__ = ["LAYOUT_VERSION", "StoreLayout", "atomic_write", "digest_hex", "is_digest"]

LAYOUT_VERSION = "1.0.0"
_DIGEST = re.compile(r"^sha256:([a-f0-9]{64})$")


def is_digest(text: str) -> bool:
    return bool(_DIGEST.match(text))


def digest_hex(digest: str) -> str:
    """The hex part of `sha256:<hex>`; anything else is refused so that no digest
    read from a manifest or a tarball can name a path outside the store."""
    match = _DIGEST.match(digest)
    if match is None:
        raise InvalidRequestError(f"invalid digest {digest!r}: expected sha256:<64 hex digits>")
    return match.group(1)


def atomic_write(path: Path, data: bytes) -> None:
    """Write through a temp file in the same directory and rename, so readers see
    the old or the new content, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class StoreLayout:
    root: Path

    @property
    def layout_file(self) -> Path:
        return self.root / "layout.json"

    @property
    def index_file(self) -> Path:
        return self.root / "models.json"

    @property
    def lock_file(self) -> Path:
        return self.root / ".models.json.lock"

    @property
    def blobs_dir(self) -> Path:
        return self.root / "blobs" / "sha256"

    @property
    def manifests_dir(self) -> Path:
        return self.root / "manifests" / "sha256"

    @property
    def bundles_dir(self) -> Path:
        return self.root / "bundles" / "sha256"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def prompt_cache_dir(self) -> Path:
        """Runners' prompt caches, one folder per model (docs/scheduler.md)."""
        return self.root / "prompt-cache"

    def prompt_cache(self, model_id: str) -> Path:
        return self.prompt_cache_dir / digest_hex(model_id)

    def blob(self, digest: str) -> Path:
        return self.blobs_dir / digest_hex(digest)

    def incomplete_blob(self, digest: str) -> Path:
        return self.blobs_dir / (digest_hex(digest) + ".incomplete")

    def manifest(self, digest: str) -> Path:
        return self.manifests_dir / digest_hex(digest)

    def bundle(self, digest: str) -> Path:
        return self.bundles_dir / digest_hex(digest)

    def initialise(self) -> None:
        for directory in (self.blobs_dir, self.manifests_dir, self.bundles_dir, self.tmp_dir):
            directory.mkdir(parents=True, exist_ok=True)
        if not self.layout_file.exists():
            atomic_write(self.layout_file, json.dumps({"version": LAYOUT_VERSION}).encode())
