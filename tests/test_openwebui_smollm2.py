"""The requests Open WebUI 0.12 sends, replayed against the real server with SmolLM2.

Open WebUI (7.4 GB installed) cannot run here; these are the shapes its backend
sends to an Ollama connection (`OLLAMA_BASE_URL`, routers/ollama.py) and an
OpenAI one (`OPENAI_API_BASE_URL`, routers/openai.py), as seen in issue 27:
model listing, a page chat carrying its built-in tools (a prompt longer than the
context), and the title and tag tasks, which set no token limit.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from tests.fixtures.server import DmrServer
from tests.fixtures.test_engine import wait_for

pytestmark = [pytest.mark.llama, pytest.mark.xdist_group("smollm2")]

TAG = "ai/smollm2:latest"  # as Open WebUI lists it from /api/tags and sends it back


def builtin_tools(count: int = 60) -> list[dict[str, Any]]:
    """Tools shaped like Open WebUI's built-in ones (web search, memory, notes, ...),
    with descriptions as long as theirs: together far more tokens than the context."""
    detail = (
        "Use this tool when the user asks about something that needs current or stored "
        "information; pass a precise query, never the whole conversation, and prefer "
        "specific keywords over questions. Results come back as a list of items with a "
        "title, a link and a short excerpt that you must cite in your answer. "
    )
    return [
        {
            "type": "function",
            "function": {
                "name": f"builtin_tool_{index}",
                "description": f"Built-in tool {index}. " + detail * 6,
                "parameters": {
                    "type": "object",
                    "properties": {
                        "query": {"type": "string", "description": "What to look for. " + detail},
                        "count": {"type": "integer", "description": "How many results."},
                    },
                    "required": ["query"],
                },
            },
        }
        for index in range(count)
    ]


def page_chat_messages() -> list[dict[str, Any]]:
    history: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a helpful assistant. Answer briefly."}
    ]
    for turn in range(12):
        history.append({"role": "user", "content": f"Tell me fact number {turn} about the sea."})
        history.append({"role": "assistant", "content": "The sea covers most of the Earth. " * 8})
    history.append({"role": "user", "content": "Say hello."})
    return history


def count_tokens(server: DmrServer, body: dict[str, Any]) -> int:
    """The prompt's tokens, counted by the runner (the Anthropic dialect's count)."""
    with server.client() as client:
        answer = client.post(
            "/anthropic/v1/messages/count_tokens",
            json={
                "model": TAG,
                "system": body["messages"][0]["content"],
                "messages": body["messages"][1:],
                "tools": [
                    {
                        "name": tool["function"]["name"],
                        "description": tool["function"]["description"],
                        "input_schema": tool["function"]["parameters"],
                    }
                    for tool in body.get("tools", [])
                ],
            },
        )
    assert answer.status_code == 200, answer.text
    tokens: int = answer.json()["input_tokens"]
    return tokens


def context_size(server: DmrServer) -> int:
    """The runner's context per request, as its OpenAI context-size error states it."""
    body = {"model": TAG, "messages": [{"role": "user", "content": "sea " * 40000}]}
    with server.client() as client:
        answer = client.post("/engines/v1/chat/completions", json=body)
    assert answer.status_code == 400, answer.text
    found = re.search(r"context size of (\d+) tokens", answer.json()["error"]["message"])
    assert found, answer.text
    return int(found.group(1))


def test_model_listing_matches_by_name(api_server: DmrServer) -> None:
    """Open WebUI lists /api/tags, then marks a model loaded when /api/ps has its name."""
    with api_server.client() as client:
        assert client.get("/api/version").status_code == 200
        tags = client.get("/api/tags").json()["models"]
        assert TAG in [m["name"] for m in tags]
        loaded = client.post("/api/generate", json={"model": TAG})  # Open WebUI's load
        assert loaded.status_code == 200, loaded.text
        # An embedding runner of the same model too: Ollama still lists the model once.
        embedded = client.post("/api/embed", json={"model": TAG, "input": "x"})
        assert embedded.status_code == 200, embedded.text
        running = client.get("/api/ps").json()["models"]
        assert TAG in [m["name"] for m in running]
        assert TAG in [m["model"] for m in running]
        [entry] = [m for m in running if m["name"] == TAG]
        assert entry["size"] > 0
        assert entry["size_vram"] == 0  # no GPU here
        for path in ("/engines/v1/models", "/v1/models"):
            listed = client.get(path)
            assert listed.status_code == 200, (path, listed.text)
            assert listed.json()["data"], path


def test_page_chat_with_builtin_tools_is_truncated_on_ollama(api_server: DmrServer) -> None:
    body = {
        "model": TAG,
        "messages": page_chat_messages(),
        "tools": builtin_tools(),
        "stream": True,
        "options": {"num_predict": 16},
    }
    with api_server.client() as client:
        assert client.post("/api/generate", json={"model": TAG}).status_code == 200
    prompt_tokens = count_tokens(api_server, body)
    assert prompt_tokens > context_size(api_server)  # the point of the test
    with (
        api_server.client() as client,
        client.stream("POST", "/api/chat", json=body) as answer,
    ):
        assert answer.status_code == 200
        lines = [json.loads(line) for line in answer.iter_lines() if line]
    assert "error" not in lines[-1], lines[-1]
    assert lines[-1]["done"] is True
    assert 0 < lines[-1]["prompt_eval_count"] < context_size(api_server)

    def logged() -> bool:
        with api_server.client() as client:
            return "truncating input prompt" in client.get("/logs").text

    wait_for(logged, timeout=10, message="the truncation's log line")


def test_history_longer_than_the_context_drops_the_oldest_messages(api_server: DmrServer) -> None:
    """Without tools, the newest messages and the system prompt are kept, as Ollama does."""
    with api_server.client() as client:
        assert client.post("/api/generate", json={"model": TAG}).status_code == 200
    context = context_size(api_server)
    system = "You are a pirate. Always answer in one short sentence."
    filler = "The old lighthouse stood on the rocks by the grey water. " * 40
    history: list[dict[str, Any]] = []
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Say hello."}]
    while count_tokens(api_server, {"messages": messages}) <= context:
        history += [{"role": "user", "content": filler}, {"role": "assistant", "content": "Arr."}]
        messages = [messages[0], *history, messages[-1]]
    body = {"model": TAG, "messages": messages, "stream": False, "options": {"num_predict": 8}}
    with api_server.client() as client:
        answer = client.post("/api/chat", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["prompt_eval_count"] < context
        logs = client.get("/logs").text
    assert "truncating input messages which exceed the context" in logs

    # `"truncate": false` asks for the error instead, as Ollama's own field does.
    with api_server.client() as client:
        refused = client.post("/api/chat", json={**body, "truncate": False})
    assert refused.status_code == 400
    assert "context size" in refused.json()["error"]


def test_openai_keeps_its_context_error(api_server: DmrServer) -> None:
    body = {"model": TAG, "messages": page_chat_messages(), "tools": builtin_tools()}
    with api_server.client() as client:
        answer = client.post("/engines/v1/chat/completions", json=body)
    assert answer.status_code == 400
    assert "context size" in answer.json()["error"]["message"]


def title_task(chat: str) -> list[dict[str, str]]:
    return [
        {
            "role": "user",
            "content": (
                "### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing "
                'the chat history.\n### Output:\nJSON format: { "title": "your concise '
                f'title here" }}\n### Chat History:\n<chat_history>\n{chat}\n</chat_history>'
            ),
        }
    ]


def tags_task(chat: str) -> list[dict[str, str]]:
    return [
        {
            "role": "user",
            "content": (
                "### Task:\nGenerate 1-3 broad tags categorizing the main themes of the chat "
                "history, along with 1-3 more specific subtopic tags.\n### Output:\nJSON "
                'format: { "tags": ["tag1", "tag2", "tag3"] }\n### Chat History:\n'
                f"<chat_history>\n{chat}\n</chat_history>"
            ),
        }
    ]


@pytest.mark.parametrize("task", [title_task, tags_task], ids=["title", "tags"])
def test_title_and_tag_tasks_without_a_token_limit_answer(api_server: DmrServer, task: Any) -> None:
    chat = "USER: Why is the sea salty?\nASSISTANT: Rivers carry dissolved minerals to it."
    messages = task(chat)
    with httpx.Client(base_url=api_server.url, timeout=300) as client:
        # The Ollama connection: no num_predict, not streamed.
        ollama = client.post(
            "/api/chat", json={"model": TAG, "messages": messages, "stream": False, "options": {}}
        )
        assert ollama.status_code == 200, ollama.text
        assert ollama.json()["done"] is True
        # The OpenAI connection: no max_tokens.
        openai = client.post(
            "/engines/v1/chat/completions",
            json={"model": TAG, "messages": messages, "stream": False},
        )
        assert openai.status_code == 200, openai.text
        assert openai.json()["choices"][0]["message"]["content"] is not None
