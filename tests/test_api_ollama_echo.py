"""Translated dialects on a live server whose runner is the test engine's echo server.

No model is loaded, so these check fast what the SmolLM2 tests cannot pin down:
the exact text that reached the runner, streams through the real scheduler, and
runners released when a client leaves a stream half-way.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import ollama
import openai

from tests.fixtures.server import DmrServer
from tests.fixtures.test_engine import add_test_model, ps, runner_info, wait_for


def test_ollama_chat_through_the_scheduler(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "ai/echo:latest")
    client = ollama.Client(host=test_engine_server.url)
    reply = client.chat(
        model="echo",
        messages=[{"role": "system", "content": "sys"}, {"role": "user", "content": "ping"}],
    )
    assert reply.message.content == "[2 messages, system=sys] echo: ping"
    parts = list(
        client.chat(
            model="echo:latest", stream=True, messages=[{"role": "user", "content": "a b c"}]
        )
    )
    assert "".join(p.message.content or "" for p in parts) == "[1 messages] echo: a b c"
    assert parts[-1].done and parts[-1].done_reason == "stop"
    assert client.generate(model="ai/echo", prompt="x", raw=True).response == "echo: x"


def test_every_dialect_streams_the_same_answer(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "ai/echo:latest")
    url = test_engine_server.url
    expected = "[1 messages] echo: one two"
    messages = [{"role": "user", "content": "one two"}]
    chat = openai.OpenAI(base_url=f"{url}/v1", api_key="x").chat.completions.create(
        model="ai/echo", messages=messages, stream=True
    )  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices) == expected
    with anthropic.Anthropic(base_url=f"{url}/anthropic", api_key="x").messages.stream(
        model="ai/echo",
        max_tokens=16,
        messages=messages,  # type: ignore[arg-type]
    ) as stream:
        assert "".join(stream.text_stream) == expected
    events = openai.OpenAI(base_url=f"{url}/v1", api_key="x").responses.create(
        model="ai/echo", input="one two", stream=True
    )
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == expected


def test_leaving_a_stream_frees_the_runner(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "ai/echo:latest")
    body = {"model": "echo", "messages": [{"role": "user", "content": "x"}]}
    # The runner sleeps between pieces only when asked through its own field,
    # which the Ollama dialect does not forward; a long prompt makes many pieces.
    body["messages"][0]["content"] = " ".join(f"w{i}" for i in range(2000))
    with httpx.Client(base_url=test_engine_server.url, timeout=30) as http:
        with http.stream("POST", "/api/chat", json=body) as response:
            first = next(response.iter_lines())
            assert json.loads(first)["done"] is False
        # Closed after one line: the lease must end and the runner go idle.
        wait_for(
            lambda: all(not item["in_use"] for item in ps(test_engine_server)),
            message="runner released",
        )
        (item,) = ps(test_engine_server)
        info = runner_info(str(_socket_of(test_engine_server, item)))
        assert info["active"] == 0
        assert http.get("/api/tags").status_code == 200


def _socket_of(server: DmrServer, item: dict[str, object]) -> str:
    import psutil

    for child in psutil.Process(server.process.pid).children(recursive=True):
        command = child.cmdline()
        if "--socket" in command:
            return command[command.index("--socket") + 1]
    raise AssertionError(f"no runner process for {item}")
