"""CPU runners share the cores: while n runners compute on the CPU at once, each
runner that can change its thread count computes with 1/n of its threads.

llama.cpp's threads spin at the barrier after every matrix product. Two runners
that each start a thread per core, on the same cores, then spend their turns
spinning while the thread they wait for has no core: SmolLM2 on two cores decoded
a step in 12 ms alone, 78 ms each side by side, and 18 ms each with one thread each
(docs/scheduler.md, "CPU runners share the cores").

A runner computes while it holds requests (`in_use`). Runners whose command says
`cpu_share` get `POST /cpu-share {"busy_runners": n}` whenever n changes while they
compute; the others (llama-server, vLLM) still count in n, as they use
the cores too. An idle runner is told again when it next computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from dmr.scheduler.runner import Runner

__all__ = ["CpuShare"]

log = logging.getLogger(__name__)

# A runner that takes longer than this to answer is told again RETRY_AFTER_S later.
SEND_TIMEOUT_S = 5.0
RETRY_AFTER_S = 1.0


def computes_on_cpu(runner: Runner) -> bool:
    return runner.device.kind == "cpu" and runner.in_use > 0 and not runner.loading


class CpuShare:
    """Tells the CPU runners how many of them compute now (one sender task, in order)."""

    def __init__(self, runners: Callable[[], Iterable[Runner]], *, enabled: bool = True) -> None:
        self._runners = runners
        self.enabled = enabled
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def refresh(self) -> None:
        """Look again after a runner started or stopped computing (called on the loop)."""
        if not self.enabled:
            return
        self._changed.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._send_changes())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None

    async def _send_changes(self) -> None:
        while self._changed.is_set():
            self._changed.clear()
            busy = [runner for runner in self._runners() if computes_on_cpu(runner)]
            # Runners on different cluster nodes do not share cores: count per device.
            per_device = Counter(runner.device_key for runner in busy)
            for runner in busy:
                sharing = per_device[runner.device_key]
                if runner.cpu_share and runner.cpu_share_sent != sharing:
                    await self._send(runner, sharing)

    async def _send(self, runner: Runner, busy_runners: int) -> None:
        runner.cpu_share_sent = busy_runners
        try:
            answer = await runner.handle.client.post(
                "/cpu-share", json={"busy_runners": busy_runners}, timeout=SEND_TIMEOUT_S
            )
        except httpx.HTTPError as error:
            # A runner too busy to answer in time (a loaded machine) is told again a
            # little later, while it still computes; a runner that is gone is not.
            log.info("cpu share for %s not sent (%r): again soon", runner.launch.model_name, error)
            runner.cpu_share_sent = 0
            asyncio.get_running_loop().call_later(RETRY_AFTER_S, self.refresh)
            return
        if answer.status_code != 200:
            log.warning("%s refused its cpu share: %s", runner.launch.model_name, answer.text[:200])
            return
        log.debug(
            "%s computes with %s threads now (%d runners on the CPU)",
            runner.launch.model_name,
            answer.json().get("threads"),
            busy_runners,
        )
