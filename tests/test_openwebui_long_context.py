"""Open WebUI's page chat, answered whole on both connections by a long-context model.

Issue 27: Open WebUI's page chat adds its built-in tools, a prompt of about
15,675 tokens. SmolLM2 (trained on 8,192) can only answer it truncated, on the
Ollama connection; the OpenAI connection keeps its 400 for a prompt over the
context (tests/test_openwebui_smollm2.py). With a model trained on 32,768 tokens
and nothing configured, dmr's default context is that trained context, so both
connections answer the same request with the whole prompt.

The model is a fake (tests/fixtures/long_context_model.py): random weights with
SmolLM2's tokenizer and chat template. The one change to Open WebUI's request is
a 16-token limit, as the SmolLM2 replay sets: random weights never end a turn. With
tools offered, the runner constrains the answer to a tool call or a response (as
Ollama does), so random weights answer with either, and a short one may end early.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.fixtures.long_context_model import RANDOM_LONG_CONTEXT_TAG, TRAINED_CONTEXT
from tests.fixtures.server import DmrServer
from tests.test_openwebui_smollm2 import builtin_tools, page_chat_messages

pytestmark = [pytest.mark.llama, pytest.mark.slow]

SMOLLM2_CONTEXT = 8192
# 20 of the replay's built-in tools make a prompt of about 15,650 tokens with this
# tokenizer: the size issue 27 measured from Open WebUI's own page.
OPEN_WEBUI_PROMPT_TOKENS = 15_000
LIMIT = 16
FINISH_REASONS = {"length", "stop", "tool_calls"}


def page_chat_body() -> dict[str, Any]:
    """Open WebUI's page chat as its OpenAI connection sends it (routers/openai.py):
    streamed, with its built-in tools, and here with `LIMIT` tokens."""
    return {
        "model": RANDOM_LONG_CONTEXT_TAG,
        "messages": page_chat_messages(),
        "tools": builtin_tools(20),
        "stream": True,
        "max_tokens": LIMIT,
    }


def runner_context(server: DmrServer) -> int:
    """Tokens per request, as the OpenAI connection's context-size error states them."""
    body = {
        "model": RANDOM_LONG_CONTEXT_TAG,
        "messages": [{"role": "user", "content": "sea " * 40000}],
    }
    with server.client() as client:
        answer = client.post("/engines/v1/chat/completions", json=body)
    assert answer.status_code == 400, answer.text
    message = answer.json()["error"]["message"]
    assert "more than the context size of" in message, message
    return int(message.rsplit("context size of ", 1)[1].split()[0])


def sse_events(answer: httpx.Response) -> list[dict[str, Any]]:
    events = []
    for line in answer.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line.removeprefix("data: ")))
    return events


def test_the_default_context_is_the_trained_one(random_long_context_server: DmrServer) -> None:
    """Nothing configured: the runner's context is the model's 32,768, not 4,096 nor
    SmolLM2's 8,192 (`MAX_DEFAULT_CONTEXT_SIZE` is 32,768 too, and the runner's whole
    estimate, 8 slots of it, is about 810 MiB: within half of the memory free on any
    machine that runs the suite). A prompt over it still gets the OpenAI 400."""
    assert runner_context(random_long_context_server) == TRAINED_CONTEXT


def test_page_chat_answers_whole_on_the_openai_connection(
    random_long_context_server: DmrServer,
) -> None:
    """The exact stream Open WebUI reads: 200, content deltas, a finish reason, and
    a prompt of Open WebUI's size, counted whole (not truncated to 8,192)."""
    with (
        random_long_context_server.client(timeout=300) as client,
        client.stream("POST", "/engines/v1/chat/completions", json=page_chat_body()) as answer,
    ):
        assert answer.status_code == 200, answer.read()
        assert answer.headers["content-type"].startswith("text/event-stream")
        events = sse_events(answer)
    assert not [event for event in events if "error" in event], events[-1]
    deltas = [choice["delta"] for event in events for choice in event.get("choices", [])]
    assert any(delta.get("content") or delta.get("tool_calls") for delta in deltas), events[:3]
    finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert len(finishes) == 1, finishes
    assert finishes[0] in FINISH_REASONS, finishes
    # llama-server's `timings` on the last chunk: tokens evaluated and from the cache.
    [timings] = [event["timings"] for event in events if "timings" in event]
    prompt_tokens = timings["prompt_n"] + timings["cache_n"]
    assert prompt_tokens >= OPEN_WEBUI_PROMPT_TOKENS > SMOLLM2_CONTEXT
    assert prompt_tokens < TRAINED_CONTEXT
    assert 0 < timings["predicted_n"] <= LIMIT


def test_page_chat_usage_through_the_openai_client(random_long_context_server: DmrServer) -> None:
    """The official client, streamed with usage: the whole prompt is counted."""
    body = page_chat_body()
    client = openai.OpenAI(
        base_url=random_long_context_server.url + "/engines/v1", api_key="unused", timeout=300
    )
    with client:
        stream = client.chat.completions.create(
            model=body["model"],
            messages=body["messages"],
            tools=body["tools"],
            max_tokens=LIMIT,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert any(delta.content or delta.tool_calls for delta in deltas), chunks[:3]
    usage = chunks[-1].usage
    assert usage is not None
    assert OPEN_WEBUI_PROMPT_TOKENS <= usage.prompt_tokens < TRAINED_CONTEXT
    assert 0 < usage.completion_tokens <= LIMIT


def test_page_chat_answers_whole_on_the_ollama_connection(
    random_long_context_server: DmrServer,
) -> None:
    """The same chat as Open WebUI's Ollama connection sends it: no truncation now,
    since the prompt fits the default context."""
    body = {
        "model": RANDOM_LONG_CONTEXT_TAG,
        "messages": page_chat_messages(),
        "tools": builtin_tools(20),
        "stream": True,
        "options": {"num_predict": LIMIT},
    }
    with (
        random_long_context_server.client(timeout=300) as client,
        client.stream("POST", "/api/chat", json=body) as answer,
    ):
        assert answer.status_code == 200, answer.read()
        lines = [json.loads(line) for line in answer.iter_lines() if line]
    assert "error" not in lines[-1], lines[-1]
    assert lines[-1]["done"] is True
    assert lines[-1]["done_reason"] in {"length", "stop"}, lines[-1]
    messages = [line.get("message", {}) for line in lines]
    assert any(m.get("content") or m.get("tool_calls") for m in messages), lines[:3]
    assert OPEN_WEBUI_PROMPT_TOKENS <= lines[-1]["prompt_eval_count"] < TRAINED_CONTEXT
    assert 0 < lines[-1]["eval_count"] <= LIMIT
    with random_long_context_server.client() as client:
        logs = client.get("/logs").text
    assert "truncating input" not in logs
