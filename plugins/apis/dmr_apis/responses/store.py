"""Responses kept in memory for an hour, so `previous_response_id` and GET work."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RESPONSE_TTL_SECONDS", "ResponseStore", "StoredResponse"]

RESPONSE_TTL_SECONDS = 3600.0
# A bound on memory: the oldest responses go first past this many.
MAX_STORED_RESPONSES = 10_000


@dataclass
class StoredResponse:
    response: dict[str, Any]  # the response object as returned to the client
    input_items: list[dict[str, Any]]  # this request's input items, with ids
    # The whole conversation in OpenAI chat messages (without instructions),
    # ending with this response's output: what a follow-up request continues.
    conversation: list[dict[str, Any]]
    stored_at: float = field(default_factory=lambda: time.monotonic())


class ResponseStore:
    def __init__(self, ttl: float = RESPONSE_TTL_SECONDS) -> None:
        self.ttl = ttl
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def _expire(self) -> None:
        deadline = time.monotonic() - self.ttl
        while self._items:
            oldest_id, oldest = next(iter(self._items.items()))
            if oldest.stored_at >= deadline and len(self._items) <= MAX_STORED_RESPONSES:
                break
            del self._items[oldest_id]

    def put(self, response_id: str, stored: StoredResponse) -> None:
        self._items[response_id] = stored
        self._items.move_to_end(response_id)
        self._expire()

    def get(self, response_id: str) -> StoredResponse | None:
        self._expire()
        return self._items.get(response_id)

    def delete(self, response_id: str) -> bool:
        self._expire()
        return self._items.pop(response_id, None) is not None

    def __len__(self) -> int:
        return len(self._items)
