"""The runner's side of a direct stream (runner/direct_sink.py): after the hand-over
the decode thread queues each step's events for the sender thread, which writes them
to the client's socket itself once the event loop has written what was on its way,
leaves to the loop what a slow client has not taken and the end, and cancels the job
when the client is gone. `write_events` is the sender thread's turn, called here
directly; the last tests go through a real sender thread. A real TCP connection on
127.0.0.1 stands for the client's."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from dmr.sdk.runner import DirectWriter
from dmr_llamacpp.runner.batching import Finished, GenerationJob, SinkWake, TextDelta
from dmr_llamacpp.runner.direct_sink import DirectSink, SocketSender


class JobStandIn:
    """DirectSink calls only the job's `cancel` (set when the client is gone)."""

    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def encode(event: TextDelta | Finished, out: list[bytes]) -> None:
    if isinstance(event, TextDelta):
        out.append(b"data: " + event.text.encode() + b"\n\n")
    else:
        out.append(b"data: end " + event.reason.encode() + b"\n\n")


def delta(text: str) -> TextDelta:
    return TextDelta(text, [])


FINISHED = Finished("stop", 3, 2, 1.0, 1.0)


@pytest.fixture
def connection() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the runner's copy of the client connection, the client's end)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills up soon
        client.connect(listener.getsockname())
        served, _ = listener.accept()
    served.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.settimeout(10)
    yield served, client
    served.close()
    client.close()


def frames(*chunks: bytes) -> bytes:
    return b"".join(DirectWriter.frame(chunk) for chunk in chunks)


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        piece = sock.recv(size - len(data))
        assert piece, f"the connection closed after {len(data)} bytes"
        data += piece
    return data


def sink_on(served: socket.socket) -> tuple[DirectSink, JobStandIn]:
    job = JobStandIn()
    return DirectSink(DirectWriter(served), encode, job), job  # type: ignore[arg-type]


async def test_the_decode_thread_writes_once_the_loop_has_caught_up(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    served, client = connection
    sink, _ = sink_on(served)
    # The first step after the hand-over goes to the loop, followed by the wake...
    assert sink.from_decode_thread([delta("a")]) == [delta("a"), SinkWake()]
    # ...and until the loop has caught up, the steps wait for it in order.
    assert sink.write_events([delta("b")]) == []
    assert not await sink.drain()  # writes "b", then hands the stream back
    assert sink.write_events([delta("c")]) == []  # written at once, no wake
    assert read_exactly(client, len(frames(b"data: b\n\n", b"data: c\n\n"))) == frames(
        b"data: b\n\n", b"data: c\n\n"
    )


async def test_a_slow_client_leaves_the_rest_to_the_loop_in_order(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    served, client = connection
    sink, _ = sink_on(served)
    sink.from_decode_thread([delta("0")])
    await sink.drain()
    sent: list[bytes] = []
    wake: list[Any] = []
    n = 0
    while not wake:  # the client reads nothing: its buffers fill up
        n += 1
        text = f"{n:06d}" + "x" * 200
        sent.append(f"data: {text}\n\n".encode())
        wake = sink.write_events([delta(text)])
    assert wake == [SinkWake()] and not sink.direct
    later = []
    for number in range(3):  # the loop owns the stream now: these wait for it
        text = f"later-{number}"
        later.append(f"data: {text}\n\n".encode())
        assert sink.write_events([delta(text)]) == []
    expected = frames(*sent, b"".join(later))  # the loop writes what waited as one chunk
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(read_exactly(client, len(expected))))
    reader.start()
    assert not await sink.drain()  # waits for the client, then hands back
    reader.join(10)
    assert received == [expected]  # every byte, in order
    assert sink.direct


async def test_the_end_is_handed_back_for_the_server(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    served, client = connection
    sink, _ = sink_on(served)
    sink.from_decode_thread([delta("a")])
    await sink.drain()
    assert sink.write_events([delta("z"), FINISHED]) == [SinkWake()]
    # What came before the end goes to the client; the end is handed back, to go
    # through the server after the summary.
    assert await sink.drain() == b"data: end stop\n\ndata: [DONE]\n\n"
    expected = frames(b"data: z\n\n")
    assert read_exactly(client, len(expected)) == expected
    assert sink.writer.summary().endswith(b"data: z\n\n")  # the end is not in it
    assert sink.write_events([delta("late")]) == []  # nothing after the end


async def test_a_client_gone_stops_the_generation(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    served, client = connection
    sink, job = sink_on(served)
    sink.from_decode_thread([delta("a")])
    await sink.drain()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # a reset
    wake: list[Any] = []
    for _ in range(100):  # the first send after a reset may still succeed
        wake = sink.write_events([delta("more")])
        if wake:
            break
    assert wake == [SinkWake()] and job.cancelled
    assert await sink.drain() == b""  # ended, and nothing left to send


async def test_a_closed_writer_is_never_written_to(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    """The loop closes its socket when the answer ends; a step that comes after must not
    send on the file descriptor, which may by then be another file's."""
    served, _ = connection
    sink, job = sink_on(served)
    sink.from_decode_thread([delta("a")])
    await sink.drain()
    sink.writer.close()
    assert sink.write_events([delta("b")]) == [SinkWake()]
    assert job.cancelled


async def test_closing_a_streamed_answer_frees_its_slot_at_once() -> None:
    """Closed while it waits at a chunk (its client gone, the send cancelled), the
    answer cancels its job then, not when the garbage collector gets to it."""
    from dmr_llamacpp.runner.generation_routes import StepWrites
    from llamacpp_helpers import greedy_params

    job = GenerationJob([1, 2, 3], greedy_params(8))
    writes = StepWrites(job, encode, [])
    job.events.put_nowait(delta("a"))
    chunks = aiter(writes)
    assert await anext(chunks) == b"data: a\n\n"  # suspended at its `yield` now
    await writes.aclose()
    assert job.cancelled


async def test_the_decode_thread_only_queues_and_the_sender_writes_in_order(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    """From the decode thread a step costs a queue put: the sender thread writes the
    steps in order, and the end still reaches the handler's queue (with a wake) after
    everything before it was sent."""
    from llamacpp_helpers import greedy_params

    served, client = connection
    job = GenerationJob([1, 2, 3], greedy_params(8))
    sending_threads: set[int] = set()

    class RecordingWriter(DirectWriter):
        def send_now(self, framed: bytes) -> int:
            sending_threads.add(threading.get_ident())
            return super().send_now(framed)

    sink = DirectSink(RecordingWriter(served), encode, job, SocketSender())
    assert sink.from_decode_thread([delta("a")]) == [delta("a"), SinkWake()]
    assert not await sink.drain()  # the loop hands the stream over
    texts = [f"t{number:03d}" for number in range(200)]
    for text in texts:  # the decode thread's steps: nothing for the loop, no wait
        assert sink.from_decode_thread([delta(text)]) == []
    assert sink.from_decode_thread([FINISHED]) == []
    expected = frames(*(f"data: {text}\n\n".encode() for text in texts))
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(read_exactly(client, len(expected))))
    reader.start()
    # The wake that hands the end to the loop (after a slow-client hand-over, if the
    # small buffers filled up: the loop writes the rest, then the end).
    last = None
    while last is None:
        assert await asyncio.wait_for(job.events.get(), 10) == SinkWake()
        last = await sink.drain()
    assert last == b"data: end stop\n\ndata: [DONE]\n\n"
    reader.join(10)
    assert received == [expected]  # every step, in order, before the end
    assert sending_threads and threading.get_ident() not in sending_threads


async def test_a_failing_encoder_ends_its_stream_and_not_the_sender(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    from llamacpp_helpers import greedy_params

    served, _ = connection
    sender = SocketSender()

    def broken(event: TextDelta | Finished, out: list[bytes]) -> None:
        raise ValueError("an encoder bug")

    job = GenerationJob([1, 2, 3], greedy_params(8))
    sink = DirectSink(DirectWriter(served), broken, job, sender)
    sink.from_decode_thread([delta("a")])
    assert not await sink.drain()  # nothing pending: the stream is handed over
    sink.from_decode_thread([delta("b")])
    assert await asyncio.wait_for(job.events.get(), 10) == SinkWake()
    assert job.cancelled and await sink.drain() == b""
    # The same thread still writes other streams.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        other_client = socket.create_connection(listener.getsockname())
        other_served, _ = listener.accept()
    with other_client, other_served:
        other_client.settimeout(10)
        other = DirectSink(
            DirectWriter(other_served), encode, GenerationJob([1], greedy_params(8)), sender
        )
        other.from_decode_thread([delta("a")])
        assert not await other.drain()
        other.from_decode_thread([delta("ok")])
        assert read_exactly(other_client, len(frames(b"data: ok\n\n"))) == frames(b"data: ok\n\n")
