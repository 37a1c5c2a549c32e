"""The Ray driver, run as a child process of `dmr serve`:

    python -m dmr_ray.bridge ADDRESS

Ray's client can block for minutes on an address that does not answer, and ends
its process when the cluster's control store (GCS) is gone for good. Run in the
server, either would hang or kill the one endpoint; here it ends this process,
which the server sees and reports (`placement.RayPlacement`).

Protocol: one JSON object per line. The server writes requests
`{"id": n, "op": "start" | "stop", ...}`; this process answers
`{"id": n, "ok": true, "result": ...}` or `{"id": n, "ok": false, "error": "..."}`,
and tells events: `{"event": "connected" | "nodes", "nodes": [...]}`,
`{"event": "placed", "runner": id}` (Ray started its actor),
`{"event": "exited", "runner": id, "code": n, "reason": "..."}` and
`{"event": "lost", "error": "..."}` (then it exits).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import sys
from typing import IO, Any

__all__ = ["main"]

# Seconds between two looks at the cluster's nodes, and how long one look may take
# before the cluster counts as lost.
NODE_POLL_SECONDS = 1.0
NODE_POLL_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0


class Bridge:
    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._actors: dict[str, Any] = {}
        self._nodes: list[dict[str, Any]] = []
        self._watchers: set[asyncio.Task[None]] = set()

    def emit(self, message: dict[str, Any]) -> None:
        self._out.write(json.dumps(message) + "\n")
        self._out.flush()

    async def connect(self, address: str) -> None:
        import ray

        await asyncio.to_thread(
            ray.init,
            address=address,
            namespace="dmr",
            log_to_driver=False,
            logging_level=logging.WARNING,
            configure_logging=False,
        )
        self._nodes = await asyncio.to_thread(_live_nodes)
        self.emit({"event": "connected", "nodes": self._nodes})

    async def watch_nodes(self) -> None:
        while True:
            await asyncio.sleep(NODE_POLL_SECONDS)
            try:
                nodes = await asyncio.wait_for(asyncio.to_thread(_live_nodes), NODE_POLL_TIMEOUT)
            except Exception as error:
                self.emit({"event": "lost", "error": f"{type(error).__name__}: {error}"})
                os._exit(3)
            if nodes != self._nodes:
                self._nodes = nodes
                self.emit({"event": "nodes", "nodes": nodes})

    async def handle(self, request: dict[str, Any]) -> None:
        try:
            result: Any = None
            if request["op"] == "start":
                result = await self.start(request)
            elif request["op"] == "stop":
                await self.stop(request["runner"])
            else:
                raise ValueError(f"unknown op {request['op']!r}")
        except Exception as error:
            self.emit({"id": request["id"], "ok": False, "error": _message(error)})
            return
        self.emit({"id": request["id"], "ok": True, "result": result})

    async def start(self, request: dict[str, Any]) -> dict[str, Any]:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from dmr_ray.node import NodeRunner

        options: dict[str, Any] = {
            "num_cpus": 0,
            "max_restarts": 0,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(request["node_id"], soft=False),
        }
        if request.get("memory"):
            options["memory"] = int(request["memory"])
        if request.get("gpus"):
            options["num_gpus"] = request["gpus"]
        actor: Any = ray.remote(NodeRunner).options(**options).remote()
        runner = request["runner"]
        self._actors[runner] = actor
        told = asyncio.create_task(self._tell_when_placed(runner, actor))
        self._watchers.add(told)
        told.add_done_callback(self._watchers.discard)
        payload = dict(request["payload"])
        payload["launch"] = base64.b64decode(payload["launch"])
        try:
            result: dict[str, Any] = await asyncio.wait_for(
                actor.start.remote(payload), request.get("timeout") or None
            )
        except BaseException as error:
            self._actors.pop(runner, None)
            ray.kill(actor)
            if isinstance(error, TimeoutError):
                raise RuntimeError(
                    f"the runner was not placed within {request['timeout']:.0f}s (the node"
                    " has no room for it in Ray's accounting, or the model takes longer to"
                    " fetch)"
                ) from None
            raise
        watcher = asyncio.create_task(self.watch(runner, actor))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return result

    async def _tell_when_placed(self, runner: str, actor: Any) -> None:
        """Say when Ray has started the runner's actor (it answers a call while its
        `start` runs): a start that takes long is then either Ray not placing it or
        the node fetching the model and starting the runner, and the log says which."""
        with contextlib.suppress(Exception):  # an actor that never starts says nothing
            await actor.__ray_ready__.remote()
            self.emit({"event": "placed", "runner": runner})

    async def watch(self, runner: str, actor: Any) -> None:
        try:
            code = await actor.wait.remote()
            reason = await actor.failure.remote()
        except Exception as error:
            code, reason = -9, f"was lost with its node ({type(error).__name__})"
            lost = "node" in str(error).lower() and "died" in str(error).lower()
        else:
            lost = False
        if self._actors.pop(runner, None) is not None:
            self.emit(
                {
                    "event": "exited",
                    "runner": runner,
                    "code": code,
                    "reason": reason,
                    "node_lost": lost,
                }
            )

    async def stop(self, runner: str) -> None:
        import ray

        actor = self._actors.pop(runner, None)
        if actor is None:
            return
        with contextlib.suppress(Exception):  # killed below either way
            await asyncio.wait_for(actor.stop.remote(), STOP_TIMEOUT)
        ray.kill(actor)


def _live_nodes() -> list[dict[str, Any]]:
    import ray

    nodes = []
    for node in ray.nodes():  # type: ignore[no-untyped-call]
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        nodes.append(
            {
                "id": node["NodeID"],
                "address": node.get("NodeManagerAddress", ""),
                "cpus": resources.get("CPU", 0.0),
                "gpus": resources.get("GPU", 0.0),
                "memory": resources.get("memory", 0.0),
                "gpu_memory": resources.get("gpu_memory", 0.0),
            }
        )
    return sorted(nodes, key=lambda node: node["id"])


def _message(error: BaseException) -> str:
    """The DmrError's own words from inside a RayTaskError, else the error's."""
    cause = getattr(error, "cause", None) or error
    message = getattr(cause, "message", None)
    return str(message) if isinstance(message, str) else f"{type(cause).__name__}: {cause}"


async def _serve(address: str, out: IO[str]) -> int:
    bridge = Bridge(out)
    try:
        await bridge.connect(address)
    except Exception as error:
        bridge.emit({"event": "failed", "error": _message(error)})
        return 2
    watcher = asyncio.create_task(bridge.watch_nodes())
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tasks: set[asyncio.Task[None]] = set()
    while line := await reader.readline():
        task = asyncio.create_task(bridge.handle(json.loads(line)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    watcher.cancel()
    return 0  # the server closed our stdin: its actors end with this driver


def main() -> None:
    # Ray and its libraries print to stdout: only this protocol may use it.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    address = sys.argv[1]
    code = asyncio.run(_serve(address, out))
    out.flush()
    os._exit(code)  # Ray's threads must not keep a dead driver alive


if __name__ == "__main__":
    main()
