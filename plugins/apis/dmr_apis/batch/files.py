"""The Files API's store: uploaded files (and batch outputs) under `<models>/batch/files`.

Each file is `<id>.data` (the bytes) beside `<id>.json` (its OpenAI file object),
both written to a temporary name first and renamed, so a crash never leaves a
half-written file listed (docs/batch.md).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dmr.sdk import DmrError, InvalidRequestError, PayloadTooLargeError

__all__ = ["PURPOSES", "FileNotFound", "FileStore", "StoredFile", "new_id", "write_json"]

# OpenAI's purposes; only "batch" files can feed a batch.
PURPOSES = frozenset(
    {"assistants", "batch", "fine-tune", "vision", "user_data", "evals", "batch_output"}
)


_FILE_ID = re.compile(r"file_[0-9a-f]{24}")


class FileNotFound(DmrError):
    status = 404
    code = "not_found"


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def write_json(path: Path, value: Any) -> None:
    """Replace `path` with `value`'s JSON all at once (temporary file, fsync, rename)."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with temporary.open("w") as out:
        json.dump(value, out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)


@dataclass(frozen=True)
class StoredFile:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "object": "file",
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


class FileStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def data_path(self, file_id: str) -> Path:
        return self.root / f"{file_id}.data"

    def _meta_path(self, file_id: str) -> Path:
        return self.root / f"{file_id}.json"

    async def create(
        self, filename: str, purpose: str, chunks: AsyncIterator[bytes], limit: int
    ) -> StoredFile:
        if purpose not in PURPOSES - {"batch_output"}:
            raise InvalidRequestError(
                f"'purpose' must be one of {', '.join(sorted(PURPOSES - {'batch_output'}))},"
                f" not {purpose!r}"
            )
        file_id = new_id("file")
        temporary = self.root / f".{file_id}.upload"
        size = 0
        try:
            with temporary.open("wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLargeError(
                            f"the file is larger than the {limit} byte limit (DMR_FILES_MAX_BYTES)"
                        )
                    out.write(chunk)
            return self.adopt(temporary, filename, purpose, file_id=file_id)
        finally:
            temporary.unlink(missing_ok=True)

    def adopt(
        self, source: Path, filename: str, purpose: str, *, file_id: str | None = None
    ) -> StoredFile:
        """Move `source` in as a new file (a rename: needs no more disk space)."""
        file_id = file_id or new_id("file")
        os.replace(source, self.data_path(file_id))
        stored = StoredFile(
            id=file_id,
            bytes=self.data_path(file_id).stat().st_size,
            created_at=int(time.time()),
            filename=filename,
            purpose=purpose,
        )
        write_json(self._meta_path(file_id), asdict(stored))
        return stored

    def get(self, file_id: str) -> StoredFile:
        # Only IDs this store makes name a file: anything else (a path, a name too
        # long for the file system) is simply not found.
        if not _FILE_ID.fullmatch(file_id) or not self._meta_path(file_id).is_file():
            raise FileNotFound(f"No such File object: {file_id}")
        path = self._meta_path(file_id)
        return StoredFile(**json.loads(path.read_text()))

    def list(
        self, *, purpose: str | None = None, order: str = "desc", after: str | None = None
    ) -> list[StoredFile]:
        files = []
        for meta in self.root.glob("file_*.json"):
            try:
                stored = StoredFile(**json.loads(meta.read_text()))
            except (OSError, ValueError, TypeError):
                continue  # a file being deleted
            if purpose is None or stored.purpose == purpose:
                files.append(stored)
        files.sort(key=lambda f: (f.created_at, f.id), reverse=order != "asc")
        if after is not None:
            ids = [f.id for f in files]
            files = files[ids.index(after) + 1 :] if after in ids else []
        return files

    def delete(self, file_id: str) -> None:
        self.get(file_id)
        self._meta_path(file_id).unlink(missing_ok=True)
        self.data_path(file_id).unlink(missing_ok=True)

    def copy_out(self, file_id: str, target: Path) -> None:
        shutil.copyfile(self.data_path(file_id), target)
