"""Control routes: /engines/ps, /engines/unload, /engines/_configure (docs/compatibility.md §4)."""

from __future__ import annotations

from typing import Any

import httpx
import psutil
import pytest

from tests.fixtures.server import DmrServer
from tests.fixtures.test_engine import add_test_model, chat_body, ps, wait_for

CHAT = "/engines/v1/chat/completions"


def post(server: DmrServer, path: str, body: dict[str, Any]) -> httpx.Response:
    with server.client() as client:
        return client.post(path, json=body)


def loaded(server: DmrServer) -> list[str]:
    return sorted(r["model_name"] for r in ps(server) if not r["loading"])


def runner_argv(server: DmrServer, model: str) -> list[str]:
    [runner] = [r for r in ps(server) if r["model_name"] == model]
    return psutil.Process(runner["pid"]).cmdline()


def test_ps_lists_runners_with_dmr_fields(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "test/a")
    assert post(test_engine_server, CHAT, chat_body("test/a")).status_code == 200

    [item] = ps(test_engine_server)

    for field in ("backend_name", "model_name", "mode", "last_used", "in_use", "loading"):
        assert field in item
    assert item["keep_alive"] == "1m"  # the server's idle timeout in these tests


def test_unload_by_model_backend_and_all(test_engine_server: DmrServer) -> None:
    for name in ("a", "b"):
        add_test_model(test_engine_server.models_path, f"test/{name}")
        assert post(test_engine_server, CHAT, chat_body(f"test/{name}")).status_code == 200
    assert loaded(test_engine_server) == ["test/a", "test/b"]

    one = post(test_engine_server, "/engines/unload", {"models": ["test/a"]})
    assert one.json() == {"unloaded_runners": 1}
    assert loaded(test_engine_server) == ["test/b"]

    other = post(test_engine_server, "/engines/unload", {"backend": "llama.cpp"})
    assert other.json() == {"unloaded_runners": 0}
    mine = post(test_engine_server, "/engines/unload", {"backend": "test-engine"})
    assert mine.json() == {"unloaded_runners": 1}

    assert post(test_engine_server, CHAT, chat_body("test/a")).status_code == 200
    every = post(test_engine_server, "/engines/unload", {"all": True})
    assert every.json() == {"unloaded_runners": 1}
    assert ps(test_engine_server) == []


def test_configure_preloads_with_context_size_and_flags(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "test/a")
    body = {
        "model": "test/a",
        "context-size": 2048,
        "runtime-flags": ["--temp", "0.5"],
        "raw-runtime-flags": "--top-k=7",
        "keep_alive": "10m",
    }

    answer = post(test_engine_server, "/engines/_configure", body)

    assert answer.status_code == 202
    wait_for(lambda: loaded(test_engine_server) == ["test/a"], message="preload")
    argv = runner_argv(test_engine_server, "test/a")
    assert argv[argv.index("--ctx-size") + 1] == "2048"
    assert argv[-3:] == ["--temp", "0.5", "--top-k=7"]
    [item] = ps(test_engine_server)
    assert item["keep_alive"] == "10m"

    with test_engine_server.client() as client:
        [config] = client.get("/engines/_configure", params={"model": "test/a"}).json()
        assert client.get("/engines/_configure").json() == [config]
    assert config["context-size"] == 2048
    assert config["runtime-flags"] == ["--temp", "0.5", "--top-k=7"]
    assert config["backend"] == "test-engine"


def test_reconfigure_reloads_an_idle_runner(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "test/a")
    post(test_engine_server, "/engines/_configure", {"model": "test/a", "context-size": 1024})
    wait_for(lambda: loaded(test_engine_server) == ["test/a"], message="first preload")
    [first] = ps(test_engine_server)

    answer = post(
        test_engine_server,
        "/engines/test-engine/_configure",
        {"model": "test/a", "context-size": 4096},
    )

    assert answer.status_code == 202
    wait_for(
        lambda: (
            [r["pid"] for r in ps(test_engine_server) if not r["loading"]]
            not in ([], [first["pid"]])
        ),
        message="reload",
    )
    argv = runner_argv(test_engine_server, "test/a")
    assert argv[argv.index("--ctx-size") + 1] == "4096"


def test_configure_again_while_the_first_preload_loads(test_engine_server: DmrServer) -> None:
    """`compose up` twice in a row: the second configure waits for the first's preload
    (a load, not a running request) instead of answering 409, and wins."""
    add_test_model(test_engine_server.models_path, "test/slow", load_seconds=2.0)
    first = post(test_engine_server, "/engines/_configure", {"model": "test/slow",
                                                             "context-size": 1024})  # fmt: skip
    assert first.status_code == 202
    wait_for(lambda: [r["loading"] for r in ps(test_engine_server)] == [True], message="load")

    second = post(
        test_engine_server, "/engines/_configure", {"model": "test/slow", "context-size": 2048}
    )

    assert second.status_code == 202, second.text
    wait_for(lambda: [r["loading"] for r in ps(test_engine_server)] == [False], message="reload")
    argv = runner_argv(test_engine_server, "test/slow")
    assert argv[argv.index("--ctx-size") + 1] == "2048"


def test_configure_a_busy_runner_is_409(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "test/a")
    body = chat_body("test/a", stream=True, test={"chunks": 40, "sleep": 0.05})
    with test_engine_server.client() as client, client.stream("POST", CHAT, json=body) as answer:
        lines = answer.iter_lines()
        next(lines)

        conflict = post(
            test_engine_server, "/engines/_configure", {"model": "test/a", "context-size": 512}
        )

        assert conflict.status_code == 409
        for _ in lines:
            pass


@pytest.mark.parametrize(
    "flags",
    [
        {"runtime-flags": ["--model", "/etc/passwd"]},
        {"runtime-flags": ["--temp=..\\..\\x"]},
        {"runtime-flags": ["--not-allowed", "1"]},
        {"runtime-flags": ["0.5"]},
        {"raw-runtime-flags": "--temp 0.5 --log-file /tmp/x"},
        {"raw-runtime-flags": "--temp '0.5"},
    ],
)
def test_runtime_flags_outside_the_allow_list_are_refused(
    test_engine_server: DmrServer, flags: dict[str, Any]
) -> None:
    add_test_model(test_engine_server.models_path, "test/a")

    answer = post(test_engine_server, "/engines/_configure", {"model": "test/a", **flags})

    assert answer.status_code == 400, answer.text
    assert ps(test_engine_server) == []
    with test_engine_server.client() as client:
        assert client.get("/engines/_configure").json() == []


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/engines/_configure", {"model": "test/missing"}, 404),
        ("/engines/_configure", {}, 400),
        ("/engines/_configure", {"model": "test/a", "context-size": -1}, 400),
        ("/engines/_configure", {"model": "test/a", "keep_alive": "soon"}, 400),
        ("/engines/_configure", {"model": "test/a", "mode": "dreaming"}, 400),
        ("/engines/no-such-engine/_configure", {"model": "test/a"}, 400),
        ("/engines/_configure", {"model": "test/a", "mode": "image-generation"}, 400),
        ("/engines/_configure", {"model": "test/a", "vllm": "fast"}, 400),
        ("/engines/_configure", {"model": "test/a", "speculative": {"num_tokens": "4"}}, 400),
        (
            "/engines/_configure",
            {"model": "test/a", "speculative": {"min_acceptance_rate": 2}},
            400,
        ),
        ("/engines/_configure", {"model": "test/a", "speculative": {"draft_model": 7}}, 400),
    ],
)
def test_configure_refuses_bad_requests(
    test_engine_server: DmrServer, path: str, body: dict[str, Any], status: int
) -> None:
    add_test_model(test_engine_server.models_path, "test/a")
    answer = post(test_engine_server, path, body)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["message"]


def test_third_party_engine_from_an_entry_point_serves_its_format(
    test_engine_server: DmrServer,
) -> None:
    listed = test_engine_server.cli("plugins")
    assert listed.returncode == 0, listed.stderr
    assert "test-engine" in listed.stdout and "dmr-test-engine" in listed.stdout
    with test_engine_server.client() as client:
        assert client.get("/engines/status").json()["test-engine"].startswith("Running")
    add_test_model(test_engine_server.models_path, "test/a")

    assert post(test_engine_server, CHAT, chat_body("test/a")).status_code == 200

    [runner] = ps(test_engine_server)
    assert runner["backend_name"] == "test-engine"
