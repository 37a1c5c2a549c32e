"""The CLI starts `dmr serve` itself when a command needs a server and none answers.

As Docker Model Runner's standalone mode starts its runner for `docker model`
commands. The server is started detached (its own session, stdin from /dev/null)
with the CLI's environment, so it serves the same `MODELS_PATH` at the same address:
TCP 127.0.0.1:12434 by default (`MODEL_RUNNER_PORT`, `MODEL_RUNNER_BIND`), or only
the unix socket `MODEL_RUNNER_SOCK` when that is set without a port. The CLI talks
to it over TCP (a loopback connect costs what a unix one does, well under the
command's own ~0.1 s), and it keeps running after the command: `dmr stop-runner`
stops it. Nothing is started when `MODEL_RUNNER_HOST` points somewhere (that
server is someone else's) or `DMR_NO_AUTOSTART=1`.

Files, keyed by the address the server listens on (one server per address):
- pid file: `<MODELS_PATH>/dmr-serve-<port>.pid`, or `<MODEL_RUNNER_SOCK>.pid`
  beside a socket-only server's socket. `dmr serve` writes it at start and removes
  it at a clean exit, so a server started by hand is known to `dmr stop-runner` too.
- lock: the pid file's path + `.lock`, held around "probe again, start, wait until
  it answers", so that commands racing to start a server leave exactly one.
- log: the started server's stdout and stderr, appended to `server-output.log` in
  the server's log folder (`MODEL_RUNNER_LOG_DIR`, by default `<MODELS_PATH>/logs`);
  `server.log` there is the server's own stamped log, which `dmr logs` reads.

Every command comes through `ensure_server`, so the path where a server already
answers is one connect() and the imports here stay light: psutil, filelock and
subprocess (tens of milliseconds together) are imported only to start or stop one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn
from urllib.parse import urlsplit

from dmr.cli.http import TransportError
from dmr.server_process import ServerProcess, process_exited
from dmr.settings import Settings, default_log_dir

if TYPE_CHECKING:
    import subprocess

    import psutil

__all__ = [
    "AUTOSTART_OFF_VARIABLE",
    "ServerAddress",
    "ServerStart",
    "ServerUnavailableError",
    "client_address",
    "ensure_server",
    "explicit_address",
    "served_address",
    "server_log_path",
    "start_server",
    "stop_server",
]

AUTOSTART_OFF_VARIABLE = "DMR_NO_AUTOSTART"
START_TIMEOUT_SECONDS = 60.0
# SIGTERM first: the server stops its runners (hypercorn's graceful timeout is 5 s).
STOP_TIMEOUT_SECONDS = 20.0
_PROBE_TIMEOUT_SECONDS = 1.0
_POLL_SECONDS = 0.1
_LOG_TAIL_LINES = 20
_WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})


class ServerUnavailableError(TransportError):
    """Nothing answers and no server may be started here.

    A TransportError, so every command reports it where it reports a server it
    cannot reach (`dmr status` says "not running"); the message says why nothing
    was started.
    """


@dataclass(frozen=True)
class ServerAddress:
    """Where a server listens: a base URL, carried over a unix socket when one is set."""

    base_url: str
    socket_path: Path | None = None
    # What chose it, for errors: `MODEL_RUNNER_HOST`, or `context NAME` (dmr.cli.contexts).
    origin: str = "MODEL_RUNNER_HOST"
    # A named context's TLS settings: a CA file to verify with, or no verification.
    ca_cert: str = ""
    skip_verify: bool = False

    def __str__(self) -> str:
        return f"unix socket {self.socket_path}" if self.socket_path else self.base_url

    def answers(self, timeout: float = _PROBE_TIMEOUT_SECONDS) -> bool:
        """Whether something accepts a connection there: a connect, no request (~1 ms)."""
        try:
            if self.socket_path is not None:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(timeout)
                    sock.connect(str(self.socket_path))
            else:
                parts = urlsplit(self.base_url)
                port = parts.port or (443 if parts.scheme == "https" else 80)
                with socket.create_connection((parts.hostname or "127.0.0.1", port), timeout):
                    pass
        except (OSError, ValueError):
            return False
        return True


def explicit_address() -> ServerAddress | None:
    """`MODEL_RUNNER_HOST` (a URL, `host:port`, or `unix:///path`); else the active named
    context's host (`dmr context use NAME`, dmr.cli.contexts), as Docker Model Runner's
    CLI picks its server."""
    host = os.environ.get("MODEL_RUNNER_HOST")
    if not host:
        from dmr.cli.context_store import ContextFileError, active_context

        try:
            chosen = active_context()
        except ContextFileError as error:
            raise ServerUnavailableError(f"{error} (the named contexts of `dmr context`)") from None
        if chosen is None:
            return None
        url = chosen.host.rstrip("/")
        if chosen.tls and url.startswith("http://"):
            url = "https://" + url.removeprefix("http://")
        return ServerAddress(
            url, origin=f"context {chosen.name}", ca_cert=chosen.ca_cert,
            skip_verify=chosen.skip_verify,
        )  # fmt: skip
    if host.startswith("unix://"):
        return ServerAddress("http://dmr", Path(host.removeprefix("unix://")))
    if "://" not in host:
        host = f"http://{host}"
    return ServerAddress(host.rstrip("/"))


def served_address(settings: Settings) -> ServerAddress:
    """Where `dmr serve` with these settings listens: its TCP address, by default
    `http://127.0.0.1:12434`, which every client can be given (`status --json`'s
    `endpoint`); the unix socket only for a server that has no port."""
    if settings.port is None:
        if settings.socket_path is None:
            raise ValueError("nothing to listen on: neither a TCP port nor a unix socket is set")
        return ServerAddress("http://dmr", settings.socket_path)
    host = "127.0.0.1" if settings.host in _WILDCARD_BINDS else settings.host
    host = f"[{host}]" if ":" in host else host
    return ServerAddress(f"http://{host}:{settings.port}")


def client_address(settings: Settings | None = None) -> ServerAddress:
    """Where the CLI looks for the server: `MODEL_RUNNER_HOST`; else where `dmr serve`
    in this environment listens (`MODEL_RUNNER_PORT`, by default 12434 on loopback,
    where a Docker Model Runner would answer too; or `MODEL_RUNNER_SOCK` alone)."""
    explicit = explicit_address()
    if explicit is not None:
        return explicit
    return served_address(settings or Settings.from_env())


def server_log_path(settings: Settings) -> Path:
    """Where a server started by the CLI writes its stdout and stderr."""
    # Not server.log: that is the server's own stamped log (`dmr logs`); keep it single.
    log_dir = settings.log_dir or default_log_dir(settings.models_path)
    return log_dir / "server-output.log"


def autostart_disabled() -> bool:
    value = os.environ.get(AUTOSTART_OFF_VARIABLE, "").strip().lower()
    return value in {"1", "true", "yes", "on"}


def _pid_exited(pid: int) -> bool:
    import psutil

    try:
        return process_exited(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return True


# --------------------------------------------------------------------------- start


@dataclass(frozen=True)
class ServerStart:
    """The server a command will talk to, and whether this command started it."""

    address: ServerAddress
    pid: int | None
    started_here: bool
    log_path: Path | None = None


def _fail(message: str) -> NoReturn:
    from dmr.cli.errors import fail

    fail(message)


@contextlib.contextmanager
def _start_lock(server: ServerProcess) -> Iterator[None]:
    """Held while a server starts or stops at this address; waits for another holder."""
    import filelock

    server.lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(server.lock_file), timeout=START_TIMEOUT_SECONDS + 15)
    try:
        lock.acquire()
    except filelock.Timeout:
        _fail(f"another dmr command has held {server.lock_file} for too long; try again")
    try:
        yield
    finally:
        lock.release()


def ensure_server() -> ServerStart:
    """A server that answers: the one running, else one started here (said on stderr).

    Raises ServerUnavailableError when none answers and none may be started; exits
    with `error: ...` when a start was tried and failed.
    """
    explicit = explicit_address()
    if explicit is not None:
        if explicit.answers():
            return ServerStart(explicit, None, started_here=False)
        if explicit.origin != "MODEL_RUNNER_HOST":
            raise ServerUnavailableError(
                f"cannot reach the server of {explicit.origin} at {explicit}: that server is"
                " not started here (`dmr context use default` goes back to the local one)"
            )
        raise ServerUnavailableError(
            f"cannot reach the dmr server at {explicit}: MODEL_RUNNER_HOST is set, so none"
            " was started (unset it to have dmr start one)"
        )
    settings = Settings.from_env()
    address = client_address(settings)
    if address.answers():
        return ServerStart(address, None, started_here=False)
    if autostart_disabled():
        where = served_address(settings)
        also = f" (nor at {address})" if address != where else ""
        raise ServerUnavailableError(
            f"cannot reach the dmr server at {where}{also}: {AUTOSTART_OFF_VARIABLE} is set,"
            " so none was started (`dmr start-runner` starts one)"
        )
    return start_server(settings)


def start_server(settings: Settings) -> ServerStart:
    """Start `dmr serve` for these settings unless one answers or is starting there."""
    address = served_address(settings)
    server = ServerProcess.for_settings(settings)
    with _start_lock(server):
        if address.answers():  # another command started it while this one waited
            return ServerStart(address, server.running_pid(), started_here=False)
        pid = server.running_pid()
        if pid is not None:
            # Still starting (by hand, or before this lock existed): wait for it rather
            # than start a second server that would take over its socket.
            _wait_until_answers(address, server, pid, None, server_log_path(settings))
            return ServerStart(address, pid, started_here=False)
        server.remove()  # stale: its process died, or the pid is some other program's now
        started = _spawn(settings, address, server)
    # A `--json` call is read by a program: Docker Compose parses `ls --json` and
    # `status --json` with stderr and stdout together, so the start is only logged.
    if "--json" not in sys.argv[1:]:
        print(
            f"Started the dmr server (pid {started.pid}, log: {started.log_path});"
            " `dmr stop-runner` stops it.",
            file=sys.stderr,
            flush=True,
        )
    return started


def _spawn(settings: Settings, address: ServerAddress, server: ServerProcess) -> ServerStart:
    import subprocess

    log_path = server_log_path(settings)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"--- {stamp} dmr serve, started by the dmr CLI\n".encode())
        log.flush()
        log_offset = log.tell()  # where this start's lines begin, for an error's tail
        # The same environment, so the same store and address; its own session, so
        # the terminal's Ctrl-C and hang-up stay with this command.
        process = subprocess.Popen(
            [sys.executable, "-m", "dmr", "serve"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server.write(process.pid)  # `dmr serve` writes it too; this covers its start-up
    _wait_until_answers(address, server, process.pid, process, log_path, log_offset)
    return ServerStart(address, process.pid, started_here=True, log_path=log_path)


def _wait_until_answers(
    address: ServerAddress,
    server: ServerProcess,
    pid: int,
    process: subprocess.Popen[bytes] | None,
    log_path: Path,
    log_offset: int = 0,
) -> None:
    """Poll until the server answers; exit with its log's last lines if it dies or hangs."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not address.answers():
        code = process.poll() if process is not None else None
        if code is not None or (process is None and _pid_exited(pid)):
            server.remove(pid)
            why = f"exited with code {code}" if code is not None else "exited"
            tail = _log_tail(log_path, log_offset)
            _fail(f"the dmr server (pid {pid}) {why} while starting{tail}")
        if time.monotonic() > deadline:
            if process is not None:  # ours: leave no half-started server behind
                _kill_group(pid)
                server.remove(pid)
            _fail(
                f"the dmr server (pid {pid}) did not answer at {address} within"
                f" {START_TIMEOUT_SECONDS:.0f} s{_log_tail(log_path, log_offset)}"
            )
        time.sleep(_POLL_SECONDS)


def _log_tail(log_path: Path, offset: int) -> str:
    try:
        with log_path.open("rb") as log:
            log.seek(offset)
            lines = log.read().decode(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
    except OSError:
        return f"; see {log_path}"
    if not lines:
        return f"; its log {log_path} is empty"
    return f"; the last lines of {log_path}:\n" + "\n".join(f"  {line}" for line in lines)


# --------------------------------------------------------------------------- stop


def _kill_group(pid: int) -> None:
    """SIGKILL the server and, when it leads its own process group, its runners."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)


def _wait_exited(process: psutil.Process, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not process_exited(process):
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL_SECONDS)
    return True


def stop_server(settings: Settings) -> int | None:
    """Stop the server the pid file names: SIGTERM, then SIGKILL after a timeout.

    Returns the pid stopped, or None when no server was running (a stale pid file is
    removed). The server stops its runners itself; after a SIGKILL its process group
    (the runners) is killed with it.
    """
    import psutil

    server = ServerProcess.for_settings(settings)
    with _start_lock(server):
        pid = server.running_pid()
        if pid is None:
            server.remove()
            return None
        process = psutil.Process(pid)
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
        except psutil.AccessDenied:
            _fail(f"the dmr server (pid {pid}) is not yours to stop")
        if not _wait_exited(process, STOP_TIMEOUT_SECONDS):
            _kill_group(pid)
            if not _wait_exited(process, 5.0):
                _fail(f"the dmr server (pid {pid}) did not exit, even after SIGKILL")
        server.remove(pid)
    return pid
