"""`dmr search`: Docker Hub's ai/ namespace and the Hugging Face Hub, here served by a
local FAKE of both search APIs (no network in tests), through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest


def _hub_repo(name: str, description: str, pulls: int, private: bool = False) -> dict[str, object]:
    return {"name": name, "namespace": "ai", "description": description, "pull_count": pulls,
            "star_count": pulls // 1000, "is_private": private,
            "last_updated": "2026-11-01T00:00:00Z"}  # fmt: skip


HUB_PAGES = [
    [_hub_repo("smollm2", "SmolLM2 in GGUF for llama.cpp", 2_500_000),
     _hub_repo("llama3.2", "Meta's Llama 3.2", 900_000),
     _hub_repo("secret", "llama but private", 5, private=True)],
    [_hub_repo("qwen3-vllm", "Qwen3 safetensors for vLLM", 12_000)],
]  # fmt: skip
HF_MODELS = [
    {"id": "bartowski/SmolLM2-135M-Instruct-GGUF", "downloads": 1234, "likes": 7,
     "tags": ["gguf", "text-generation", "instruct"], "pipeline_tag": "text-generation",
     "createdAt": "2025-01-01T00:00:00Z"},
    {"id": "someone/private-model", "private": True, "tags": ["gguf"]},
]  # fmt: skip


class FakeSearchAPIs(ThreadingHTTPServer):
    """FAKE Docker Hub (`/v2/repositories/ai/`, two pages) and Hugging Face
    (`/api/models`) search endpoints on 127.0.0.1; records each query."""

    queries: list[tuple[str, dict[str, list[str]]]]


class _Handler(BaseHTTPRequestHandler):
    server: FakeSearchAPIs

    def do_GET(self) -> None:  # http.server's name for GET
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        self.server.queries.append((parts.path, query))
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        if parts.path == "/v2/repositories/ai/":
            page = int(query.get("page", ["1"])[0])
            nxt = f"{base}/v2/repositories/ai/?page={page + 1}" if page < len(HUB_PAGES) else None
            body: object = {"count": 4, "next": nxt, "results": HUB_PAGES[page - 1]}
        elif parts.path == "/api/models":
            term = query.get("search", [""])[0].lower()
            body = [m for m in HF_MODELS if term in str(m["id"]).lower()]
        else:
            self.send_error(404)
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_search() -> Iterator[FakeSearchAPIs]:
    server = FakeSearchAPIs(("127.0.0.1", 0), _Handler)
    server.queries = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def dmr_search(server: FakeSearchAPIs, *args: str) -> subprocess.CompletedProcess[str]:
    url = f"http://127.0.0.1:{server.server_address[1]}"
    env = {**os.environ, "DMR_DOCKER_HUB_URL": url, "HF_ENDPOINT": url}
    return subprocess.run([sys.executable, "-m", "dmr", "search", *args], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_search_both_sources_as_json(fake_search: FakeSearchAPIs) -> None:
    done = dmr_search(fake_search, "--json", "smol")
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert [(r["Name"], r["Source"]) for r in results] == [
        ("ai/smollm2", "Docker Hub"),
        ("bartowski/SmolLM2-135M-Instruct-GGUF", "HuggingFace"),
    ]
    hub, hf = results
    assert hub["Downloads"] == 2_500_000 and hub["Official"] and hub["Backend"] == "llama.cpp"
    assert hf["Backend"] == "llama.cpp" and hf["Stars"] == 7
    # The queries DMR's CLI sends: the ai/ namespace by popularity; HF models llama.cpp
    # or vLLM can run, by downloads, with the term.
    hub_query = next(q for path, q in fake_search.queries if path == "/v2/repositories/ai/")
    assert hub_query["ordering"] == ["-pull_count"]
    hf_query = next(q for path, q in fake_search.queries if path == "/api/models")
    assert hf_query["apps"] == ["vllm,llama.cpp"] and hf_query["search"] == ["smol"]


def test_search_table_pages_and_filters(fake_search: FakeSearchAPIs) -> None:
    done = dmr_search(fake_search, "--source", "dockerhub")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["NAME", "DESCRIPTION", "BACKEND", "DOWNLOADS", "STARS", "SOURCE"]
    assert "ai/qwen3-vllm" in done.stdout and "vllm" in done.stdout  # from the second page
    assert "2.5M" in done.stdout and "secret" not in done.stdout  # private repos are left out
    assert not any(path == "/api/models" for path, _ in fake_search.queries)
    hf = dmr_search(fake_search, "--source", "huggingface", "smol")
    assert "hf.co/bartowski/SmolLM2-135M-Instruct-GGUF" in hf.stdout
    assert "private-model" not in dmr_search(fake_search, "--source", "huggingface").stdout
    none = dmr_search(fake_search, "--source", "dockerhub", "nothing-like-this")
    assert none.returncode == 0
    assert none.stdout.strip() == "No models found matching 'nothing-like-this'"


def test_search_reports_an_unreachable_hub_in_one_line() -> None:
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens
    env = {**os.environ, "DMR_DOCKER_HUB_URL": closed, "HF_ENDPOINT": closed}
    done = subprocess.run([sys.executable, "-m", "dmr", "search", "x"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith("error: search failed: Docker Hub could not be reached")
    assert len(done.stderr.splitlines()) == 1
