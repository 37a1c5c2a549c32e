"""`GET /logs?follow=&no-engines=`: the server's log and the runners', merged by time.

Both come from the log folder, `MODEL_RUNNER_LOG_DIR` or by default
`<MODELS_PATH>/logs` (`Settings.log_dir`): the server writes `server.log` there
(`server_log_handler`), the scheduler writes `runner-<engine>-<id>-<mode>.log`,
and every line of both starts with the same UTC stamp, so a merge is a stable
sort on it. Lines without a stamp (tracebacks) keep the stamp of the line
before them in their file.

Prompts stay out of these logs: nothing in dmr logs a request body at INFO.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from quart import Blueprint, Response, request

from dmr.errors import DmrError
from dmr.scheduler.runner_process import log_timestamp
from dmr.server.services import get_services

__all__ = ["SERVER_LOG", "blueprint", "merge_lines", "server_log_handler"]

SERVER_LOG = "server.log"
_RUNNER_GLOB = "runner-*.log"
_STAMP = re.compile(rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}")
_FOLLOW_POLL_SECONDS = 0.5


class _UtcFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return log_timestamp(record.created)


def server_log_handler(log_dir: Path) -> logging.Handler:
    """The handler writing the server's log into `log_dir`, stamped as runners' lines are."""
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_dir / SERVER_LOG, encoding="utf-8")
    handler.setFormatter(_UtcFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


@dataclass
class _LogFile:
    """A log being read: where the last read stopped and the last stamp seen."""

    path: Path
    source: str | None  # shown after the stamp for runner lines; None for the server
    offset: int = 0
    stamp: bytes = b""
    pending: bytes = field(default=b"", repr=False)

    def read_new(self) -> list[tuple[bytes, int, bytes]]:
        """Complete lines added since the last call, as (stamp, order, line)."""
        try:
            with self.path.open("rb") as handle:
                size = handle.seek(0, 2)
                if size < self.offset:  # truncated or replaced: start over
                    self.offset, self.pending = 0, b""
                handle.seek(self.offset)
                data = handle.read()
                self.offset += len(data)
        except OSError:
            return []
        *lines, self.pending = (self.pending + data).split(b"\n")
        out: list[tuple[bytes, int, bytes]] = []
        for line in lines:
            match = _STAMP.match(line)
            if match:
                self.stamp = match.group()
                if self.source is not None:
                    rest = line[match.end() :].lstrip(b" ")
                    line = self.stamp + b" [" + self.source.encode() + b"] " + rest
            out.append((self.stamp, len(out), line))
        return out


def _sources(log_dir: Path, engines: bool, known: dict[Path, _LogFile]) -> list[_LogFile]:
    paths = [log_dir / SERVER_LOG]
    if engines:
        paths += sorted(log_dir.glob(_RUNNER_GLOB))
    for path in paths:
        if path not in known and path.exists():
            source = None if path.name == SERVER_LOG else path.stem
            known[path] = _LogFile(path, source)
    return list(known.values())


def merge_lines(files: Iterable[_LogFile]) -> list[bytes]:
    """New lines of every file, ordered by stamp (stable within a file)."""
    entries = []
    for index, log_file in enumerate(files):
        entries += [(stamp, index, order, line) for stamp, order, line in log_file.read_new()]
    entries.sort(key=lambda entry: (entry[0], entry[1], entry[2]))
    return [entry[3] for entry in entries]


def _flag(name: str) -> bool:
    return request.args.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


blueprint = Blueprint("dmr_logs_api", __name__)


@blueprint.get("/logs")
async def logs() -> Response:
    log_dir = get_services().settings.log_dir
    if log_dir is None:
        # Only settings built in code have none; `dmr serve` always has a folder.
        error = DmrError("no logs: this server writes no log files (its settings have no log_dir)")
        error.status, error.code = 404, "not_found"
        raise error
    follow = _flag("follow")
    engines = not _flag("no-engines")
    known: dict[Path, _LogFile] = {}
    first = merge_lines(_sources(log_dir, engines, known))
    if not follow:
        return Response(b"".join(line + b"\n" for line in first), mimetype="text/plain")

    async def stream() -> AsyncIterator[bytes]:
        if first:
            yield b"".join(line + b"\n" for line in first)
        while True:
            await asyncio.sleep(_FOLLOW_POLL_SECONDS)
            # New runners start new files; pick them up as they appear.
            lines = merge_lines(_sources(log_dir, engines, known))
            if lines:
                yield b"".join(line + b"\n" for line in lines)

    response = Response(stream(), mimetype="text/plain")
    response.timeout = None
    return response
