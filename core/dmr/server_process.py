"""The pid file of the `dmr serve` for one address, and the process it names.

Below both the server, which writes it at start and removes it at a clean exit, and
the CLI, which reads it to start, find and stop a server (dmr.cli.autostart), so
neither imports the other. Where the file lives: docs/operations.md.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

    from dmr.settings import Settings

__all__ = ["ServerProcess", "is_dmr_serve", "process_exited"]


def is_dmr_serve(cmdline: list[str]) -> bool:
    """`python -m dmr serve` or `.../dmr serve`, whatever the interpreter."""
    if "serve" not in cmdline:
        return False
    before = cmdline[: cmdline.index("serve")]
    return ("-m" in before and "dmr" in before) or any(Path(arg).name == "dmr" for arg in before)


def process_exited(process: psutil.Process) -> bool:
    """Gone, or a zombie: a detached server's exit is reaped by whoever adopted it."""
    import psutil

    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@dataclass(frozen=True)
class ServerProcess:
    """The pid file of the `dmr serve` for one address, and the process it names."""

    pid_file: Path

    @classmethod
    def for_settings(cls, settings: Settings) -> ServerProcess:
        socket_path = settings.socket_path
        if settings.port is None and socket_path is not None:
            return cls(socket_path.with_name(socket_path.name + ".pid"))
        return cls(settings.models_path / f"dmr-serve-{settings.port}.pid")

    @property
    def lock_file(self) -> Path:
        return self.pid_file.with_name(self.pid_file.name + ".lock")

    def write(self, pid: int) -> None:
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        # Written whole, then renamed: a reader never sees a half-written pid.
        partial = self.pid_file.with_name(f"{self.pid_file.name}.{os.getpid()}.tmp")
        partial.write_text(f"{pid}\n")
        partial.replace(self.pid_file)

    def recorded_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def remove(self, pid: int | None = None) -> None:
        """Remove the pid file; with `pid`, only while it still names that process
        (a server started since must keep its own)."""
        if pid is not None and self.recorded_pid() != pid:
            return
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()

    def running_pid(self) -> int | None:
        """The recorded pid while it is a live `dmr serve` that was started before the
        pid file was written; None for a stale file (dead pid, or one reused since)."""
        import psutil

        pid = self.recorded_pid()
        if pid is None:
            return None
        try:
            process = psutil.Process(pid)
            written = self.pid_file.stat().st_mtime
            if process_exited(process) or not is_dmr_serve(process.cmdline()):
                return None
            # A pid reused by a later `dmr serve` for another address: not this one's.
            if process.create_time() > written + 1.0:
                return None
        except (psutil.Error, OSError):
            return None
        return pid
