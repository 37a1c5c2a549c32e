"""The OpenAI dialect's inference routes as `ProxyRoute`s: the server forwards plain
requests itself, past Quart; whatever needs the app reaches the dialect's views,
and the answers are the same either way."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from apis_harness import Harness

CHAT = {"model": "ai/smollm2", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def view_calls(harness: Harness) -> list[str]:
    """The OpenAI inference views called, by endpoint, from here on."""
    calls: list[str] = []
    app = harness.app
    for endpoint, view in list(app.view_functions.items()):
        if not endpoint.startswith("dmr_apis_openai.") or "models" in endpoint:
            continue

        async def counted(
            *args: Any,
            _view: Callable[..., Awaitable[Any]] = view,
            _name: str = endpoint,
            **kw: Any,
        ) -> Any:
            calls.append(_name)
            return await _view(*args, **kw)

        app.view_functions[endpoint] = counted
    return calls


def _sse_text(raw: bytes) -> str:
    text = ""
    for line in raw.decode().splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:]).get("choices", []):
                text += choice.get("delta", {}).get("content") or ""
    return text


@pytest.mark.parametrize("prefix", ["/engines/v1", "/v1", "/engines/llama.cpp/v1"])
@pytest.mark.parametrize("stream", [False, True])
async def test_plain_chat_requests_are_forwarded_past_the_views(
    harness: Harness, view_calls: list[str], prefix: str, stream: bool
) -> None:
    async with harness.asgi_client() as client:
        answer = await client.post(f"{prefix}/chat/completions", json={**CHAT, "stream": stream})
    assert answer.status_code == 200
    if stream:
        assert answer.headers["content-type"].startswith("text/event-stream")
        assert _sse_text(answer.content) == "Hello there"
        assert answer.content.endswith(b"data: [DONE]\n\n")
    else:
        assert answer.json()["choices"][0]["message"]["content"] == "Hello there"
        assert int(answer.headers["content-length"]) == len(answer.content)
    assert view_calls == []
    assert harness.runner.requests[-1][0] == "/v1/chat/completions"
    acquired = harness.scheduler.acquired[-1]
    assert acquired["backend"] == ("llama.cpp" if "llama.cpp" in prefix else None)
    assert acquired["model"] == "ai/smollm2"


@pytest.mark.parametrize(
    ("path", "body", "runner_path", "backend"),
    [
        ("/engines/v1/completions", {**CHAT, "prompt": "hi"}, "/v1/completions", None),
        ("/v1/embeddings", {"model": "ai/smollm2", "input": "hi"}, "/v1/embeddings", None),
        (
            "/engines/v1/images/generations",
            {"model": "ai/smollm2", "prompt": "a cat"},
            "/v1/images/generations",
            "diffusers",  # the route's default backend
        ),
    ],
)
async def test_every_inference_route_is_forwarded(
    harness: Harness,
    view_calls: list[str],
    path: str,
    body: dict[str, Any],
    runner_path: str,
    backend: str | None,
) -> None:
    async with harness.asgi_client() as client:
        await client.post(path, json=body)
    assert view_calls == []
    assert harness.runner.requests[-1][0] == runner_path
    assert harness.scheduler.acquired[-1]["backend"] == backend


async def _chunked(data: bytes) -> AsyncIterator[bytes]:
    yield data


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("origin", 200),
        ("preload", 200),
        ("unknown model", 404),
        ("invalid model name", 400),
        ("unknown backend", 404),
        ("not json", 400),
        ("no model", 400),
        ("chunked body", 200),
    ],
)
async def test_requests_that_need_the_app_reach_the_views(
    harness: Harness, view_calls: list[str], case: str, status: int
) -> None:
    path, body, headers = "/engines/v1/chat/completions", json.dumps(CHAT).encode(), {}
    content: bytes | AsyncIterator[bytes] = body
    if case == "origin":
        headers["Origin"] = "http://localhost:3000"
    elif case == "preload":
        headers["X-Preload-Only"] = "true"
    elif case == "unknown model":
        content = json.dumps({**CHAT, "model": "ai/nope"}).encode()
    elif case == "invalid model name":
        content = json.dumps({**CHAT, "model": "Not/A Name!"}).encode()
    elif case == "unknown backend":
        path = "/engines/nope/v1/chat/completions"
    elif case == "not json":
        content = b"{not json"
    elif case == "no model":
        content = json.dumps({"messages": CHAT["messages"]}).encode()
    else:
        content = _chunked(body)  # no Content-Length: the app's reader enforces the limit
    headers["Content-Type"] = "application/json"
    async with harness.asgi_client() as client:
        answer = await client.post(path, content=content, headers=headers)
    assert answer.status_code == status, answer.text
    assert len(view_calls) == 1
    if case == "origin":
        assert answer.headers["access-control-allow-origin"] == "http://localhost:3000"
    if case == "preload":
        assert answer.json() == {"model": "ai/smollm2", "status": "loaded"}
    if status >= 400:
        assert answer.json()["error"]["message"]


async def test_errors_before_the_answer_are_the_views_errors(
    harness: Harness, view_calls: list[str]
) -> None:
    harness.scheduler.busy = True
    async with harness.asgi_client() as client:
        forwarded = await client.post("/engines/v1/chat/completions", json=CHAT)
        # The same request through the view: an Origin header sends it there.
        viewed = await client.post(
            "/engines/v1/chat/completions", json=CHAT, headers={"Origin": "http://localhost:1"}
        )
    assert len(view_calls) == 1
    assert forwarded.status_code == viewed.status_code == 503
    assert forwarded.headers["retry-after"] == viewed.headers["retry-after"] == "3"
    assert forwarded.content == viewed.content
    assert forwarded.json()["error"]["message"] == "too many requests queued"


async def test_runner_errors_pass_through(harness: Harness, view_calls: list[str]) -> None:
    harness.runner.error = (400, "the prompt is too long")
    async with harness.asgi_client() as client:
        answer = await client.post("/engines/v1/chat/completions", json=CHAT)
    assert answer.status_code == 400
    assert answer.json() == {"error": {"message": "the prompt is too long"}}
    assert view_calls == []


async def test_forwarded_requests_are_measured(harness: Harness) -> None:
    from dmr.server.metrics import METRICS_KEY
    from prometheus_client import generate_latest

    async with harness.asgi_client() as client:
        await client.post("/engines/llama.cpp/v1/chat/completions", json={**CHAT, "stream": True})
    # The server's own series (the fake scheduler has none of the runner ones).
    metrics = generate_latest(harness.app.extensions[METRICS_KEY].registry).decode()
    line = next(
        line
        for line in metrics.splitlines()
        if line.startswith("dmr_requests_total{")
        and 'route="/engines/<backend>/v1/chat/completions"' in line
    )
    assert 'dialect="openai"' in line
    assert 'model="ai/smollm2"' in line
    assert 'status="200"' in line
    assert line.endswith(" 1.0")


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": "Bearer s3cret"}, 200),
        ({"X-Api-Key": "s3cret"}, 200),
    ],
)
async def test_the_api_key_is_checked_on_forwarded_routes(
    keyed_harness: Harness, headers: dict[str, str], status: int
) -> None:
    async with keyed_harness.asgi_client() as client:
        answer = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert answer.status_code == status
    if status == 401:
        assert answer.json()["error"]["code"] == "invalid_api_key"
        assert keyed_harness.runner.requests == []
    else:
        assert answer.json()["choices"][0]["message"]["content"] == "Hello there"


@pytest.fixture
def keyed_harness(make_harness: Callable[..., Harness]) -> Harness:
    return make_harness(api_key="s3cret")


def test_a_route_is_matched_with_its_backend(harness: Harness) -> None:
    from dmr.server.proxy_routes import ProxyRoutes

    routes = harness.app.asgi_app
    while not isinstance(routes, ProxyRoutes):
        routes = routes.app  # the observing middleware around it
    matched = routes.match("/engines/vllm/v1/completions")
    assert matched is not None and matched[1] == "vllm"
    assert matched[0].route.runner_path == "/v1/completions"
    assert routes.match("/engines/a/b/v1/completions") is None
    assert routes.match("/v1/models") is None
    assert httpx.URL("http://x/v1/rerank").path in routes.exact
