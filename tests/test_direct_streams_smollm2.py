"""Direct streams end to end: `dmr serve` hands a streamed answer's connection to the
llama.cpp runner after the first chunk (core/dmr/direct_streams.py), and what the
client gets is still one well-formed HTTP/1.1 answer on a connection it can reuse,
the same text as a whole answer, in the request log and the token metrics.

Through the real server, the real SmolLM2 runner and the official OpenAI client;
`dmr_direct_streams_total{handed="true"}` says the runner wrote the stream."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.fixtures.server import DmrServer, start_server
from tests.fixtures.store import package_smollm2
from tests.fixtures.test_engine import wait_for

pytestmark = [pytest.mark.llama, pytest.mark.slow]

MODEL = "ai/smollm2"
CHAT = "/engines/v1/chat/completions"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Iterator[DmrServer]:
    tmp = tmp_path_factory.mktemp("dmr-direct")
    package_smollm2(tmp / "models", smollm2_gguf)
    server = start_server(tmp)
    yield server
    server.stop()


def series(server: DmrServer, name: str, *labels: str) -> float:
    """The sum of `name`'s samples on the server's /metrics that carry all `labels`."""
    with server.client() as client:
        text = client.get("/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(label in line for label in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total


def handed(server: DmrServer) -> float:
    return series(server, "dmr_direct_streams_total", 'handed="true"')


def test_a_direct_stream_is_the_whole_answer_and_is_logged(server: DmrServer) -> None:
    client = openai.OpenAI(base_url=server.url + "/engines/v1", api_key="unused")
    messages: Any = [{"role": "user", "content": "Name three colours of the sea."}]
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=40, temperature=0
    )
    before, generated_before = handed(server), series(server, "dmr_generated_tokens_total")
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=40,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert "".join(parts) == whole.choices[0].message.content
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert handed(server) == before + 1  # the runner wrote it, not the relay
    # What the runner wrote reaches the request log and the token counters, once the
    # server has read the runner's summary (the client may see `[DONE]` just before).
    completion_tokens = usage.completion_tokens
    wait_for(
        lambda: (
            series(server, "dmr_generated_tokens_total") - generated_before == completion_tokens
        ),
        timeout=10,
        message="the generated tokens to be counted",
    )
    with server.client() as http:
        logged = http.get("/engines/requests").json()
    items = logged if isinstance(logged, list) else logged.get("data", logged.get("items", []))
    last = max(items, key=lambda item: item["id"])
    assert last["stream"] is True and last["status"] == 200
    text = whole.choices[0].message.content or ""
    assert last["response"]["content"][:40] == text[:40]  # the log shortens long texts
    assert last["response"]["usage"]["completion_tokens"] == usage.completion_tokens


def read_chunked_answer(conn: socket.socket, buffered: bytes) -> tuple[bytes, bytes, bytes]:
    """(head, body, bytes after the answer) of one chunked HTTP/1.1 answer."""
    data = buffered
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    body = b""
    while True:
        while b"\r\n" not in rest:
            rest += conn.recv(65536)
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        while len(rest) < size + 2:
            rest += conn.recv(65536)
        assert rest[size : size + 2] == b"\r\n", "a chunk not followed by CRLF"
        body, rest = body + rest[:size], rest[size + 2 :]
        if size == 0:
            return head, body, rest


def test_the_connection_serves_more_requests_after_a_direct_stream(server: DmrServer) -> None:
    """Byte for byte: each answer's chunked framing is whole (the runner's chunks between
    hypercorn's head and end), and the next request on the connection is answered."""
    before = handed(server)
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    leftover = b""
    try:
        for stream in (True, True, False):
            body = json.dumps(
                {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "Count to five."}],
                    "max_tokens": 24,
                    "temperature": 0,
                    "stream": stream,
                }
            ).encode()
            conn.sendall(
                b"POST %b HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%b" % (CHAT.encode(), len(body), body)
            )
            if not stream:
                data = leftover
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, rest = data.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                while len(rest) < length:
                    rest += conn.recv(65536)
                assert json.loads(rest[:length])["choices"][0]["message"]["content"]
                continue
            head, answer, leftover = read_chunked_answer(conn, leftover)
            assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
            assert b"x-dmr-direct" not in head.lower()
            events = [line for line in answer.split(b"\n\n") if line]
            assert events[-1] == b"data: [DONE]"
            assert all(event.startswith(b"data: ") for event in events)
            assert leftover == b""
    finally:
        conn.close()
    assert handed(server) == before + 2


def test_a_client_gone_mid_direct_stream_stops_the_generation(server: DmrServer) -> None:
    before = handed(server)
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Write a very long story."}],
            "max_tokens": 4000,
            "stream": True,
        }
    ).encode()
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    try:
        conn.sendall(
            b"POST %b HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (CHAT.encode(), len(body), body)
        )
        received = b""
        while received.count(b"data: ") < 20:  # well past the hand-over
            received += conn.recv(65536)
    finally:
        conn.close()
    left = time.monotonic()
    processing = "llamacpp:requests_processing"
    wait_for(
        lambda: series(server, processing, f'model="{MODEL}"') == 0,
        timeout=5,
        message="the runner's slot to be freed",
    )
    assert time.monotonic() - left < 5
    predicted = series(server, "llamacpp:tokens_predicted_total", f'model="{MODEL}"')
    time.sleep(1.0)
    assert series(server, "llamacpp:tokens_predicted_total", f'model="{MODEL}"') == predicted
    assert handed(server) == before + 1


def test_a_client_that_reads_late_gets_every_token_in_order(server: DmrServer) -> None:
    """200 tokens with their logprobs, written by the decode thread while the client
    reads nothing, arrive whole and in order, the same text as a whole answer.
    (Loopback TCP buffers all of it here; a client slower than its buffers is
    plugins/llamacpp/tests/test_llamacpp_direct_sink.py's.)"""
    tokens = 200
    body = json.dumps(
        {
            "model": MODEL,
            "prompt": "Once upon a time",
            "max_tokens": tokens,
            "ignore_eos": True,  # as llama-server: all of them
            "logprobs": 5,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    conn = socket.socket()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn.settimeout(120)
    conn.connect(("127.0.0.1", server.port))
    try:
        conn.sendall(
            b"POST /engines/v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        time.sleep(4)  # the generation runs on meanwhile
        head, answer, _ = read_chunked_answer(conn, b"")
    finally:
        conn.close()
    assert head.startswith(b"HTTP/1.1 200")
    events = [event for event in answer.split(b"\n\n") if event]
    assert events[-1] == b"data: [DONE]"
    payloads = [json.loads(event[6:]) for event in events[:-1]]
    assert payloads[-1]["usage"]["completion_tokens"] == tokens
    text = "".join(p["choices"][0]["text"] for p in payloads if p.get("choices"))
    with server.client() as http:
        whole = http.post(
            "/engines/v1/completions",
            json={
                "model": MODEL,
                "prompt": "Once upon a time",
                "max_tokens": tokens,
                "ignore_eos": True,
                "temperature": 0,
            },
        ).json()
    assert text == whole["choices"][0]["text"]
