"""Scheduler mechanics through a real `dmr serve`, with the test engine's runners."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import psutil
import pytest

from tests.fixtures.server import DmrServer
from tests.fixtures.test_engine import (
    MiB,
    add_test_model,
    chat_body,
    ps,
    runner_info,
    runner_processes,
    wait_for,
)

ServerFactory = Callable[..., DmrServer]
CHAT = "/engines/v1/chat/completions"


def chat(server: DmrServer, model: str, content: str = "hello", **extra: Any) -> httpx.Response:
    with server.client() as client:
        return client.post(CHAT, json=chat_body(model, content, **extra))


def test_runner_starts_on_demand_and_answers(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "test/echo")
    assert ps(test_engine_server) == []

    answer = chat(test_engine_server, "test/echo", "ping")

    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "[1 messages] echo: ping"
    [runner] = ps(test_engine_server)
    assert runner["backend_name"] == "test-engine"
    assert runner["model_name"] == "test/echo"
    assert runner["mode"] == "completion"
    assert runner["in_use"] is False and runner["loading"] is False
    assert len(runner_processes(test_engine_server)) == 1


def test_streams_pass_through_unchanged(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "test/echo")
    with (
        test_engine_server.client() as client,
        client.stream("POST", CHAT, json=chat_body("test/echo", "a b", stream=True)) as answer,
    ):
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        events = [line for line in answer.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    pieces = [json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[:-1]]
    assert "".join(pieces) == "[1 messages] echo: a b"


def test_concurrent_requests_wait_for_one_load(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "test/slow-load", load_seconds=1.5)
    answers: list[httpx.Response] = []

    def ask() -> None:
        answers.append(chat(test_engine_server, "test/slow-load"))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    [loading] = ps(test_engine_server)
    assert loading["loading"] is True
    for thread in threads:
        thread.join(timeout=30)

    assert [a.status_code for a in answers] == [200] * 4
    assert test_engine_server.log().count("starting test-engine runner") == 1
    assert len(runner_processes(test_engine_server)) == 1


def test_idle_runner_unloads_after_the_idle_timeout(dmr_server_factory: ServerFactory) -> None:
    server = dmr_server_factory(DMR_IDLE_TIMEOUT_SECONDS="1")
    add_test_model(server.models_path, "test/echo")
    assert chat(server, "test/echo").status_code == 200
    [runner] = ps(server)
    process = psutil.Process(runner["pid"])

    wait_for(lambda: ps(server) == [], timeout=15, message="idle unload")
    process.wait(timeout=10)
    assert runner_processes(server) == []


def test_keep_alive_zero_unloads_after_the_request(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "test/once")
    with test_engine_server.client() as client:
        configured = client.post(
            "/engines/_configure", json={"model": "test/once", "keep_alive": "0"}
        )
    assert configured.status_code == 202
    # The preload started by _configure unloads at once too (keep_alive 0).
    wait_for(lambda: ps(test_engine_server) == [], message="preload to unload")

    assert chat(test_engine_server, "test/once").status_code == 200
    wait_for(lambda: ps(test_engine_server) == [], timeout=10, message="keep_alive 0 unload")


def test_negative_keep_alive_never_unloads(dmr_server_factory: ServerFactory) -> None:
    server = dmr_server_factory(DMR_IDLE_TIMEOUT_SECONDS="1")
    add_test_model(server.models_path, "test/pinned")
    add_test_model(server.models_path, "test/plain")
    with server.client() as client:
        assert (
            client.post(
                "/engines/_configure", json={"model": "test/pinned", "keep_alive": "-1"}
            ).status_code
            == 202
        )
    assert chat(server, "test/pinned").status_code == 200
    assert chat(server, "test/plain").status_code == 200

    wait_for(
        lambda: [r["model_name"] for r in ps(server)] == ["test/pinned"],
        timeout=15,
        message="only the plain model to unload",
    )
    time.sleep(1.5)
    assert [r["model_name"] for r in ps(server)] == ["test/pinned"]


def test_least_recently_used_idle_runner_is_evicted(dmr_server_factory: ServerFactory) -> None:
    server = dmr_server_factory(DMR_MEMORY_BUDGET=str(20 * MiB))
    for name in ("a", "b", "c"):
        add_test_model(server.models_path, f"test/{name}", memory=8 * MiB)
    assert chat(server, "test/a").status_code == 200
    assert chat(server, "test/b").status_code == 200
    assert chat(server, "test/a").status_code == 200  # b is now the least recently used

    assert chat(server, "test/c").status_code == 200

    assert sorted(r["model_name"] for r in ps(server)) == ["test/a", "test/c"]
    wait_for(lambda: len(runner_processes(server)) == 2, message="b's runner to exit")


def test_model_larger_than_the_budget_is_507(dmr_server_factory: ServerFactory) -> None:
    server = dmr_server_factory(DMR_MEMORY_BUDGET=str(20 * MiB))
    add_test_model(server.models_path, "test/huge", memory=50 * MiB)

    answer = chat(server, "test/huge")

    assert answer.status_code == 507
    message = answer.json()["error"]["message"]
    assert "50.00 MiB" in message and "20.00 MiB" in message
    assert ps(server) == [] and runner_processes(server) == []


def test_full_queue_answers_503_with_retry_after(dmr_server_factory: ServerFactory) -> None:
    server = dmr_server_factory(DMR_MEMORY_BUDGET=str(10 * MiB), DMR_MAX_QUEUE="1")
    for name in ("a", "b", "c"):
        add_test_model(server.models_path, f"test/{name}", memory=8 * MiB)
    body = chat_body("test/a", stream=True, test={"chunks": 30, "sleep": 0.1})
    queued: list[httpx.Response] = []

    with server.client() as client, client.stream("POST", CHAT, json=body) as busy:
        assert busy.status_code == 200
        lines = busy.iter_lines()
        next(lines)  # a's runner is busy streaming
        waiter = threading.Thread(target=lambda: queued.append(chat(server, "test/b")))
        waiter.start()
        wait_for(lambda: "test/b waits for memory" in server.log(), message="b to queue")

        refused = chat(server, "test/c")

        assert refused.status_code == 503
        assert int(refused.headers["Retry-After"]) > 0
        assert "busy" in refused.json()["error"]["message"]
        assert not queued  # b still waits while a streams
        for _ in lines:
            pass
    waiter.join(timeout=30)
    assert [r.status_code for r in queued] == [200]
    assert [r["model_name"] for r in ps(server)] == ["test/b"]


def test_a_runner_holding_its_limit_answers_503_not_an_endless_wait(
    dmr_server_factory: ServerFactory,
) -> None:
    server = dmr_server_factory(DMR_MAX_RUNNER_REQUESTS="2")
    add_test_model(server.models_path, "test/a")
    body = chat_body("test/a", stream=True, test={"chunks": 20, "sleep": 0.1})
    with (
        server.client() as first_client,
        server.client() as second_client,
        first_client.stream("POST", CHAT, json=body) as first,
        second_client.stream("POST", CHAT, json=body) as second,
    ):
        assert first.status_code == second.status_code == 200
        refused = chat(server, "test/a")
        assert refused.status_code == 503
        assert int(refused.headers["Retry-After"]) > 0
        assert "DMR_MAX_RUNNER_REQUESTS=2" in refused.json()["error"]["message"]
        for stream in (first, second):  # the requests it holds are unharmed
            assert "data: [DONE]" in list(stream.iter_lines())
    assert chat(server, "test/a").status_code == 200  # room again once they ended
    with server.client() as client:
        metrics = client.get("/metrics").text
    assert 'dmr_scheduler_events_total{event="rejected_busy"} 1.0' in metrics


def test_runner_killed_mid_stream(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "test/victim")
    body = chat_body("test/victim", stream=True, test={"chunks": 50, "sleep": 0.1})
    with (
        test_engine_server.client() as client,
        client.stream("POST", CHAT, json=body) as answer,
    ):
        lines = answer.iter_lines()
        assert next(lines).startswith("data: ")
        [runner] = ps(test_engine_server)
        os.kill(runner["pid"], signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]
    error = json.loads(rest[-1][6:])["error"]
    assert "killed" in error["message"] and "SIGKILL" in error["message"]
    assert "data: [DONE]" not in rest

    wait_for(lambda: ps(test_engine_server) == [], message="the dead runner to be evicted")
    again = chat(test_engine_server, "test/victim")
    assert again.status_code == 200
    [fresh] = ps(test_engine_server)
    assert fresh["pid"] != runner["pid"]


def test_runner_killed_during_a_non_streamed_request_is_500(
    test_engine_server: DmrServer,
) -> None:
    add_test_model(test_engine_server.models_path, "test/victim")
    assert chat(test_engine_server, "test/victim").status_code == 200
    answer = chat(test_engine_server, "test/victim", test={"crash": "Segmentation fault"})
    assert answer.status_code == 500
    assert "exited with code 1" in answer.json()["error"]["message"]
    assert "Segmentation fault" in answer.json()["error"]["message"]
    assert chat(test_engine_server, "test/victim").status_code == 200


def test_runner_that_fails_to_load_is_explained(test_engine_server: DmrServer) -> None:
    add_test_model(
        test_engine_server.models_path,
        "test/oom",
        fail_load="ggml_backend_cuda_buffer_type_alloc_buffer: CUDA error: out of memory",
    )

    answer = chat(test_engine_server, "test/oom")

    assert answer.status_code == 500
    message = answer.json()["error"]["message"]
    assert "ran out of memory" in message and "CUDA error" in message
    assert ps(test_engine_server) == []
    log_dir = test_engine_server.models_path.parent / "logs"
    [log_file] = log_dir.glob("runner-test-engine-*-completion.log")
    assert "CUDA error: out of memory" in log_file.read_text()


def test_client_disconnect_releases_the_runner(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "test/chatty")
    body = chat_body("test/chatty", stream=True, test={"chunks": 200, "sleep": 0.05})
    with (
        test_engine_server.client() as client,
        client.stream("POST", CHAT, json=body) as answer,
    ):
        lines = answer.iter_lines()  # kept: dropping it would close the response
        next(lines)
        [busy] = ps(test_engine_server)
        assert busy["in_use"] is True
    # The client is gone: the server must close its request to the runner too.
    wait_for(lambda: ps(test_engine_server)[0]["in_use"] is False, message="release")
    # The runner's own view: its stream was cut, nothing is in flight.
    cmdline = psutil.Process(busy["pid"]).cmdline()
    socket_path = next(arg for arg in cmdline if arg.endswith("runner.sock"))
    wait_for(lambda: runner_info(socket_path)["cancelled"] == 1, message="runner to see it")
    assert runner_info(socket_path)["active"] == 0


def test_server_stop_stops_its_runners(dmr_server_factory: ServerFactory) -> None:
    server = dmr_server_factory()
    add_test_model(server.models_path, "test/echo")
    assert chat(server, "test/echo").status_code == 200
    [runner] = runner_processes(server)

    server.process.send_signal(signal.SIGTERM)  # the server alone, not its group
    server.process.wait(timeout=20)

    runner.wait(timeout=10)
    assert not runner.is_running()


def test_runner_ignoring_sigterm_is_killed(dmr_server_factory: ServerFactory) -> None:
    server = dmr_server_factory()
    add_test_model(server.models_path, "test/stubborn", ignore_sigterm=True)
    assert chat(server, "test/stubborn").status_code == 200
    [runner] = runner_processes(server)
    started = time.monotonic()

    with server.client() as client:
        unloaded = client.post("/engines/unload", json={"all": True}).json()

    assert unloaded == {"unloaded_runners": 1}
    runner.wait(timeout=10)
    assert time.monotonic() - started >= 4.0  # the grace period before SIGKILL


def test_missing_engine_for_a_format_is_a_clear_error(dmr_server_factory: ServerFactory) -> None:
    server = dmr_server_factory(DMR_DISABLED_PLUGINS="test-engine")
    add_test_model(server.models_path, "test/orphan")

    answer = chat(server, "test/orphan")

    assert answer.status_code == 400
    message = answer.json()["error"]["message"]
    assert "testfmt" in message and "not installed" in message


@pytest.mark.parametrize("route", ["/engines/v1/chat/completions", "/v1/chat/completions"])
def test_unknown_model_is_404(test_engine_server: DmrServer, route: str) -> None:
    with test_engine_server.client() as client:
        answer = client.post(route, json=chat_body("test/missing"))
    assert answer.status_code == 404


def test_a_probed_gpu_is_chosen_and_its_free_memory_bounds_admission(
    dmr_server_factory: ServerFactory,
) -> None:
    """With a FAKE CUDA device from the test plugin's probe (no GPU on CI machines)."""
    server = dmr_server_factory(DMR_TEST_FAKE_GPU="Fake H100:81559:64")
    add_test_model(server.models_path, "test/small", memory=8 * MiB)
    add_test_model(server.models_path, "test/huge", memory=100 * MiB)

    assert chat(server, "test/small").status_code == 200
    assert [runner["device"] for runner in ps(server)] == ["Fake H100"]
    refused = chat(server, "test/huge")
    assert refused.status_code == 507
    message = refused.json()["error"]["message"]
    assert "Fake H100" in message and "100.00 MiB" in message

    status = server.cli("status", "--json")
    devices = {device["kind"]: device for device in json.loads(status.stdout)["devices"]}
    assert devices["cuda"]["name"] == "Fake H100"
    assert devices["cuda"]["total_memory"] == 81559 * MiB
    assert "test-engine" in devices["cuda"]["engines"]
    assert devices["cpu"]["cores"] and "test-engine" in devices["cpu"]["engines"]
    plain = server.cli("status").stdout
    assert "Devices:" in plain and "cuda:0 Fake H100" in plain and "cpu:0" in plain


def test_an_engine_gets_only_the_devices_it_declares(dmr_server_factory: ServerFactory) -> None:
    """A CPU-only engine is never handed the GPU (`EngineSpec.device_kinds`)."""
    server = dmr_server_factory(
        DMR_TEST_FAKE_GPU="Fake H100:81559:64", DMR_TEST_ENGINE_DEVICE_KINDS="cpu"
    )
    add_test_model(server.models_path, "test/small", memory=8 * MiB)
    assert chat(server, "test/small").status_code == 200
    [runner] = ps(server)
    assert runner["device"] != "Fake H100"
    with server.client() as client:
        hardware = client.get("/engines/hardware").json()
    cpu_name = next(d["name"] for d in hardware["devices"] if d["kind"] == "cpu")
    assert runner["device"] == cpu_name


def test_an_engine_with_no_device_here_is_refused_clearly(
    dmr_server_factory: ServerFactory,
) -> None:
    server = dmr_server_factory(DMR_TEST_ENGINE_DEVICE_KINDS="rocm")
    add_test_model(server.models_path, "test/small", memory=8 * MiB)
    refused = chat(server, "test/small")
    assert refused.status_code == 400
    assert "runs on rocm devices; this machine has cpu" in refused.json()["error"]["message"]


def test_a_plugin_format_is_known_by_its_layers_media_type(
    test_engine_server: DmrServer,
) -> None:
    """`ModelFormat.media_types` counts: a model whose config does not name its format
    is served by the engine of the format its layer's media type belongs to."""
    add_test_model(test_engine_server.models_path, "test/unnamed", name_format=False)
    answer = chat(test_engine_server, "test/unnamed")
    assert answer.status_code == 200, answer.text
    assert any(r["model_name"].startswith("test/unnamed") for r in ps(test_engine_server))


def test_install_hints_name_what_installs_the_engine(dmr_server_factory: ServerFactory) -> None:
    """The plugins install from the checkout's plugins/ folder, as the README does; no
    `dmr[extra]` that pip could not resolve from an index."""
    server = dmr_server_factory(DMR_DISABLED_PLUGINS="llamacpp")
    with server.client() as client:
        status = client.get("/engines/status").json()
    assert status["llama.cpp"] == "Not Installed: pip install -e plugins/llamacpp"
    assert "dmr[" not in str(status)
