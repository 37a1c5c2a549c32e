"""`ThreadedPuller`: a `ModelPuller` made of a blocking pull run in a worker thread."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dmr.records import ProgressCallback

__all__ = ["BlockingPull", "ThreadedPuller"]

# pull(reference, store, emit, bearer_token, stop) -> the model ID; it reports through
# `emit` from its thread and returns early, raising, once `stop` is set.
BlockingPull = Callable[[str, Any, ProgressCallback, str | None, threading.Event], str]


@dataclass(frozen=True)
class ThreadedPuller:
    """Runs `pull_blocking` with `run_transfer`: in a worker thread, told to stop when
    the pull is cancelled, its progress delivered on the event loop."""

    pull_blocking: BlockingPull

    async def pull(
        self,
        reference: str,
        store: Any,
        progress: ProgressCallback,
        *,
        bearer_token: str | None = None,
    ) -> str:
        # Imported when a pull runs: the plugins load without anyio (CLI start-up).
        from dmr.distribution.progress import loop_callback, run_transfer

        emit = loop_callback(progress)
        return await run_transfer(
            lambda stop: self.pull_blocking(reference, store, emit, bearer_token, stop), emit
        )
