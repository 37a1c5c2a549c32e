"""`CpuShare` tells a runner again when it did not answer in time (a loaded machine),
and stops telling one that is gone. The runners are stand-ins with an httpx mock
transport, named as such: what is under test is the sender's order of calls."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import httpx
from dmr.scheduler import cpu_share
from dmr.scheduler.cpu_share import CpuShare
from dmr.testing import CPU


@dataclass
class StandInRunner:
    """What `CpuShare` reads of a runner, answering `/cpu-share` through `answers`."""

    name: str
    answers: list[str]  # "timeout" or "ok", one per request, the last one repeated
    received: list[int] = field(default_factory=list)
    device: Any = CPU
    in_use: int = 1
    loading: bool = False
    cpu_share: bool = True
    cpu_share_sent: int = 1

    def __post_init__(self) -> None:
        def answer(request: httpx.Request) -> httpx.Response:
            self.received.append(int(request.read().decode().split(":")[1].strip(" }")))
            outcome = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
            if outcome == "timeout":
                raise httpx.ReadTimeout("no answer in time", request=request)
            return httpx.Response(200, json={"threads": 1})

        client = httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://r")
        self.handle = type("Handle", (), {"client": client})()
        self.launch = type("Launch", (), {"model_name": self.name})()

    @property
    def device_key(self) -> tuple[str, int]:
        return ("cpu", 0)


async def test_a_runner_that_did_not_answer_in_time_is_told_again(monkeypatch: Any) -> None:
    monkeypatch.setattr(cpu_share, "RETRY_AFTER_S", 0.05)
    slow = StandInRunner("slow", ["timeout", "timeout", "ok"])
    quick = StandInRunner("quick", ["ok"])
    runners: list[StandInRunner] = [slow, quick]
    share = CpuShare(lambda: runners)  # type: ignore[arg-type, return-value]
    share.refresh()
    for _ in range(100):
        await asyncio.sleep(0.02)
        if slow.cpu_share_sent == 2 and len(slow.received) == 3:
            break
    assert slow.received == [2, 2, 2] and slow.cpu_share_sent == 2
    assert quick.received == [2]  # told once: it answered
    # A runner gone (unregistered) while it was being told again is not told any more.
    gone = StandInRunner("gone", ["timeout"])
    runners[:] = [gone, quick]
    share.refresh()
    await asyncio.sleep(0.1)
    runners[:] = [quick]
    told = len(gone.received)
    await asyncio.sleep(0.3)
    assert len(gone.received) == told
    await share.aclose()
