"""A runner as the scheduler keeps it, and the handle requests get for it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from dmr.records import AcceleratorInfo, EngineSpec, Mode, RunnerLaunch
from dmr.scheduler.admission import device_key
from dmr.scheduler.unix_http import RunnerConnectionError

if TYPE_CHECKING:
    from collections.abc import Coroutine, Iterator

    from dmr.errors import DmrError
    from dmr.records import PlacedRunner
    from dmr.scheduler.runner_process import RunnerProcess
    from dmr.scheduler.unix_http import UnixResponse

__all__ = ["Runner", "RunnerHandle", "RunnerKey", "RunnerTable", "Unloaded", "runner_client"]

# httpx logs every request at INFO: one line per proxied request is noise on the hot path.
logging.getLogger("httpx").setLevel(logging.WARNING)

_LOST_BEFORE_ANSWER = "the runner was lost before it answered"

# (engine name, model ID, mode): one runner each.
RunnerKey = tuple[str, str, Mode]


def runner_client(address: Path | tuple[str, int]) -> httpx.AsyncClient:
    """HTTP to the runner, over its unix socket or (host, port) on a cluster node; no
    read timeout, generations can be slow."""
    # On the transport: a client given its own transport ignores its `limits`, so
    # these were httpx's defaults (20 kept, each 5 s), and a runner idle for 5 s took
    # its next request on a new connection. dmr's runners keep a connection 300 s
    # (`runner_support.serve_runner`); the server lets go of it first. One that a
    # runner closed sooner (llama-server, vLLM: 5 s) is seen closed and not reused.
    limits = httpx.Limits(
        max_connections=None, max_keepalive_connections=64, keepalive_expiry=240.0
    )
    if isinstance(address, tuple):
        host, port = address
        transport = httpx.AsyncHTTPTransport(limits=limits)
        base_url = f"http://{host}:{port}"
    else:
        transport = httpx.AsyncHTTPTransport(uds=str(address), limits=limits)
        base_url = "http://runner"
    return httpx.AsyncClient(
        transport=transport, base_url=base_url, timeout=httpx.Timeout(None, connect=10.0)
    )


async def _abandon(work: asyncio.Future[UnixResponse]) -> None:
    """Stop opening a request nobody will read: cancel it, or drop the connection it
    opened if it got that far (its connection is closed either way)."""
    work.cancel()
    with contextlib.suppress(BaseException):
        (await work).abort()


@dataclass(frozen=True)
class Unloaded:
    """What `Scheduler.unload` did: runners stopped, and requests it cancelled."""

    runners: int
    cancelled_requests: int


@dataclass
class RunnerHandle:
    """What `Scheduler.acquire` yields: where the runner listens and a client for it."""

    model_id: str
    model_name: str
    backend: str
    mode: Mode
    socket_path: Path
    client: httpx.AsyncClient
    # The scheduler's record; None in handles built by tests or other schedulers.
    runner: Runner | None = field(default=None, repr=False, compare=False)
    # (host, port) of a runner on a cluster node; None: `socket_path` on this machine.
    tcp_address: tuple[str, int] | None = None
    # The cluster node it runs on (shown by `ps`); None: this machine.
    node: str | None = None
    # The proxy's open connections to it, dropped when the runner is lost.
    streams: weakref.WeakSet[UnixResponse] = field(
        default_factory=weakref.WeakSet, repr=False, compare=False
    )
    # Set once the runner is lost: requests still waiting for its answer's head end too.
    lost_event: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)

    def mark_lost(self) -> None:
        """A connection to a runner on a cluster node failed: its node may be gone long
        before the cluster says so, so new requests go to the other replicas now."""
        if self.tcp_address is not None and self.runner is not None:
            self.runner.lost = True

    def abort_streams(self) -> None:
        """End every open stream to the runner at once (it died, or its node did), and
        every request still connecting or waiting for the head of its answer."""
        self.lost_event.set()
        for stream in list(self.streams):
            stream.abort()

    def track(self, stream: UnixResponse) -> None:
        """Hold `stream` to be dropped if the runner is lost (at once if it already is)."""
        self.streams.add(stream)
        if self.lost_event.is_set():
            stream.abort()

    async def unless_lost(self, opening: Coroutine[Any, Any, UnixResponse]) -> UnixResponse:
        """`opening` (a request's connect and the head of its answer), ended with a
        `RunnerConnectionError` if the runner is lost first. A runner on a cluster
        node queues a request it has no slot for without a byte of answer; if the
        node stops answering, only this ends the wait (its TCP connection never
        closes)."""
        if self.lost_event.is_set():
            opening.close()
            raise RunnerConnectionError(_LOST_BEFORE_ANSWER)
        work = asyncio.ensure_future(opening)
        lost = asyncio.ensure_future(self.lost_event.wait())
        try:
            await asyncio.wait((work, lost), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled: the client left
            await _abandon(work)
            raise
        finally:
            lost.cancel()
        if not work.done():
            await _abandon(work)
            raise RunnerConnectionError(_LOST_BEFORE_ANSWER)
        return work.result()

    @property
    def address(self) -> Path | tuple[str, int]:
        """Where requests go: the node's (host, port), else the unix socket."""
        return self.tcp_address if self.tcp_address is not None else self.socket_path

    async def use_tcp(self, address: tuple[str, int]) -> None:
        """Talk to the runner at `address` from now on (it was placed on a node)."""
        self.tcp_address = address
        old, self.client = self.client, runner_client(address)
        await old.aclose()

    @property
    def stop_reason(self) -> str | None:
        """Why the scheduler stopped the runner under its requests (`dmr unload`)."""
        return self.runner.stop_reason if self.runner is not None else None

    async def failure(self, wait: float = 1.0) -> str | None:
        """Why the runner died, or None while it lives.

        A broken stream is often seen before the process has exited, hence the
        short wait for the exit.
        """
        if self.stop_reason is not None:
            return self.stop_reason  # stopped on purpose: say why, not how it died
        process = self.runner.process if self.runner is not None else None
        if process is None:
            return None
        if process.returncode is None:
            try:
                await asyncio.wait_for(process.wait(), timeout=wait)
            except TimeoutError:
                if self.runner is not None and self.runner.lost:
                    return f"{process.name} stopped answering: it or its node was lost"
                return None
        return process.failure_message()


class Runner:
    """One (engine, model, mode) runner: its process, users and idle timer."""

    def __init__(
        self,
        *,
        key: RunnerKey,
        spec: EngineSpec,
        launch: RunnerLaunch,
        memory: int,
        keep_alive: float | None,
        socket_dir: Path,
    ) -> None:
        self.key = key
        self.spec = spec
        self.launch = launch
        self.device: AcceleratorInfo = launch.device
        self.memory = memory
        self.keep_alive = keep_alive
        self.socket_dir = socket_dir
        # A local subprocess, or a runner a cluster placement started on a node.
        self.process: RunnerProcess | PlacedRunner | None = None
        self.loading = True
        self.ready = asyncio.Event()
        self.error: DmrError | None = None
        self.in_use = 0
        # Set from its command at load: it takes `POST /cpu-share` (cpu_share.py), and
        # the runner count it was last told (it starts as if alone).
        self.cpu_share = False
        self.cpu_share_sent = 1
        self.last_used = time.monotonic()
        self.last_used_wall = time.time()
        self.unload_when_idle = False
        # A placed runner that stopped answering (`RunnerHandle.mark_lost`).
        self.lost = False
        # Why it was stopped under its requests (`dmr unload`): their clients' error.
        self.stop_reason: str | None = None
        self.idle_task: asyncio.Task[None] | None = None
        self.load_task: asyncio.Task[None] | None = None
        self.watch_task: asyncio.Task[None] | None = None
        self.handle = RunnerHandle(
            model_id=launch.model_id,
            model_name=launch.model_name,
            backend=spec.name,
            mode=launch.mode,
            socket_path=launch.socket_path,
            client=runner_client(launch.socket_path),
            runner=self,
        )

    # Admission reads these through the `Resident` protocol.
    @property
    def device_key(self) -> tuple[str, int]:
        return device_key(self.device)

    @property
    def evictable(self) -> bool:
        return self.in_use == 0 and not self.loading

    @property
    def exited(self) -> bool:
        return self.lost or (self.process is not None and self.process.returncode is not None)

    def touch(self) -> None:
        self.last_used = time.monotonic()
        self.last_used_wall = time.time()

    def cancel_idle_timer(self) -> None:
        if self.idle_task is not None:
            self.idle_task.cancel()
            self.idle_task = None

    async def stop(self) -> None:
        self.cancel_idle_timer()
        if self.load_task is not None and not self.load_task.done():
            self.load_task.cancel()
            with contextlib.suppress(BaseException):
                await self.load_task
        if self.process is not None:
            await self.process.stop()
        if self.watch_task is not None:
            with contextlib.suppress(BaseException):
                await self.watch_task
        await self.handle.client.aclose()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


class RunnerTable:
    """The scheduler's runners: one per (engine, model, mode), or several replicas of
    it on different cluster nodes (`RunnerConfig.replicas`)."""

    def __init__(self) -> None:
        self._by_key: dict[RunnerKey, list[Runner]] = {}

    def replicas(self, key: RunnerKey) -> list[Runner]:
        return list(self._by_key.get(key, ()))

    def add(self, runner: Runner) -> None:
        self._by_key.setdefault(runner.key, []).append(runner)

    def holds(self, runner: Runner) -> bool:
        return any(held is runner for held in self._by_key.get(runner.key, ()))

    def discard(self, runner: Runner) -> bool:
        """Forget `runner`; False when it was not (or no longer) held."""
        held = self._by_key.get(runner.key, [])
        for index, candidate in enumerate(held):
            if candidate is runner:
                del held[index]
                if not held:
                    del self._by_key[runner.key]
                return True
        return False

    def values(self) -> list[Runner]:
        return [runner for held in self._by_key.values() for runner in held]

    def __iter__(self) -> Iterator[Runner]:
        return iter(self.values())

    def runner_keys(self) -> set[RunnerKey]:
        return set(self._by_key)

    def clear(self) -> None:
        self._by_key.clear()
