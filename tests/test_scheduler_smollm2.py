"""Scheduler behaviour with the real SmolLM2 runner (llama.cpp engine)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from dmr.distribution.packaging import PackageOptions, package_gguf, write_to_store
from dmr.store import Store

from tests.fixtures.server import DmrServer
from tests.fixtures.test_engine import ps, wait_for

pytestmark = [pytest.mark.llama, pytest.mark.slow]

ServerFactory = Callable[..., DmrServer]
CHAT = "/engines/v1/chat/completions"


def put_smollm2(server: DmrServer, gguf: Path, tag: str, created: str) -> None:
    """SmolLM2 under `tag`; a different `created` gives a different model ID."""
    artifact = package_gguf([gguf], PackageOptions(created=created))
    write_to_store(Store.open(server.models_path), artifact, [tag])


def long_stream(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
        "stream": True,
        "max_tokens": 2000,
    }


def ask(server: DmrServer, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    with server.client() as client:
        return client.post(CHAT, json=body)


def test_killed_runner_mid_stream_then_next_request_succeeds(
    dmr_server_factory: ServerFactory, smollm2_gguf: Path
) -> None:
    server = dmr_server_factory()
    put_smollm2(server, smollm2_gguf, "ai/smollm2", "2024-11-01T00:00:00Z")
    with (
        server.client() as client,
        client.stream("POST", CHAT, json=long_stream("ai/smollm2")) as answer,
    ):
        lines = answer.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        [runner] = ps(server)
        os.kill(runner["pid"], signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]
    assert "error" in json.loads(rest[-1][6:])
    assert "SIGKILL" in json.loads(rest[-1][6:])["error"]["message"]

    assert ask(server, "ai/smollm2").status_code == 200
    [fresh] = ps(server)
    assert fresh["pid"] != runner["pid"]


def test_client_disconnect_frees_the_runner(
    dmr_server_factory: ServerFactory, smollm2_gguf: Path
) -> None:
    server = dmr_server_factory()
    put_smollm2(server, smollm2_gguf, "ai/smollm2", "2024-11-01T00:00:00Z")
    with (
        server.client() as client,
        client.stream("POST", CHAT, json=long_stream("ai/smollm2")) as answer,
    ):
        lines = answer.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        assert ps(server)[0]["in_use"] is True
    wait_for(lambda: ps(server)[0]["in_use"] is False, timeout=10, message="release")
    # The slot is free again: a request right after is answered promptly.
    assert ask(server, "ai/smollm2").status_code == 200


def test_idle_smollm2_runner_unloads(dmr_server_factory: ServerFactory, smollm2_gguf: Path) -> None:
    server = dmr_server_factory(DMR_IDLE_TIMEOUT_SECONDS="2")
    put_smollm2(server, smollm2_gguf, "ai/smollm2", "2024-11-01T00:00:00Z")
    assert ask(server, "ai/smollm2").status_code == 200
    assert len(ps(server)) == 1
    wait_for(lambda: ps(server) == [], timeout=20, message="idle unload")


def test_second_model_evicts_the_first_under_a_small_budget(
    dmr_server_factory: ServerFactory, smollm2_gguf: Path
) -> None:
    server = dmr_server_factory(DMR_MEMORY_BUDGET=str(2 * 1024**3))  # room for one runner
    put_smollm2(server, smollm2_gguf, "ai/first", "2024-11-01T00:00:00Z")
    put_smollm2(server, smollm2_gguf, "ai/second", "2024-11-02T00:00:00Z")
    assert ask(server, "ai/first").status_code == 200
    [first] = ps(server)
    assert first["memory"] > 1024**3  # the estimate the budget admits only once

    assert ask(server, "ai/second").status_code == 200

    assert [r["model_name"] for r in ps(server)] == ["ai/second"]
    assert "evicting idle llama.cpp runner for ai/first" in server.log()


def test_speculative_draft_model_through_configure(
    dmr_server_factory: ServerFactory, smollm2_gguf: Path
) -> None:
    """`dmr configure --speculative-draft-model`: the runner drafts, the answer is unchanged."""
    server = dmr_server_factory()
    put_smollm2(server, smollm2_gguf, "ai/smollm2", "2024-11-01T00:00:00Z")
    put_smollm2(server, smollm2_gguf, "ai/smollm2-draft", "2024-11-02T00:00:00Z")
    greedy = {
        "model": "ai/smollm2",
        "messages": [{"role": "user", "content": "List three colours."}],
        "max_tokens": 24,
        "temperature": 0,
    }
    with server.client() as client:
        plain = client.post(CHAT, json=greedy).json()["choices"][0]["message"]["content"]
    configured = server.cli(
        "configure", "--speculative-draft-model", "ai/smollm2-draft", "ai/smollm2"
    )
    assert configured.returncode == 0, configured.stderr
    shown = json.loads(server.cli("configure", "show", "ai/smollm2").stdout)
    assert shown[0]["speculative"]["draft_model"] == "ai/smollm2-draft"
    with server.client() as client:
        answer = client.post(CHAT, json=greedy).json()["choices"][0]["message"]["content"]
        metrics = client.get("/metrics").text
    assert answer == plain
    accepted = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("llamacpp:draft_tokens_accepted_total{") and 'model="ai/smollm2"' in line
    ]
    assert accepted and accepted[0] > 0, metrics
