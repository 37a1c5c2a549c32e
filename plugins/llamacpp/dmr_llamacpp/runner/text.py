"""Turning sampled tokens into text deltas: UTF-8 split across tokens, stop sequences."""

from __future__ import annotations

import codecs
from collections.abc import Sequence

__all__ = ["StreamedText"]


class StreamedText:
    """Accumulates token bytes and releases only text that can no longer become a stop string.

    A character split across tokens waits for its last byte; text that might be
    the start of a stop sequence waits until it is clearly not one, so partial
    stop text never reaches the client.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [stop for stop in stops if stop]
        self._held = ""
        self.stopped_by: str | None = None

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; return the text now safe to send (may be empty)."""
        if self.stopped_by is not None:
            return ""
        self._held += self._decoder.decode(piece)
        return self._release()

    def finish(self) -> str:
        """Flush whatever is held when generation ends without a stop string."""
        if self.stopped_by is not None:
            return ""
        self._held += self._decoder.decode(b"", final=True)
        text, self._held = self._held, ""
        cut = self._first_stop(text)
        if cut is not None:
            return text[:cut]
        return text

    def _first_stop(self, text: str) -> int | None:
        best: int | None = None
        for stop in self._stops:
            index = text.find(stop)
            if index >= 0 and (best is None or index < best):
                best = index
                self.stopped_by = stop
        return best

    def _release(self) -> str:
        cut = self._first_stop(self._held)
        if cut is not None:
            text = self._held[:cut]
            self._held = ""
            return text
        keep = self._longest_stop_prefix_suffix(self._held)
        release_to = len(self._held) - keep
        text, self._held = self._held[:release_to], self._held[release_to:]
        return text

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest tail of `text` that starts some stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
