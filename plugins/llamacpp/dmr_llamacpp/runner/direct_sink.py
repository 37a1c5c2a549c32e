"""A direct stream written from the decode thread.

With a direct stream (dmr/direct_streams.py) the runner writes a streamed answer to
the client's socket itself. Written from the handlers' event loop, every token still
cost a wake-up of that loop: the decode thread's hand-over, the loop taking the GIL
for its turn, the queue, the generators and a send, about 0.3 ms of CPU and up to
0.8 ms of a step's wall time on 2 cores that llama.cpp's threads keep busy
(docs/benchmarks.md, session 17). So once a stream is direct, the decode thread
encodes each step's events and sends them itself, with one non-blocking send
before its next `llama_decode`, and the loop is not woken at all.

The loop takes over whatever cannot go at once: the events already on their way to
it when the stream went direct, the bytes a slow client has not taken yet, and the
end of the stream. The end (the last chunk and `[DONE]`) goes through the server,
after the summary of what was written: a client that leaves as soon as it reads
`[DONE]` must not keep the server from counting the answer's tokens.

The stream's encoder is used by one thread at a time: the decode thread encodes
only while `direct` is set, the loop only while it is not, and the flag changes
under the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from dmr.sdk.runner import DirectWriter

from dmr_llamacpp.runner.batching import (
    Event,
    Failed,
    Finished,
    GenerationJob,
    SinkWake,
    TextDelta,
)
from dmr_llamacpp.runner.openai_bodies import DONE_EVENT, sse_error

__all__ = ["DirectSink", "Encode"]

Encode = Callable[[TextDelta | Finished, list[bytes]], None]


class DirectSink:
    """A direct stream's events, written by whichever thread owns them now."""

    def __init__(self, writer: DirectWriter, encode: Encode, job: GenerationJob) -> None:
        self.writer = writer
        self.encode = encode
        self.job = job
        self.lock = threading.Lock()
        self.announced = False  # the decode thread has sent the wake that hands it over
        self.direct = False  # the decode thread writes; else the loop does
        self.ended = False
        self.pending: list[Event] = []  # events the loop has yet to write
        self.unsent = b""  # framed bytes the client has not taken yet

    def from_decode_thread(self, events: list[Event]) -> list[Event | SinkWake]:
        """The decode thread's step: write `events` now, or leave them for the loop;
        returns what goes to the loop's queue."""
        with self.lock:
            if not self.announced:
                # What the loop already has goes out first; the wake comes after it.
                self.announced = True
                return [*events, SinkWake()]
            if self.ended:
                return []
            if not self.direct or any(isinstance(e, (Finished, Failed)) for e in events):
                self.pending.extend(events)
                if not self.direct:
                    return []  # the loop is writing: it looks at `pending` before it stops
                self.direct = False
                return [SinkWake()]  # the end: the loop writes it and ends the answer
            out: list[bytes] = []
            for event in events:
                if isinstance(event, TextDelta):  # the end (Finished, Failed) went above
                    self.encode(event, out)
            if not out:
                return []
            chunk = b"".join(out)
            framed = self.writer.frame(chunk)
            sent = self.writer.send_now(framed)
            if sent < 0:  # the client is gone: stop the generation
                self.ended = True
                self.direct = False
                self.job.cancel()
                return [SinkWake()]
            self.writer.keep(chunk)
            if sent < len(framed):  # a slow client: the loop waits for it
                self.unsent = framed[sent:]
                self.direct = False
                return [SinkWake()]
            return []

    async def drain(self) -> bytes | None:
        """In the loop: write what the decode thread left, then hand the stream back to
        it (None). Once the stream has ended, its last chunk instead: the end and
        `[DONE]`, which the handler sends through the server after the summary, so
        that the server has read what was written before the client sees the end
        (b"" when the client is gone)."""
        while True:
            with self.lock:
                unsent, self.unsent = self.unsent, b""
                events, self.pending = self.pending, []
                if not unsent and not events:
                    if self.ended:
                        return b""
                    self.direct = True
                    return None
            if unsent and not await self.writer.write_framed(unsent):
                return self._gone()
            out: list[bytes] = []
            last: list[bytes] | None = None
            for event in events:
                if isinstance(event, Failed):
                    last = [sse_error(event.message)]
                    break
                if isinstance(event, Finished):
                    last = []
                    self.encode(event, last)
                    break
                self.encode(event, out)
            if out and not await self.writer.write(b"".join(out)):
                return self._gone()
            if last is not None:
                with self.lock:
                    self.ended = True
                return b"".join([*last, DONE_EVENT])

    def _gone(self) -> bytes:
        with self.lock:
            self.ended = True
        self.job.cancel()
        return b""
