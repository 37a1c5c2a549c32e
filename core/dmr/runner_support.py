"""Helpers for runner subprocesses written in Python (engine plugins' workers).

Runners import this module, never the server's: it pulls in nothing but asyncio.
"""

from __future__ import annotations

import asyncio
import os

__all__ = ["stop_when_orphaned"]


async def stop_when_orphaned(stop: asyncio.Event, interval: float = 1.0) -> None:
    """Set `stop` when the server that started this runner is gone.

    A server killed with SIGKILL cannot stop its runners; they are re-parented and
    would hold their model's memory forever. The parent's PID changing says so.
    """
    parent = os.getppid()
    while not stop.is_set():
        await asyncio.sleep(interval)
        if os.getppid() != parent:
            stop.set()
