"""`GET /engines/requests` and `dmr requests` on a live server."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import Any

import httpx

from tests.fixtures.server import DmrServer
from tests.fixtures.test_engine import add_test_model, chat_body

CHAT = "/engines/v1/chat/completions"
REQUESTS = "/engines/requests"


def recorded(server: DmrServer, **params: str) -> list[dict[str, Any]]:
    with server.client() as client:
        answer = client.get(REQUESTS, params=params)
    assert answer.status_code == 200, answer.text
    items: list[dict[str, Any]] = answer.json()
    return items


def test_pairs_are_recorded_streams_folded_media_truncated(test_engine_server: DmrServer) -> None:
    server = test_engine_server
    add_test_model(server.models_path, "test/rec")
    add_test_model(server.models_path, "test/other")
    image = "data:image/png;base64," + "iVBORw0KGgo" * 200
    picture = [{"type": "image_url", "image_url": {"url": image}}]
    with server.client() as client:
        assert client.post(CHAT, json=chat_body("test/rec", "plain one")).status_code == 200
        with client.stream(
            "POST", CHAT, json=chat_body("test/rec", "one two three", stream=True)
        ) as sse:
            sse.read()
        body = {"model": "test/other", "messages": [{"role": "user", "content": picture}]}
        assert client.post(CHAT, json=body).status_code == 200

    mine = recorded(server, model="test/rec")
    everything = recorded(server)

    assert [item["model"] for item in mine] == ["test/rec", "test/rec"]
    plain, streamed = mine
    assert plain["stream"] is False and plain["status"] == 200
    assert plain["request"]["messages"][0]["content"] == "plain one"
    assert plain["response"]["choices"][0]["message"]["content"] == "[1 messages] echo: plain one"
    assert streamed["stream"] is True
    assert streamed["response"]["content"] == "[1 messages] echo: one two three"
    assert {item["model"] for item in everything} == {"test/rec", "test/other"}
    [other] = [item for item in everything if item["model"] == "test/other"]
    sent = other["request"]["messages"][0]["content"][0]["image_url"]["url"]
    assert "base64 chars truncated" in sent and len(sent) < 200
    assert "base64 chars truncated" in json.dumps(other["response"])
    assert len(json.dumps(other)) < 2000


def test_only_the_last_ten_per_model_are_kept(test_engine_server: DmrServer) -> None:
    server = test_engine_server
    add_test_model(server.models_path, "test/many")
    with server.client() as client:
        for number in range(12):
            body = chat_body("test/many", f"message {number}")
            assert client.post(CHAT, json=body).status_code == 200

    items = recorded(server, model="test/many")

    contents = [item["request"]["messages"][0]["content"] for item in items]
    assert contents == [f"message {number}" for number in range(2, 12)]


def test_follow_sends_new_pairs_as_events(test_engine_server: DmrServer) -> None:
    server = test_engine_server
    add_test_model(server.models_path, "test/live")
    with server.client() as client:
        assert client.post(CHAT, json=chat_body("test/live", "before")).status_code == 200
    with (
        httpx.Client(base_url=server.url, timeout=30) as client,
        client.stream(
            "GET",
            REQUESTS,
            params={"model": "test/live", "include_existing": "true"},
            headers={"Accept": "text/event-stream"},
        ) as events,
    ):
        assert events.headers["content-type"].startswith("text/event-stream")
        with server.client() as other:
            assert other.post(CHAT, json=chat_body("test/live", "after")).status_code == 200
        seen = []
        kind = ""
        for line in events.iter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            if line.startswith("data:"):
                content = json.loads(line[5:])["request"]["messages"][0]["content"]
                seen.append((kind, content))
            if len(seen) == 2:
                break
    # Docker Model Runner's event names: `docker model requests -f` prints only these.
    assert seen == [("existing_request", "before"), ("new_request", "after")]


def test_cli_requests(test_engine_server: DmrServer) -> None:
    server = test_engine_server
    add_test_model(server.models_path, "test/cli-a")
    add_test_model(server.models_path, "test/cli-b")
    with server.client() as client:
        for model in ("test/cli-a", "test/cli-b"):
            assert client.post(CHAT, json=chat_body(model, f"to {model}")).status_code == 200

    listed = server.cli("requests", "--model", "test/cli-a")

    assert listed.returncode == 0, listed.stderr
    [item] = json.loads(listed.stdout)
    assert item["model"] == "test/cli-a"

    refused = server.cli("requests", "--include-existing")
    assert refused.returncode != 0
    assert "--include-existing can only be used with --follow" in refused.stderr

    follower = subprocess.Popen(
        [
            *(sys.executable, "-m", "dmr", "requests"),
            "-f",
            "--include-existing",
            "--model",
            "test/cli-b",
        ],
        env=server.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert follower.stdout is not None
        line = follower.stdout.readline()  # the history comes first
        assert json.loads(line)["request"]["messages"][0]["content"] == "to test/cli-b"
    finally:
        follower.terminate()
        follower.wait(timeout=10)

    # Without --include-existing only what comes next: the first line is the new one.
    follower = subprocess.Popen(
        [sys.executable, "-m", "dmr", "requests", "-f", "--model", "test/cli-b"],
        env=server.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert follower.stdout is not None
        # The follower hears of requests once its connection is up: send until one arrives.
        printed = threading.Event()

        def send_until_printed() -> None:
            with server.client() as client:
                while not printed.wait(0.5):
                    client.post(CHAT, json=chat_body("test/cli-b", "new one"))

        sender = threading.Thread(target=send_until_printed, daemon=True)
        sender.start()
        line = follower.stdout.readline()
        printed.set()
        sender.join(timeout=30)
        assert json.loads(line)["request"]["messages"][0]["content"] == "new one"
    finally:
        follower.terminate()
        follower.wait(timeout=10)


def test_translated_dialects_are_recorded_too(test_engine_server: DmrServer) -> None:
    server = test_engine_server
    add_test_model(server.models_path, "ai/echo:latest")
    messages = [{"role": "user", "content": "x y"}]
    with server.client() as client:
        single = client.post(
            "/api/chat", json={"model": "echo", "messages": messages, "stream": False}
        )
        assert single.status_code == 200, single.text
        streamed = client.post("/api/chat", json={"model": "echo", "messages": messages})
        assert streamed.status_code == 200, streamed.text
        metrics = client.get("/metrics").text

    items = recorded(server, model="ai/echo")

    assert [item["stream"] for item in items] == [False, True]
    assert items[0]["response"]["choices"][0]["message"]["content"] == "[1 messages] echo: x y"
    assert items[1]["response"]["content"] == "[1 messages] echo: x y"
    assert items[1]["request"]["messages"] == messages
    # The Ollama requests carry their model and dialect in the server's series.
    assert 'dialect="ollama"' in metrics and 'route="/api/chat"' in metrics
    assert 'model="ai/echo:latest"' in metrics or 'model="echo"' in metrics
