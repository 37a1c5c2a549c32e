"""One runner subprocess: started from an engine's `RunnerCommand`, watched, stopped.

The runner's stdout and stderr are merged into one pipe, kept in a ring buffer
(the last lines explain a crash) and appended to a log file when the server has
a log directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import deque
from pathlib import Path
from typing import IO, TYPE_CHECKING

import httpx

from dmr.errors import RunnerError

if TYPE_CHECKING:
    from dmr.records import RunnerCommand

__all__ = ["RunnerProcess", "explain_exit", "log_timestamp"]

log = logging.getLogger(__name__)

TAIL_LINES = 200
STOP_GRACE_SECONDS = 5.0

# (needles, plain explanation): the first needle found in the runner's last lines wins.
_KNOWN_FAILURES: tuple[tuple[tuple[str, ...], str], ...] = (
    (
        (
            "out of memory",
            "outofmemoryerror",
            "memoryerror",
            "std::bad_alloc",
            "cudamalloc failed",
            "failed to allocate",
            "unable to allocate",
            "cannot allocate memory",
        ),
        "ran out of memory",
    ),
    (
        (
            "failed to load model",
            "error loading model",
            "invalid magic",
            "gguf_init_from_file",
            "unknown model architecture",
            "not a valid",
            "corrupt",
            "unexpected end of file",
        ),
        "could not load the model file (corrupt or unsupported)",
    ),
    (("address already in use",), "could not listen on its socket"),
    (("modulenotfounderror", "no module named"), "is missing a Python package"),
)


def explain_exit(returncode: int | None, tail: list[str]) -> str:
    """A short human explanation of why a runner stopped, from its last output lines."""
    text = "\n".join(tail).lower()
    for needles, explanation in _KNOWN_FAILURES:
        if any(needle in text for needle in needles):
            return explanation
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        if -returncode == signal.SIGKILL:
            return f"was killed ({name}; possibly by the system's out-of-memory killer)"
        return f"was killed ({name})"
    if returncode is None:
        return "stopped answering"
    return f"exited with code {returncode}"


class RunnerProcess:
    """The subprocess behind one runner."""

    def __init__(self, command: RunnerCommand, *, name: str, log_path: Path | None) -> None:
        self.command = command
        self.name = name
        self.log_path = log_path
        self._lines: deque[str] = deque(maxlen=TAIL_LINES)
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self.stopping = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process else None

    def tail(self, count: int = 20) -> list[str]:
        return list(self._lines)[-count:]

    def failure_message(self, count: int = 5) -> str:
        """`<name> <explanation>: <last lines>`, the text clients and logs see."""
        tail = [line for line in self.tail(40) if line.strip()]
        message = f"{self.name} {explain_exit(self.returncode, tail)}"
        if tail:
            message += ": " + " | ".join(line.strip() for line in tail[-count:])
        return message

    async def start(self) -> None:
        env = dict(os.environ)
        env.update(self.command.env)
        # Runners stay in the server's process group, so killing the group (a
        # supervisor, the test fixtures) takes every runner with it.
        self._process = await asyncio.create_subprocess_exec(
            *self.command.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=str(self.command.cwd) if self.command.cwd else None,
        )
        self._reader = asyncio.create_task(self._read_output(), name=f"output of {self.name}")

    async def _read_output(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        log_file = None
        if self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                log_file = self.log_path.open("ab")
        # Read blocks, not lines: a runner printing a huge line (a progress bar
        # redrawn with \r) must never fill the pipe and block on its own output.
        pending = b""
        try:
            while chunk := await self._process.stdout.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                if len(pending) > 65536:
                    lines.append(pending)
                    pending = b""
                if log_file is not None and lines:
                    _write_stamped(log_file, lines)
                self._lines.extend(line.decode(errors="replace").rstrip("\r") for line in lines)
            if pending:
                if log_file is not None:
                    _write_stamped(log_file, [pending])
                self._lines.append(pending.decode(errors="replace").rstrip("\r"))
        finally:
            if log_file is not None:
                log_file.close()

    async def wait(self) -> int:
        assert self._process is not None
        code = await self._process.wait()
        if self._reader is not None:
            # The pipe drains right after exit; the last lines are what explain a crash.
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(self._reader), timeout=2.0)
        return code

    async def wait_healthy(self, client: httpx.AsyncClient, startup_timeout: float) -> None:
        """Poll `GET /health` until 200; a runner that exits or never answers fails."""
        assert self._process is not None
        deadline = time.monotonic() + startup_timeout
        delay = 0.02
        while True:
            if self._process.returncode is not None:
                await self.wait()
                raise RunnerError(self.failure_message())
            try:
                response = await client.get("/health", timeout=5.0)
                if response.status_code == 200:
                    return
            except httpx.TransportError:
                pass  # the socket is not there yet
            if time.monotonic() >= deadline:
                await self.stop()
                raise RunnerError(
                    f"{self.name} did not become ready within {startup_timeout:.0f}s: "
                    + " | ".join(self.tail(3))
                )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds."""
        process = self._process
        if process is None:
            return
        self.stopping = True
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout=grace)
            except TimeoutError:
                log.warning("%s ignored SIGTERM; killing it", self.name)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(self._reader, timeout=2.0)


def _write_stamped(log_file: IO[bytes], lines: list[bytes]) -> None:
    # The server's own log uses the same stamp, so `/logs` can merge both by time.
    stamp = log_timestamp().encode()
    log_file.write(b"".join(stamp + b" " + line.rstrip(b"\r") + b"\n" for line in lines))
    log_file.flush()


def log_timestamp(seconds: float | None = None) -> str:
    """`2026-01-31 12:00:00,123` in UTC, as the server's log lines start."""
    now = time.time() if seconds is None else seconds
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now)) + f",{int(now * 1000) % 1000:03d}"
