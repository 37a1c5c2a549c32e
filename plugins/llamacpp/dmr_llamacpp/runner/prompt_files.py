"""Prompt caches on disk, so that they outlive the runner (docs/scheduler.md,
"Prompt caches across reloads").

A completion runner that stops gracefully (idle timeout, `dmr unload`, eviction,
server shutdown: SIGTERM) writes the KV cells of the prompts it holds, in its slots
and in its host cache, as one file per prompt under
`<store>/prompt-cache/<model digest>/<key>/`; the next runner of the same model
with the same key reads them back before it answers its first request. The key is
a hash of what makes KV cells valid for another context: the llama.cpp build and
the settings that shape or compute the cells (`CacheKey`).

A file is `MAGIC`, a 4-byte header length, a JSON header (the key, the token and
state sizes, the kinds of kernel that computed the cells (runner/row_kinds.py), the
SHA-256 of those kinds and the rest), the tokens as int32 and then the state as
`llama_state_seq_get_data` wrote it. Any file that does not read back exactly so
is logged, removed and ignored: a prompt then costs its prefill, never an answer.

Files are least recently used first out once all prompt caches of the store take
more than the cap (`DMR_PROMPT_CACHE_MAX_BYTES`); a file's modification time is
its last use (written or read back).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dmr_llamacpp.runner.row_kinds import KINDS

__all__ = ["CacheKey", "PromptFile", "PromptFiles", "SavedState"]

log = logging.getLogger(__name__)

MAGIC = b"DMRKV\x00\x01\x00"
SUFFIX = ".kv"
_HEADER_LENGTH = struct.Struct("<I")
_MAX_HEADER = 64 * 1024
TOKEN_DTYPE = np.dtype("<i4")
# A temp file this old belongs to no runner still writing (a save takes seconds).
STALE_TEMP_S = 600


@dataclass(frozen=True)
class CacheKey:
    """What a saved sequence state depends on besides its tokens."""

    llama_cpp_version: str
    model_file: str  # name and size of the GGUF: the folder above is the model's digest
    ctx_per_slot: int
    parallel: int
    n_batch: int
    n_ubatch: int
    cache_type_k: str
    cache_type_v: str
    flash_attn: str
    n_gpu_layers: int
    # What the kinds in a file mean. 2: as the cells come back (a sliding-window
    # model's copies are `MOVED` unless settled, prompt_cache.kinds_as_restored); files
    # of 1 recorded them as computed, which the runner no longer corrects on reading.
    kinds_format: int = 2

    @property
    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class SavedState:
    """One prompt to write: its tokens and its sequence state (uint8)."""

    tokens: tuple[int, ...]
    state: np.ndarray
    kinds: Sequence[tuple[int, int]] = ()  # RowKinds.runs of the cells


@dataclass(frozen=True)
class PromptFile:
    path: Path
    tokens: tuple[int, ...]
    state: np.ndarray  # uint8
    kinds: tuple[tuple[int, int], ...] = ()


def _kinds_bytes(kinds: Sequence[Sequence[int]]) -> bytes:
    return json.dumps([[int(end), int(kind)] for end, kind in kinds]).encode()


def _valid_kinds(raw: object, n_tokens: int) -> tuple[tuple[int, int], ...]:
    """The header's runs of row kinds, or ValueError: pairs of ints with increasing
    ends within the tokens."""
    if not isinstance(raw, list):
        raise ValueError("unreadable row kinds")
    runs: list[tuple[int, int]] = []
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(isinstance(value, int) and not isinstance(value, bool) for value in item)
            or not (runs[-1][0] if runs else 0) < item[0] <= n_tokens
            or item[1] not in KINDS
        ):
            raise ValueError("unreadable row kinds")
        runs.append((item[0], item[1]))
    return tuple(runs)


def _token_bytes(tokens: tuple[int, ...]) -> bytes:
    return np.asarray(tokens, dtype=TOKEN_DTYPE).tobytes()


def _file_name(tokens: tuple[int, ...]) -> str:
    return hashlib.sha256(_token_bytes(tokens)).hexdigest()[:32] + SUFFIX


class PromptFiles:
    """The prompt files of one model and key, and the cap over all of `root`."""

    def __init__(self, model_dir: Path, key: CacheKey, max_bytes: int) -> None:
        self.root = model_dir.parent  # <store>/prompt-cache: the cap counts all of it
        self.key = key
        self.folder = model_dir / key.digest
        self.max_bytes = max_bytes

    # ------------------------------------------------------------------ reading

    def load(self) -> Iterator[PromptFile]:
        """The valid files, most recently used first (read as the caller iterates); an
        invalid one is logged, removed and skipped."""
        for path in self._newest_first():
            try:
                saved = self._read(path)
            except (OSError, ValueError) as error:
                log.warning("ignoring the saved prompt cache %s: %s", path, error)
                path.unlink(missing_ok=True)
                continue
            yield saved

    def touch(self, path: Path) -> None:
        """Mark a file used now (least recently used goes first)."""
        with contextlib.suppress(OSError):
            os.utime(path)

    def _newest_first(self) -> list[Path]:
        entries = []
        for path in self.folder.glob("*" + SUFFIX):
            try:
                entries.append((path.stat().st_mtime, path))
            except OSError:
                continue
        return [path for _mtime, path in sorted(entries, reverse=True)]

    def _read(self, path: Path) -> PromptFile:
        with path.open("rb") as handle:
            if handle.read(len(MAGIC)) != MAGIC:
                raise ValueError("not a dmr prompt cache file")
            raw_length = handle.read(_HEADER_LENGTH.size)
            if len(raw_length) != _HEADER_LENGTH.size:
                raise ValueError("truncated header")
            (header_length,) = _HEADER_LENGTH.unpack(raw_length)
            if header_length > _MAX_HEADER:
                raise ValueError("header too long")
            try:
                header = json.loads(handle.read(header_length))
                key = header["key"]
                n_tokens = int(header["tokens"])
                state_bytes = int(header["state_bytes"])
                checksum = str(header["sha256"])
                raw_kinds = header.get("row_kinds", [])
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"unreadable header ({error})") from None
            if key != asdict(self.key):
                raise ValueError("saved for other settings or another llama.cpp")
            if n_tokens <= 0 or state_bytes <= 0:
                raise ValueError("empty")
            tokens = np.empty(n_tokens, dtype=TOKEN_DTYPE)
            state = np.empty(state_bytes, dtype=np.uint8)
            if handle.readinto(tokens.data.cast("B")) != tokens.nbytes:
                raise ValueError("truncated tokens")
            if handle.readinto(state.data) != state_bytes:
                raise ValueError("truncated state")
            if handle.read(1):
                raise ValueError("longer than its header says")
        kinds = _valid_kinds(raw_kinds, n_tokens)
        digest = hashlib.sha256(tokens.tobytes())
        digest.update(state.data)
        if kinds:
            digest.update(_kinds_bytes(kinds))
        if digest.hexdigest() != checksum:
            raise ValueError("checksum mismatch")
        return PromptFile(path, tuple(int(token) for token in tokens), state, kinds)

    # ------------------------------------------------------------------ writing

    def save(self, prompts: list[SavedState], deadline: float) -> int:
        """Write `prompts` (most recently used first) until `deadline`
        (`time.monotonic()`), then hold the store to the cap; the files written."""
        written = 0
        self.folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for order, prompt in enumerate(prompts):
            if time.monotonic() >= deadline:
                log.warning(
                    "saved %d of %d prompt caches: out of time at shutdown",
                    written,
                    len(prompts),
                )
                break
            if prompt.state.nbytes > self.max_bytes:
                continue
            path = self.folder / _file_name(prompt.tokens)
            try:
                if not path.exists():  # the same tokens give the same cells: keep the file
                    self._write(path, prompt)
                # Older prompts a little older: their order is their recency.
                os.utime(path, (now - order * 0.001, now - order * 0.001))
                written += 1
            except OSError as error:
                log.warning("could not save a prompt cache to %s: %s", path, error)
                break
        self.enforce_cap()
        return written

    def _write(self, path: Path, prompt: SavedState) -> None:
        tokens = _token_bytes(prompt.tokens)
        digest = hashlib.sha256(tokens)
        digest.update(prompt.state.data)
        if prompt.kinds:
            digest.update(_kinds_bytes(prompt.kinds))
        header = json.dumps(
            {
                "key": asdict(self.key),
                "tokens": len(prompt.tokens),
                "state_bytes": int(prompt.state.nbytes),
                "row_kinds": [list(run) for run in prompt.kinds],
                "sha256": digest.hexdigest(),
            }
        ).encode()
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(MAGIC + _HEADER_LENGTH.pack(len(header)) + header + tokens)
                handle.write(prompt.state.data)
            os.replace(tmp, path)  # readers see the whole file or none
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def enforce_cap(self) -> None:
        """Remove the least recently used files of every model until all fit the cap,
        and what a runner killed while writing left behind."""
        for leftover in self.root.glob("*/*/.*.tmp"):
            with contextlib.suppress(OSError):
                if time.time() - leftover.stat().st_mtime > STALE_TEMP_S:
                    leftover.unlink()
        files = []
        for path in self.root.glob(f"*/*/*{SUFFIX}"):
            try:
                stat = path.stat()
            except OSError:
                continue
            files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _mtime, size, _path in files)
        for _mtime, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
