"""The head's side: the Ray bridge process, the cluster's nodes as devices, and each
placed runner as the scheduler sees it (docs/cluster.md)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import pickle
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dmr.sdk import AcceleratorInfo, DmrError, RunnerCommand, RunnerError, RunnerLaunch, Store
from dmr.sdk.cluster import Settings

__all__ = ["RayPlacement", "RayRunner", "node_device"]

log = logging.getLogger(__name__)

# Seconds a placement may take: the node pulls the model and starts its runner.
PLACE_TIMEOUT = 900.0
# Seconds between two log lines about a placement still waiting.
PLACE_NOTE_SECONDS = 60.0
# Seconds to wait for the bridge to answer a stop.
STOP_TIMEOUT = 30.0


class ClusterUnreachableError(DmrError):
    status = 503
    code = "cluster_unreachable"


def node_device(node: dict[str, Any]) -> AcceleratorInfo | None:
    """A live Ray node as the device admission budgets: its declared `memory` (and
    `gpu_memory` on a node with GPUs, since Ray does not know VRAM). None for a node
    that offers no CPU or GPU to runners (a head started with `--num-cpus 0`)."""
    cpus, gpus = int(node.get("cpus", 0)), int(node.get("gpus", 0))
    if cpus <= 0 and gpus <= 0:
        return None
    memory = int(node.get("gpu_memory") or 0) if gpus else int(node.get("memory", 0))
    memory = memory or int(node.get("memory", 0))
    short = str(node["id"])[:8]
    return AcceleratorInfo(
        name=f"ray node {node.get('address', '?')} ({short})",
        kind="cuda" if gpus else "cpu",
        index=0,
        total_memory=memory,
        free_memory=memory,
        cores=cpus or None,
        details={"address": str(node.get("address", "")), "ray_node_id": str(node["id"])},
        node=str(node["id"]),
    )


class RayPlacement:
    """Runners on a Ray cluster, through the bridge child process (`dmr_ray.bridge`)."""

    name = "ray"

    def __init__(self, settings: Settings) -> None:
        assert settings.ray_address
        self.address = settings.ray_address
        self.settings = settings
        self._store = Store.open(settings.models_path)
        self._process: asyncio.subprocess.Process | None = None
        self._nodes: list[dict[str, Any]] = []
        self._error: str | None = None
        self._stderr: deque[str] = deque(maxlen=40)
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._runners: dict[str, RayRunner] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = False
        self._closing = False
        self._changed: Callable[[], None] | None = None

    # ---------------------------------------------------------------- connection

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dmr_ray.bridge", self.address,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=1 << 24,
        )  # fmt: skip
        first: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._tasks = [
            asyncio.create_task(self._read_events(first), name="ray bridge events"),
            asyncio.create_task(self._read_stderr(), name="ray bridge log"),
        ]
        timeout = self.settings.ray_connect_timeout
        try:
            event = await asyncio.wait_for(asyncio.shield(first), timeout)
        except TimeoutError:
            event = {"event": "failed", "error": f"no answer within {timeout:g}s"}
        except EOFError:
            event = {"event": "failed", "error": self._bridge_tail() or "the Ray client exited"}
        finally:
            # Past the deadline the bridge's end would still set EOFError on it, which
            # nobody reads ("Future exception was never retrieved" in the log).
            first.cancel()
        if event.get("event") != "connected":
            await self.aclose()
            raise ClusterUnreachableError(
                f"cannot reach the Ray cluster at {self.address}: {event.get('error')}"
                " (is `ray start --head` running there? DMR_RAY_CONNECT_TIMEOUT_SECONDS sets"
                " the wait)"
            )
        self._connected = True
        log.info("connected to the Ray cluster at %s: %d nodes", self.address, len(self._nodes))

    async def aclose(self) -> None:
        self._closing = True
        process = self._process
        if process is not None and process.returncode is None:
            if process.stdin is not None:
                process.stdin.close()  # the bridge ends, and Ray its actors with it
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        for task in self._tasks:
            task.cancel()
        self._connected = False

    @property
    def connected(self) -> bool:
        return self._connected

    def devices(self) -> list[AcceleratorInfo]:
        return [device for node in self._nodes if (device := node_device(node)) is not None]

    def watch(self, changed: Callable[[], None]) -> None:
        self._changed = changed

    def _tell_changed(self) -> None:
        if self._changed is not None and not self._closing:
            self._changed()

    def status(self) -> dict[str, Any]:
        return {
            "placement": self.name,
            "address": self.address,
            "connected": self._connected,
            "nodes": [device.name for device in self.devices()],
            "error": self._error,
        }

    # ---------------------------------------------------------------- runners

    def place(
        self, engine: str, launch: RunnerLaunch, *, name: str, memory: int, log_path: Path | None
    ) -> RayRunner:
        return RayRunner(self, engine, launch, name=name, memory=memory)

    def request(self, runner: RayRunner) -> dict[str, Any]:
        """The bridge's `start` request for `runner` (tags for the node to pull by)."""
        launch = runner.launch
        payload: dict[str, Any] = {
            "launch": base64.b64encode(pickle.dumps(launch)).decode(),
            "tags": list(self._tags(launch.model_id)),
            "engine": runner.engine,
            "name": runner.name,
            "node_name": launch.device.name,
            "shared_root": (
                str(self.settings.models_path) if self.settings.ray_shared_store else None
            ),
            "draft": None,
        }
        draft = launch.config.speculative_draft_model
        if draft and launch.draft_bundle_dir is not None:
            stored = self._store.get(draft)
            payload["draft"] = {"id": stored.id, "tags": list(stored.tags)}
        return {
            "op": "start",
            "runner": runner.id,
            "node_id": launch.device.node,
            "memory": runner.memory,
            "gpus": 1 if launch.device.is_gpu else 0,
            "timeout": PLACE_TIMEOUT,
            "payload": payload,
        }

    def _tags(self, model_id: str) -> tuple[str, ...]:
        stored = self._store.find(model_id)
        return stored.tags if stored is not None else ()

    async def call(self, message: dict[str, Any], seconds: float) -> Any:
        process = self._process
        if process is None or process.stdin is None or not self._connected:
            raise ClusterUnreachableError(f"the Ray cluster at {self.address} is not connected")
        number = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[number] = future
        try:
            process.stdin.write((json.dumps({"id": number, **message}) + "\n").encode())
            await process.stdin.drain()
            return await asyncio.wait_for(future, seconds)
        finally:
            self._calls.pop(number, None)

    def register(self, runner: RayRunner) -> None:
        self._runners[runner.id] = runner

    def forget(self, runner: RayRunner) -> None:
        self._runners.pop(runner.id, None)

    # ---------------------------------------------------------------- events

    async def _read_events(self, first: asyncio.Future[dict[str, Any]]) -> None:
        assert self._process is not None and self._process.stdout is not None
        while line := await self._process.stdout.readline():
            message = json.loads(line)
            if "id" in message:
                future = self._calls.get(message["id"])
                if future is not None and not future.done():
                    if message["ok"]:
                        future.set_result(message.get("result"))
                    else:
                        future.set_exception(RunnerError(str(message["error"])))
            elif message.get("event") in ("connected", "failed"):
                self._nodes = message.get("nodes", [])
                if not first.done():
                    first.set_result(message)
            else:
                self._on_event(message)
        if not first.done():
            first.set_exception(EOFError())
        self._lost(self._error or self._bridge_tail() or "the Ray client exited")

    def _on_event(self, message: dict[str, Any]) -> None:
        kind = message.get("event")
        if kind == "nodes":
            before = {node["id"] for node in self._nodes}
            self._nodes = message["nodes"]
            after = {node["id"] for node in self._nodes}
            if before != after:
                log.info("Ray nodes now: %s", ", ".join(d.name for d in self.devices()))
                self._end_runners_off(after)
                self._tell_changed()
        elif kind == "exited":
            runner = self._runners.get(message["runner"])
            if runner is not None:
                if message.get("node_lost"):
                    self._drop_node(runner.launch.device.node)
                runner.exited(int(message["code"]), str(message["reason"]))
        elif kind == "placed":
            runner = self._runners.get(message["runner"])
            if runner is not None:
                runner.placed()
        elif kind == "lost":
            self._error = str(message.get("error"))

    def _end_runners_off(self, nodes: set[str]) -> None:
        """Runners on a node that left the cluster are lost, those still starting too:
        Ray keeps an actor bound to a dead node pending, and its start waited out
        PLACE_TIMEOUT (15 minutes) with a request waiting on it."""
        for runner in list(self._runners.values()):
            if runner.launch.device.node not in nodes:
                runner.exited(-9, "was lost with its node (it left the Ray cluster)")

    def _drop_node(self, node: str | None) -> None:
        """Leave out a node Ray reported dead under a runner until the next look at the
        nodes: the runner's replacement, placed at once, must not go back there."""
        if any(known["id"] == node for known in self._nodes):
            self._nodes = [known for known in self._nodes if known["id"] != node]
            log.info("Ray nodes now: %s", ", ".join(d.name for d in self.devices()))

    def _lost(self, reason: str) -> None:
        """The bridge ended: no cluster until the server restarts; runners it placed
        end (Ray stops a driver's actors with it), and new ones start here."""
        was_connected, self._connected = self._connected, False
        self._error = self._error or reason
        for future in self._calls.values():
            if not future.done():
                future.set_exception(ClusterUnreachableError(f"lost the Ray cluster: {reason}"))
        for runner in list(self._runners.values()):
            runner.exited(-9, f"was lost with the Ray cluster ({reason})")
        self._tell_changed()
        if was_connected and not self._closing:
            log.error(
                "lost the Ray cluster at %s (%s): new runners start on this machine", self.address,
                reason,
            )  # fmt: skip

    async def _read_stderr(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        while line := await self._process.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            self._stderr.append(text)
            # Ray's own warnings (a resource request it cannot place, a worker that
            # failed to start) are the only word of why a placement waits.
            log.info("ray bridge: %s", text)

    def _bridge_tail(self) -> str:
        lines = [line for line in self._stderr if line.strip()]
        return " | ".join(lines[-3:])


class RayRunner:
    """A runner on a Ray node, as the scheduler handles a local runner process."""

    _numbers = itertools.count(1)

    def __init__(
        self, placement: RayPlacement, engine: str, launch: RunnerLaunch, *, name: str, memory: int
    ) -> None:
        self.placement = placement
        self.engine = engine
        self.launch = launch
        self.name = f"{name} on {launch.device.name}"
        self.memory = memory
        self.id = f"runner-{next(self._numbers)}"
        self.stopping = False
        self._address: tuple[str, int] | None = None
        self._pid: int | None = None
        self._returncode: int | None = None
        self._reason = ""
        self._ended = asyncio.Event()
        self._placed_at: float | None = None

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._returncode

    @property
    def address(self) -> tuple[str, int]:
        assert self._address is not None, "not started"
        return self._address

    async def start(self) -> RunnerCommand:
        self.placement.register(self)
        call = asyncio.ensure_future(
            self.placement.call(self.placement.request(self), PLACE_TIMEOUT + 30)
        )
        ended = asyncio.ensure_future(self._ended.wait())
        try:
            await self._wait_placed(call, ended)
            if not call.done():  # its node left the cluster meanwhile (`_end_runners_off`)
                call.cancel()
                with contextlib.suppress(DmrError, TimeoutError):  # the pending actor goes
                    await self.placement.call({"op": "stop", "runner": self.id}, STOP_TIMEOUT)
                raise RunnerError(f"{self.name} could not start: it {self._reason}")
            result = call.result()
        except RunnerError as error:
            self.exited(1, error.message)
            if error.message.startswith(self.name):
                raise
            raise RunnerError(f"{self.name} could not start: {error.message}") from error
        except BaseException:
            call.cancel()
            self.exited(1, "its start was cancelled")
            raise
        finally:
            ended.cancel()
        self._address = (str(result["host"]), int(result["port"]))
        self._pid = int(result["pid"]) if result.get("pid") else None
        return RunnerCommand(
            argv=tuple(result["argv"]),
            startup_timeout=float(result["startup_timeout"]),
            cpu_share=bool(result["cpu_share"]),
        )

    async def _wait_placed(self, call: asyncio.Future[Any], ended: asyncio.Future[Any]) -> None:
        """Until the start answers or the runner ends, saying every PLACE_NOTE_SECONDS
        which stage it waits in (a placement may take PLACE_TIMEOUT)."""
        started = time.monotonic()
        while not (call.done() or ended.done()):
            await asyncio.wait({call, ended}, timeout=PLACE_NOTE_SECONDS,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            if not (call.done() or ended.done()):
                stage = (
                    "the node is fetching the model and starting the runner"
                    if self._placed_at is not None
                    else "Ray has not started its actor on the node yet"
                )
                log.info("%s: still starting after %.0fs: %s", self.name,
                         time.monotonic() - started, stage)  # fmt: skip

    def placed(self) -> None:
        """Ray started the runner's actor (the bridge's `placed` event)."""
        self._placed_at = time.monotonic()
        log.info("%s: Ray started its actor; the node fetches the model and starts it", self.name)

    def exited(self, code: int, reason: str) -> None:
        if self._returncode is None:
            self._returncode = code
            self._reason = reason
        self.placement.forget(self)
        self._ended.set()

    async def wait_healthy(self, client: Any, startup_timeout: float) -> None:
        deadline = time.monotonic() + startup_timeout
        delay = 0.05
        while True:
            if self._returncode is not None:
                raise RunnerError(self.failure_message())
            with contextlib.suppress(Exception):
                response = await client.get("/health", timeout=5.0)
                if response.status_code == 200:
                    return
            if time.monotonic() >= deadline:
                await self.stop()
                raise RunnerError(f"{self.name} did not become ready within {startup_timeout:.0f}s")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    async def wait(self) -> int:
        await self._ended.wait()
        assert self._returncode is not None
        return self._returncode

    async def stop(self) -> None:
        self.stopping = True
        if self._returncode is None:
            with contextlib.suppress(DmrError, TimeoutError):
                await self.placement.call({"op": "stop", "runner": self.id}, STOP_TIMEOUT)
            self.exited(-15, "was stopped")

    def tail(self, count: int = 20) -> list[str]:
        return [self._reason] if self._reason else []

    def failure_message(self, count: int = 5) -> str:
        return f"{self.name} {self._reason or 'stopped answering'}"
