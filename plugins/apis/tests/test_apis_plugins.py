"""Each dialect is its own entry point and works with the others disabled."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from apis_harness import (
    FakeScheduler,
    ScriptedRunner,
    add_gguf_model,
    serve_runner,
    short_socket_path,
)
from dmr.plugins import api_dialects, new_plugin_manager
from dmr.server.app import create_app
from dmr.server.services import Services
from dmr.settings import Settings
from dmr.store import Store

DIALECTS = ("openai", "ollama", "anthropic", "responses", "batch")
# A request each dialect answers, and one route only another dialect owns.
PROBES = {
    "openai": ("POST", "/v1/chat/completions", {"model": "ai/smollm2", "messages": []}),
    "ollama": (
        "POST",
        "/api/chat",
        {"model": "smollm2", "stream": False, "messages": [{"role": "user", "content": "x"}]},
    ),
    "anthropic": (
        "POST",
        "/v1/messages",
        {"model": "ai/smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]},
    ),
    "responses": ("POST", "/v1/responses", {"model": "ai/smollm2", "input": "x"}),
    "batch": ("GET", "/v1/batches", None),
}


@pytest.mark.parametrize("kept", DIALECTS)
async def test_one_dialect_alone(
    kept: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    others = [name for name in DIALECTS if name != kept]
    monkeypatch.setenv("DMR_DISABLED_PLUGINS", ",".join(others))
    pm = new_plugin_manager()
    # Of this plugin's dialects only `kept` is loaded (other installed plugins may add
    # their own, as dmr's test engine plugin does).
    assert [dialect.name for dialect in api_dialects(pm) if dialect.name in DIALECTS] == [kept]
    settings = Settings(models_path=tmp_path / "models")
    app = create_app(settings, pm)
    store = Store.open(settings.models_path)
    add_gguf_model(store, "ai/smollm2:latest")
    runner = ScriptedRunner()
    scheduler = FakeScheduler(store=store, runner=runner, socket_path=short_socket_path())
    app.extensions["dmr"] = Services(
        settings=settings,
        plugins=pm,
        store=store,
        scheduler=scheduler,  # type: ignore[arg-type]
        engines={},
        devices=[],
    )
    if kept == "batch":  # its state starts with the server, which this app never runs
        from dmr_apis.batch.routes import dmr_server_startup

        dmr_server_startup(app)
    transport = httpx.ASGITransport(app=app)
    with serve_runner(runner, scheduler.socket_path):
        async with httpx.AsyncClient(transport=transport, base_url="http://dmr.test") as http:
            await _probe(http, kept)


async def _probe(http: httpx.AsyncClient, kept: str) -> None:
    for name, (method, path, body) in PROBES.items():
        response = await http.request(method, path, json=body)
        if name == kept:
            assert response.status_code == 200, response.text
        else:
            assert response.status_code in (404, 405), (name, response.status_code)
