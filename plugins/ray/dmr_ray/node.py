"""The Ray actor that runs one runner on its node.

It gets the model onto the node (`node_model.ensure_model`), builds the runner's
command with the node's own engine plugin from the head's `RunnerLaunch` with the
node's paths, starts it as a `RunnerProcess` on a unix socket, and forwards a TCP
port on the node's address to that socket: every engine's runner serves on a unix
socket, so none of them needs to know it is on a cluster. The runner stops when
this actor's process dies (a runner notices its parent is gone: `stop_when_orphaned`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from dmr.sdk import DmrError, RunnerLaunch, Store
from dmr.sdk.cluster import RunnerProcess, engines

from dmr_ray.node_model import ensure_model, node_store_root

__all__ = ["NodeRunner", "runner_host"]

log = logging.getLogger(__name__)

_COPY_CHUNK = 1 << 16


def runner_host() -> str:
    """The address the runner's port listens on: `DMR_RAY_RUNNER_HOST` where set in the
    node's environment (127.0.0.1 for a cluster on one machine), else the node's IP."""
    configured = os.environ.get("DMR_RAY_RUNNER_HOST", "").strip()
    if configured:
        return configured
    import ray

    return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]


class NodeRunner:
    """One runner on this node (created with `ray.remote(NodeRunner)` by the bridge)."""

    def __init__(self) -> None:
        self._process: RunnerProcess | None = None
        self._server: asyncio.Server | None = None
        self._socket_dir: Path | None = None

    async def start(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Model, command, process, port: {"host", "port", "pid", "argv",
        "startup_timeout", "cpu_share"}. Raises `DmrError` with what went wrong."""
        launch: RunnerLaunch = pickle.loads(payload["launch"])
        node = str(payload["node_name"])
        shared = payload.get("shared_root")
        stored = await ensure_model(launch.model_id, payload["tags"], node=node, shared_root=shared)
        draft_dir = None
        if payload.get("draft") is not None:
            draft = payload["draft"]
            draft_model = await ensure_model(
                draft["id"], draft["tags"], node=node, shared_root=shared
            )
            draft_dir = draft_model.bundle_dir
        self._socket_dir = Path(tempfile.mkdtemp(prefix="dmr-ray-runner-"))
        cache_store = Store.open(Path(shared) if shared else node_store_root())
        launch = replace(
            launch,
            bundle_dir=stored.bundle_dir,
            draft_bundle_dir=draft_dir,
            socket_path=self._socket_dir / "runner.sock",
            prompt_cache_dir=cache_store.layout.prompt_cache(launch.model_id),
        )
        specs = {spec.name: spec for spec in engines()}
        spec = specs.get(payload["engine"])
        if spec is None:
            raise DmrError(f"node {node} has no {payload['engine']} engine plugin installed")
        try:
            command = spec.engine.runner_command(launch)
        except ValueError as error:
            raise DmrError(str(error)) from error
        self._process = RunnerProcess(command, name=payload["name"], log_path=None)
        await self._process.start()
        host = runner_host()
        self._server = await asyncio.start_server(self._forward, host=host, port=0)
        port = self._server.sockets[0].getsockname()[1]
        return {
            "host": host,
            "port": port,
            "pid": self._process.pid,
            "argv": list(command.argv),
            "startup_timeout": command.startup_timeout,
            "cpu_share": command.cpu_share,
        }

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._socket_dir is not None
        try:
            upstream_reader, upstream_writer = await asyncio.open_unix_connection(
                str(self._socket_dir / "runner.sock")
            )
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            _pipe(reader, upstream_writer), _pipe(upstream_reader, writer), return_exceptions=True
        )

    async def wait(self) -> int:
        """The runner's exit code, once it exits."""
        assert self._process is not None
        return await self._process.wait()

    def tail(self, count: int = 20) -> list[str]:
        return self._process.tail(count) if self._process is not None else []

    def failure(self) -> str:
        return self._process.failure_message() if self._process is not None else "never started"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._process is not None:
            await self._process.stop()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)


async def _pipe(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
    """Copy bytes until `source` ends, then close `target` (either side going away
    reaches the other: a client leaving stops the runner's generation)."""
    try:
        while chunk := await source.read(_COPY_CHUNK):
            target.write(chunk)
            await target.drain()
    finally:
        target.close()
        with contextlib.suppress(Exception):
            await target.wait_closed()
