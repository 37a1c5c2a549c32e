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

The send itself leaves the decode thread too. A send on a loopback TCP connection
runs the receiver's side in the sender's system call and wakes the client: 0.19 ms
a token on this 2-core machine, 0.03 ms more to encode the chunk, all of it between
two `llama_decode`s while llama.cpp's other thread spins (docs/benchmarks.md,
session 31). So after the hand-over the decode thread only queues each step's events
(`SocketSender`), and one sender thread per runner encodes and sends them in order,
while the next step is built and decoded, as llama-server's HTTP threads do.

The stream's encoder is used by one thread at a time: the sender thread encodes
only while `direct` is set, the loop only while it is not, and the flag changes
under the lock.
"""

from __future__ import annotations

import logging
import queue
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
    hand_over,
)
from dmr_llamacpp.runner.openai_bodies import DONE_EVENT, sse_error

__all__ = ["DirectSink", "Encode", "SocketSender"]

logger = logging.getLogger(__name__)

Encode = Callable[[TextDelta | Finished, list[bytes]], None]


class SocketSender:
    """The thread that writes direct streams' steps, in the order they were queued."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[DirectSink, list[Event]]] = queue.SimpleQueue()
        self._started = False
        self._start_lock = threading.Lock()

    def submit(self, sink: DirectSink, events: list[Event]) -> None:
        if not self._started:
            with self._start_lock:
                if not self._started:
                    threading.Thread(target=self._run, name="dmr-direct-send", daemon=True).start()
                    self._started = True
        self._queue.put((sink, events))

    def _run(self) -> None:
        while True:
            sink, events = self._queue.get()
            try:
                handed = sink.write_events(events)
            except Exception:  # a bug in an encoder: end this stream, keep the others
                logger.exception("writing a direct stream failed")
                handed = sink.abandon()
            if handed:
                hand_over(sink.job, handed)


# One per runner process: a step's streams are written one after another.
SENDER = SocketSender()


class DirectSink:
    """A direct stream's events, written by whichever thread owns them now."""

    def __init__(
        self,
        writer: DirectWriter,
        encode: Encode,
        job: GenerationJob,
        sender: SocketSender = SENDER,
    ) -> None:
        self.writer = writer
        self.encode = encode
        self.job = job
        self.sender = sender
        self.lock = threading.Lock()
        self.announced = False  # the decode thread has sent the wake that hands it over
        self.direct = False  # the sender thread writes; else the loop does
        self.ended = False
        self.pending: list[Event] = []  # events the loop has yet to write
        self.unsent = b""  # framed bytes the client has not taken yet

    def from_decode_thread(self, events: list[Event]) -> list[Event | SinkWake]:
        """The decode thread's step: the first goes to the loop with the wake that
        hands the stream over; every later one to the sender thread, in order (returns
        what goes to the loop's queue now)."""
        with self.lock:
            if not self.announced:
                # What the loop already has goes out first; the wake comes after it.
                self.announced = True
                return [*events, SinkWake()]
        self.sender.submit(self, events)
        return []

    def write_events(self, events: list[Event]) -> list[Event | SinkWake]:
        """The sender thread's turn with one step's events: write them now, or leave
        them for the loop; returns what goes to the loop's queue."""
        with self.lock:
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
        """In the loop: write what the sender thread left, then hand the stream back to
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

    def abandon(self) -> list[Event | SinkWake]:
        """End the stream where it is (its encoder failed); the loop ends the answer."""
        with self.lock:
            self.ended = True
            self.direct = False
        self.job.cancel()
        return [SinkWake()]

    def _gone(self) -> bytes:
        with self.lock:
            self.ended = True
        self.job.cancel()
        return b""
