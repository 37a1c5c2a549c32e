"""An in-process app with a real store and a scripted runner, for the dialects' own tests.

The scheduler is a fake whose runner is a scripted OpenAI-speaking HTTP server
on a real unix socket (what `proxy_to_runner` and `RunnerHandle.client` reach),
so each dialect's translation (tool calls, timings, stop reasons, errors) is
checked exactly and fast; the tests under tests/ repeat the important paths
against a live server and the real model.
"""

from __future__ import annotations

import json
import socketserver
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import ollama
import openai
import pytest
from dmr.media_types import CONFIG_V01, GGUF, MMPROJ
from dmr.plugins import new_plugin_manager
from dmr.records import Mode, RunnerConfig
from dmr.scheduler.runner import RunnerHandle
from dmr.server.app import create_app
from dmr.server.services import Services
from dmr.settings import Settings
from dmr.store import Store, StoredModel
from dmr_apis.ollama.model_routes import allow_large_blob_uploads
from quart import Quart

TIMINGS = {"prompt_n": 7, "prompt_ms": 12.5, "predicted_n": 3, "predicted_ms": 30.0}


@dataclass
class ScriptedRunner:
    """Answers like a llama.cpp runner; tests change what it says."""

    text_pieces: list[str] = field(default_factory=lambda: ["Hel", "lo", " there"])
    finish_reason: str = "stop"
    # A reasoning model's thinking, sent as `reasoning_content` before the text.
    reasoning_pieces: list[str] = field(default_factory=list)
    # Each call: (id, name, arguments); streamed as several fragments.
    tool_calls: list[tuple[str, str, str]] = field(default_factory=list)
    error: tuple[int, str] | None = None
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def last(self) -> dict[str, Any]:
        return self.requests[-1][1]

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content or b"{}")
        path = request.url.path
        self.requests.append((path, body))
        if self.error is not None:
            status, message = self.error
            return httpx.Response(status, json={"error": {"message": message}})
        if path == "/v1/embeddings":
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            data = [
                {"object": "embedding", "index": i, "embedding": [0.1 * (i + 1), 0.2, 0.3]}
                for i in range(len(inputs))
            ]
            usage = {"prompt_tokens": 4 * len(inputs), "total_tokens": 4 * len(inputs)}
            return httpx.Response(200, json={"object": "list", "data": data, "usage": usage})
        if path == "/apply-template":
            prompt = "".join(f"<{m['role']}>{m.get('content') or ''}" for m in body["messages"])
            return httpx.Response(200, json={"prompt": prompt})
        if path == "/tokenize":
            return httpx.Response(200, json={"tokens": list(range(len(body["content"])))})
        if path in ("/v1/chat/completions", "/v1/completions"):
            chat = path == "/v1/chat/completions"
            if body.get("stream"):
                return httpx.Response(
                    200,
                    headers={"content-type": "text/event-stream"},
                    content=self._sse(chat, body),
                )
            return httpx.Response(200, json=self._whole(chat))
        return httpx.Response(404, json={"error": {"message": f"no route {path}"}})

    def _usage(self) -> dict[str, int]:
        return {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}

    def _whole(self, chat: bool) -> dict[str, Any]:
        text = "".join(self.text_pieces)
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish_reason}
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if self.reasoning_pieces:
                message["reasoning_content"] = "".join(self.reasoning_pieces)
            if self.tool_calls:
                message["content"] = None
                message["tool_calls"] = [
                    {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                    for i, n, a in self.tool_calls
                ]
            choice["message"] = message
        else:
            choice["text"] = text
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": "m",
            "choices": [choice],
            "usage": self._usage(),
            "timings": TIMINGS,
        }

    def _sse(self, chat: bool, body: dict[str, Any]) -> bytes:
        chunks: list[dict[str, Any]] = []
        for piece in self.reasoning_pieces if chat else []:
            delta = {"delta": {"reasoning_content": piece}}
            chunks.append({"choices": [{"index": 0, **delta, "finish_reason": None}]})
        for piece in self.text_pieces if not self.tool_calls else []:
            delta = {"delta": {"content": piece}} if chat else {"text": piece}
            chunks.append({"choices": [{"index": 0, **delta, "finish_reason": None}]})
        for index, (call_id, name, arguments) in enumerate(self.tool_calls):
            half = len(arguments) // 2
            fragments = [
                {
                    "index": index,
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": arguments[:half]},
                },
                {"index": index, "function": {"arguments": arguments[half:]}},
            ]
            for fragment in fragments:
                chunks.append(
                    {
                        "choices": [
                            {"index": 0, "delta": {"tool_calls": [fragment]}, "finish_reason": None}
                        ]
                    }
                )
        last_delta = {"delta": {}} if chat else {"text": ""}
        chunks.append(
            {
                "choices": [{"index": 0, **last_delta, "finish_reason": self.finish_reason}],
                "timings": TIMINGS,
            }
        )
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append({"choices": [], "usage": self._usage()})
        lines = [f"data: {json.dumps(chunk)}\n\n" for chunk in chunks]
        return ("".join(lines) + "data: [DONE]\n\n").encode()


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    runner: ScriptedRunner

    def get_request(self) -> tuple[Any, Any]:
        request, _ = super().get_request()
        return request, ("runner", 0)  # BaseHTTPRequestHandler wants an address pair

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up early (the proxy after a whole answer) is not an error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _ScriptedHandler(BaseHTTPRequestHandler):
    """Serves a `ScriptedRunner` over HTTP/1.1; event streams go out chunk by chunk."""

    protocol_version = "HTTP/1.1"
    server: _UnixHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        request = httpx.Request(
            "POST", "http://runner" + self.path, content=self.rfile.read(length)
        )
        answer = self.server.runner.handle(request)
        data = answer.read()
        self.send_response(answer.status_code)
        self.send_header("Content-Type", answer.headers.get("content-type", "application/json"))
        if answer.headers.get("content-type") == "text/event-stream":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for event in data.split(b"\n\n"):
                if event:
                    chunk = event + b"\n\n"
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        self.wfile.flush()


@contextmanager
def serve_runner(runner: ScriptedRunner, socket_path: Path) -> Iterator[None]:
    server = _UnixHTTPServer(str(socket_path), _ScriptedHandler)
    server.runner = runner
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@dataclass
class FakeScheduler:
    store: Store
    runner: ScriptedRunner
    socket_path: Path
    acquired: list[dict[str, Any]] = field(default_factory=list)
    preloaded: list[tuple[str, Mode, float | None]] = field(default_factory=list)
    unloaded: list[list[str]] = field(default_factory=list)
    configured: list[tuple[str, RunnerConfig]] = field(default_factory=list)
    busy: bool = False

    @asynccontextmanager
    async def acquire(
        self,
        model: str,
        mode: Mode | str,
        *,
        backend: str | None = None,
        keep_alive: float | None = None,
        affinity: Any = None,
    ) -> AsyncIterator[RunnerHandle]:
        from dmr.errors import ServiceBusyError

        stored = self.store.get(model)
        if self.busy:
            raise ServiceBusyError("too many requests queued", 3)
        self.acquired.append(
            {"model": model, "mode": Mode(mode), "backend": backend, "keep_alive": keep_alive}
        )
        transport = httpx.AsyncHTTPTransport(uds=str(self.socket_path))
        async with httpx.AsyncClient(transport=transport, base_url="http://runner") as client:
            # The real handle: the proxy uses all of it (its streams, a lost runner's end).
            yield RunnerHandle(
                stored.id, model, backend or "llama.cpp", Mode(mode), self.socket_path, client
            )

    async def preload(
        self,
        model: str,
        mode: Mode | str = Mode.COMPLETION,
        *,
        backend: str | None = None,
        keep_alive: float | None = None,
    ) -> None:
        self.store.get(model)
        self.preloaded.append((model, Mode(mode), keep_alive))

    async def unload(
        self,
        *,
        all: bool = False,
        backend: str | None = None,
        models: Any = (),
        cancel_busy: bool = True,
    ) -> int:
        self.unloaded.append(list(models))
        return len(list(models))

    async def configure(
        self, model: str, mode: Any, backend: Any, config: RunnerConfig, *, persist: bool = True
    ) -> None:
        self.configured.append((model, config))

    def config_for(self, model_id: str) -> RunnerConfig:
        return RunnerConfig()

    def ps(self) -> list[dict[str, Any]]:
        return [
            {
                "backend_name": "llama.cpp",
                "model_name": model,
                "model_id": "",
                "mode": "completion",
                "last_used": "2026-01-01T00:00:00+00:00",
                "in_use": False,
                "loading": False,
                "keep_alive": "5m",
            }
            for model, _, _ in self.preloaded
        ]

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def add_gguf_model(
    store: Store, tag: str, *, template: str | None = None, mmproj: bytes | None = None
) -> StoredModel:
    """A fake GGUF model; `mmproj` adds a projector layer (a vision model)."""
    weights = b"GGUF fake weights for " + tag.encode()
    weights_digest = store.put_blob_bytes(weights)
    layers = [{"mediaType": GGUF, "digest": weights_digest, "size": len(weights)}]
    if mmproj is not None:
        layers.append(
            {"mediaType": MMPROJ, "digest": store.put_blob_bytes(mmproj), "size": len(mmproj)}
        )
    if template:
        template_digest = store.put_blob_bytes(template.encode())
        layers.append(
            {
                "mediaType": "application/vnd.docker.ai.chat.template.jinja",
                "digest": template_digest,
                "size": len(template.encode()),
            }
        )
    config = {
        "config": {
            "format": "gguf",
            "architecture": "llama",
            "parameters": "134.52 M",
            "quantization": "Q4_1",
            "size": "1 B",
            "gguf": {"general.architecture": "llama", "llama.context_length": "8192"},
        },
        "descriptor": {"created": "2026-01-01T00:00:00Z"},
        "rootfs": {"type": "rootfs", "diff_ids": [layer["digest"] for layer in layers]},
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_digest = store.put_blob_bytes(config_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": CONFIG_V01, "digest": config_digest, "size": len(config_bytes)},
        "layers": layers,
    }
    return store.add_model(json.dumps(manifest).encode(), [tag])


@dataclass
class Harness:
    app: Quart
    store: Store
    scheduler: FakeScheduler
    runner: ScriptedRunner

    def asgi_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://dmr.test", timeout=30
        )

    # The official clients, talking to the app in-process.
    def openai(self, prefix: str = "/v1") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"http://dmr.test{prefix}",
            api_key="unused",
            http_client=self.asgi_client(),
            max_retries=0,
        )

    def anthropic(self, prefix: str = "/anthropic") -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(
            base_url=f"http://dmr.test{prefix}",
            api_key="unused",
            # anthropic 2 speaks through httpx2, not httpx.
            http_client=httpx2.AsyncClient(transport=httpx2.ASGITransport(app=self.app)),
            max_retries=0,
        )

    def ollama(self) -> ollama.AsyncClient:
        return ollama.AsyncClient(
            host="http://dmr.test", transport=httpx.ASGITransport(app=self.app)
        )


@pytest.fixture
def make_harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    """Harnesses whose settings differ from the defaults (e.g. `api_key=`)."""
    with ExitStack() as stack:

        def make(**settings: Any) -> Harness:
            folder = Path(tempfile.mkdtemp(prefix="models-", dir=tmp_path))
            return stack.enter_context(_harness(folder, **settings))

        yield make


@pytest.fixture
def harness(make_harness: Callable[..., Harness]) -> Harness:
    return make_harness()


@contextmanager
def _harness(models_path: Path, **settings_fields: Any) -> Iterator[Harness]:
    settings = Settings(models_path=models_path, max_body_bytes=64 * 1024, **settings_fields)
    pm = new_plugin_manager()
    app = create_app(settings, pm)
    allow_large_blob_uploads(app)
    store = Store.open(settings.models_path)
    add_gguf_model(
        store, "ai/smollm2:latest", template="{% for m in messages %}{{ tools }}{% endfor %}"
    )
    runner = ScriptedRunner()
    scheduler = FakeScheduler(store=store, runner=runner, socket_path=short_socket_path())
    app.extensions["dmr"] = Services(
        settings=settings,
        plugins=pm,
        store=store,
        scheduler=scheduler,  # type: ignore[arg-type]
        engines={"llama.cpp": None, "diffusers": None},  # type: ignore[dict-item]
        devices=[],
    )
    try:
        with serve_runner(runner, scheduler.socket_path):
            yield Harness(app=app, store=store, scheduler=scheduler, runner=runner)
    finally:
        scheduler.socket_path.unlink(missing_ok=True)


def short_socket_path() -> Path:
    """Unix socket paths are limited to ~100 bytes; pytest's tmp_path can be longer."""
    return Path(tempfile.mkdtemp(prefix="dmr-apis-")) / "runner.sock"
