"""Runner scheduling. Placeholder until the scheduler lands."""

from __future__ import annotations

from typing import Any


class Scheduler:
    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass
