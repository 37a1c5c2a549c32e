"""`dmr ps`, `unload`/`stop`, `configure` (+ `show`), `status`, `run`, with the test engine."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import pexpect
import pytest
from dmr.media_types import CONFIG_V01

from tests.fixtures.registry import LocalRegistry, upload_artifact
from tests.fixtures.server import DmrServer
from tests.fixtures.test_engine import TEST_MEDIA_TYPE, add_test_model, chat_body, ps, wait_for

CHAT = "/engines/v1/chat/completions"


def load(server: DmrServer, model: str) -> None:
    with server.client() as client:
        assert client.post(CHAT, json=chat_body(model)).status_code == 200


def spawn_dmr(server: DmrServer, *args: str) -> pexpect.spawn:
    return pexpect.spawn(
        sys.executable,
        ["-m", "dmr", *args],
        env=server.env,
        encoding="utf-8",
        timeout=30,
        dimensions=(40, 200),
    )


def test_ps_and_unload(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "test/a")
    add_test_model(test_engine_server.models_path, "test/b")
    load(test_engine_server, "test/a")
    load(test_engine_server, "test/b")

    listed = test_engine_server.cli("ps")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:3] == ["MODEL", "NAME", "BACKEND"]
    assert sorted(row.split()[0] for row in rows) == ["test/a", "test/b"]
    assert all("test-engine" in row and "idle" in row for row in rows)

    unloaded = test_engine_server.cli("unload", "test/a")
    assert unloaded.returncode == 0, unloaded.stderr
    assert "Unloaded 1 model(s)." in unloaded.stdout
    assert [r["model_name"] for r in ps(test_engine_server)] == ["test/b"]

    stopped = test_engine_server.cli("stop", "--all")
    assert stopped.returncode == 0 and "Unloaded 1 model(s)." in stopped.stdout
    assert ps(test_engine_server) == []

    nothing = test_engine_server.cli("unload")
    assert nothing.returncode == 1 and "--all" in nothing.stderr


def test_configure_and_configure_show(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "test/a")

    done = test_engine_server.cli(
        "configure", "--context-size", "3072", "--keep-alive", "-1", "test/a", "--", "--temp", "0.2"
    )

    assert done.returncode == 0, done.stderr
    shown = test_engine_server.cli("configure", "show", "test/a")
    assert shown.returncode == 0, shown.stderr
    [config] = json.loads(shown.stdout)
    assert config["context-size"] == 3072
    assert config["runtime-flags"] == ["--temp", "0.2"]
    assert config["keep_alive"] == "-1"
    # Loaded and idle: a runner still loading counts as in use, and configuring it is a 409.
    wait_for(
        lambda: any(not r["loading"] and not r["in_use"] for r in ps(test_engine_server)),
        message="preload",
    )

    budget = test_engine_server.cli("configure", "--reasoning-budget", "0", "test/a")
    assert budget.returncode == 0, budget.stderr
    wrong = test_engine_server.cli("configure", "--reasoning-budget", "-2", "test/a")
    assert wrong.returncode != 0

    refused = test_engine_server.cli("configure", "test/a", "--", "--log-file", "/etc/passwd")
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: ") and len(refused.stderr.splitlines()) == 1


def test_status(test_engine_server: DmrServer) -> None:
    plain = test_engine_server.cli("status")
    assert plain.returncode == 0, plain.stderr
    assert "Docker Model Runner is running" in plain.stdout
    assert "test-engine: Running" in plain.stdout

    as_json = test_engine_server.cli("status", "--json")
    assert json.loads(as_json.stdout)["engines"]["test-engine"].startswith("Running")


def test_status_without_a_server(test_engine_server: DmrServer) -> None:
    test_engine_server.stop()
    down = test_engine_server.cli("status")
    assert down.returncode == 1
    assert "not running" in down.stdout


def test_run_one_shot_prints_the_answer(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "test/a")

    result = test_engine_server.cli("run", "test/a", "hello there")

    assert result.returncode == 0, result.stderr
    assert result.stdout == "[1 messages] echo: hello there\n"


def test_run_streams_the_answer_as_it_arrives(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "test/a")
    child = spawn_dmr(test_engine_server, "run", "test/a", "[slow] one two three four five six")
    try:
        child.expect_exact("echo:")
        seen = time.monotonic()
        assert child.isalive()  # the rest is still being generated
        child.expect_exact("six")
        assert time.monotonic() - seen > 1.0
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_run_reports_a_runner_dying_mid_answer(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "test/a")

    result = test_engine_server.cli("run", "test/a", "[die] please")

    assert result.returncode == 1
    assert result.stdout == "[1 messages] \n"  # what came before the crash
    assert result.stderr.startswith("error: ") and "GGML_ASSERT" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_run_interactive_chat(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "test/a")
    child = spawn_dmr(test_engine_server, "run", "test/a")
    try:
        child.expect_exact("Interactive chat mode started")
        child.expect_exact("> ")
        child.sendline("hi")
        child.expect_exact("[1 messages] echo: hi")

        child.expect_exact("> ")
        child.sendline("/set system be brief")
        child.expect_exact("Set system message.")
        child.sendline("again")
        # system + the first exchange + this message: the history is sent along.
        child.expect_exact("[4 messages, system=be brief] echo: again")

        child.sendline('"""')
        child.sendline("line one")
        child.sendline('line two"""')
        child.expect_exact("echo: line one\r\nline two")

        child.sendline("/?")
        child.expect_exact("/set num_ctx N")
        child.sendline("/set num_ctx 4096")
        child.expect_exact("Set context size to 4096.")

        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    with test_engine_server.client() as client:
        [config] = client.get("/engines/_configure", params={"model": "test/a"}).json()
    assert config["context-size"] == 4096


def test_run_detach_preloads(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "test/a")

    result = test_engine_server.cli("run", "--detach", "test/a")

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    [runner] = ps(test_engine_server)
    assert runner["model_name"] == "test/a" and not runner["loading"]


@pytest.mark.parametrize(
    ("model", "needle"),
    [("test/huge", "memory budget"), ("test/broken", "could not load the model file")],
)
def test_run_errors_are_one_line(test_engine_server: DmrServer, model: str, needle: str) -> None:
    add_test_model(test_engine_server.models_path, "test/huge", memory=10**12)
    add_test_model(test_engine_server.models_path, "test/broken", fail_load="invalid magic")

    result = test_engine_server.cli("run", model, "hi")

    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.registry
def test_run_pulls_a_missing_model_first(
    dmr_server_factory: Callable[..., DmrServer], oci_registry: LocalRegistry
) -> None:
    config = json.dumps({"config": {"format": "testfmt", "testfmt": {}}}).encode()
    upload_artifact(
        oci_registry,
        "test/pulled",
        "latest",
        CONFIG_V01,
        config,
        [(TEST_MEDIA_TYPE, b"pulled test weights")],
    )
    server = dmr_server_factory(INSECURE_REGISTRY="true")
    model = f"{oci_registry.host}/test/pulled"

    result = server.cli("run", model, "hi")

    assert result.returncode == 0, result.stderr
    assert "Pulling" in result.stderr
    assert result.stdout == "[1 messages] echo: hi\n"
    with server.client() as client:
        assert client.get(f"/models/{model}").status_code == 200


def test_run_reports_a_failed_pull_in_one_line(test_engine_server: DmrServer) -> None:
    result = test_engine_server.cli("run", "127.0.0.1:9/test/missing", "hi")

    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
