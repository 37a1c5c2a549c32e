"""`GET /logs` and `dmr logs` on a live server: server and runner logs merged by time."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable

import httpx

from tests.fixtures.server import DmrServer
from tests.fixtures.test_engine import add_test_model, chat_body

CHAT = "/engines/v1/chat/completions"
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def get_logs(server: DmrServer, **params: str) -> str:
    with server.client() as client:
        answer = client.get("/logs", params=params)
    assert answer.status_code == 200, answer.text
    return answer.text


def test_logs_merge_server_and_runner_lines_by_time(test_engine_server: DmrServer) -> None:
    server = test_engine_server
    add_test_model(server.models_path, "test/logged")
    with server.client() as client:
        assert client.post(CHAT, json=chat_body("test/logged")).status_code == 200

    lines = get_logs(server).splitlines()

    def first(*parts: str) -> int:
        return next(i for i, line in enumerate(lines) if all(part in line for part in parts))

    starting = first("starting test-engine runner for test/logged")
    ready_line = first("test runner ready: test/logged")
    ready_in = first("runner for test/logged", " ready in ")
    # The runner's own line comes after the server's "starting" and no later than
    # its "ready" (lines within the same millisecond keep the server's first).
    assert starting < ready_line
    assert lines[ready_line][:23] <= lines[ready_in][:23]
    assert "[runner-test-engine-" in lines[ready_line]
    assert all(STAMP.match(line) for line in lines if "[runner-" in line)
    stamps = [line[:23] for line in lines if STAMP.match(line)]
    assert stamps == sorted(stamps)

    server_only = get_logs(server, **{"no-engines": "true"})
    assert "starting test-engine runner" in server_only
    assert "test runner ready" not in server_only


def test_logs_follow_streams_new_lines(test_engine_server: DmrServer) -> None:
    server = test_engine_server
    add_test_model(server.models_path, "test/later")
    seen: list[str] = []
    with (
        httpx.Client(base_url=server.url, timeout=30) as client,
        client.stream("GET", "/logs", params={"follow": "true"}) as answer,
    ):
        assert answer.status_code == 200
        with server.client() as other:
            assert other.post(CHAT, json=chat_body("test/later")).status_code == 200
        deadline = time.monotonic() + 20
        for line in answer.iter_lines():
            seen.append(line)
            if "test runner ready: test/later" in line or time.monotonic() > deadline:
                break
    assert any("test runner ready: test/later" in line for line in seen)


def test_cli_logs(test_engine_server: DmrServer) -> None:
    server = test_engine_server
    add_test_model(server.models_path, "test/cli")
    with server.client() as client:
        assert client.post(CHAT, json=chat_body("test/cli")).status_code == 200

    merged = server.cli("logs")
    server_only = server.cli("logs", "--no-engines")

    assert merged.returncode == 0, merged.stderr
    assert "test runner ready: test/cli" in merged.stdout
    assert "starting test-engine runner for test/cli" in server_only.stdout
    assert "test runner ready" not in server_only.stdout

    follower = subprocess.Popen(
        [sys.executable, "-m", "dmr", "logs", "-f"],
        env=server.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert follower.stdout is not None
        line = follower.stdout.readline()
        assert STAMP.match(line), line
    finally:
        follower.terminate()
        follower.wait(timeout=10)


def test_prompts_never_reach_the_logs(
    smollm2_server: DmrServer, test_engine_server: DmrServer
) -> None:
    prompt = "zebra-quartz-7731 tell me about marmalade"
    add_test_model(test_engine_server.models_path, "test/private")
    for server, model in ((smollm2_server, "ai/smollm2"), (test_engine_server, "test/private")):
        body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
        with server.client(timeout=300) as client:
            assert client.post(CHAT, json={**body, "max_tokens": 4}).status_code == 200
            with client.stream("POST", CHAT, json={**body, "stream": True, "max_tokens": 4}) as sse:
                sse.read()

        merged = get_logs(server)
        assert "[runner-" in merged and " INFO " in merged  # both kinds of log are there
        log_dir = server.models_path.parent / "logs"
        files = [*log_dir.iterdir(), server.log_path]
        assert len(files) >= 3
        for text in (merged, *(path.read_text(errors="replace") for path in files)):
            assert "zebra-quartz" not in text


def test_logs_work_without_a_log_directory_setting(
    dmr_server_factory: Callable[..., DmrServer],
) -> None:
    """Without MODEL_RUNNER_LOG_DIR the logs go to `<MODELS_PATH>/logs`, read as usual."""
    server = dmr_server_factory(MODEL_RUNNER_LOG_DIR="", DMR_MEMORY_BUDGET=str(20 * 1024**2))
    add_test_model(server.models_path, "test/default-dir")
    with server.client() as client:
        assert client.post(CHAT, json=chat_body("test/default-dir")).status_code == 200

    merged = server.cli("logs")

    assert merged.returncode == 0, merged.stderr
    assert "starting test-engine runner for test/default-dir" in merged.stdout
    assert "test runner ready: test/default-dir" in merged.stdout
    log_dir = server.models_path / "logs"
    assert (log_dir / "server.log").is_file()
    assert list(log_dir.glob("runner-test-engine-*.log"))
    assert "test runner ready" not in get_logs(server, **{"no-engines": "true"})
