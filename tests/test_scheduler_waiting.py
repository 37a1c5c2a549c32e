"""Waiting for memory through a real `dmr serve`, with the test engine's runners:
requests are served in order, a request for a model that is not loaded gets its
turn against clients that keep another model busy, and no wait is endless."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.fixtures.server import DmrServer
from tests.fixtures.test_engine import MiB, add_test_model, chat_body, ps, wait_for

ServerFactory = Callable[..., DmrServer]
CHAT = "/engines/v1/chat/completions"
# Each of the busy clients' requests streams this long.
BUSY_REQUEST = {"chunks": 5, "sleep": 0.1}


def chat(server: DmrServer, model: str, **extra: Any) -> httpx.Response:
    with server.client() as client:
        return client.post(CHAT, json=chat_body(model, **extra))


class BusyClients:
    """Clients that keep one model's runner busy: each sends its next request as soon
    as the last one ends, staggered so the runner is never idle between them."""

    def __init__(self, server: DmrServer, model: str, count: int) -> None:
        self.server = server
        self.model = model
        self.stop = threading.Event()
        self.statuses: list[int] = []
        self.threads = [
            threading.Thread(target=self._loop, args=(index * 0.1,)) for index in range(count)
        ]

    def _loop(self, delay: float) -> None:
        time.sleep(delay)
        with self.server.client(timeout=60) as client:
            while not self.stop.is_set():
                body = chat_body(self.model, stream=True, test=BUSY_REQUEST)
                with client.stream("POST", CHAT, json=body) as answer:
                    for _ in answer.iter_lines():
                        pass
                    self.statuses.append(answer.status_code)

    def __enter__(self) -> BusyClients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def one_model_budget(factory: ServerFactory, **env: str) -> DmrServer:
    """Room for one 8 MiB test model at a time, and models a and b in the store."""
    server = factory(DMR_MEMORY_BUDGET=str(10 * MiB), **env)
    for name in ("a", "b"):
        add_test_model(server.models_path, f"test/{name}", memory=8 * MiB)
    return server


def test_a_lone_request_for_another_model_gets_its_turn(dmr_server_factory: ServerFactory) -> None:
    """Four clients keep test/a busy without a break; a single request for test/b is
    answered once it has waited DMR_FAIR_WAIT_SECONDS and a's requests have drained,
    and a's clients are served again after it."""
    server = one_model_budget(dmr_server_factory, DMR_FAIR_WAIT_SECONDS="1")
    assert chat(server, "test/a").status_code == 200
    with BusyClients(server, "test/a", 4) as busy:
        wait_for(lambda: len(busy.statuses) >= 4, message="a's clients to get going")
        started = time.monotonic()
        answer = chat(server, "test/b")
        waited = time.monotonic() - started
        served_before = len(busy.statuses)
        wait_for(lambda: len(busy.statuses) >= served_before + 4, message="a's turn again")
    assert answer.status_code == 200, answer.text
    # 1 s owed-turn wait, then a's requests drain (0.5 s each) and b loads.
    assert waited < 8.0, f"b waited {waited:.1f}s"
    assert set(busy.statuses) == {200}
    with server.client() as client:
        metrics = client.get("/metrics").text
    assert 'dmr_queue_wait_seconds_count{model="test/b"} 1.0' in metrics
    assert "dmr_runner_evictions_total 2.0" in metrics  # a out for b, b out for a
    # One forced switch: b's owed turn held a's clients back once.
    assert 'dmr_scheduler_events_total{event="turns_owed"} 1.0' in metrics


def test_waiting_requests_are_served_in_arrival_order(dmr_server_factory: ServerFactory) -> None:
    """While a streams, b, a and b again queue. With no owed-turn grace they are served
    in arrival order: the second b does not join b's runner ahead of the a before it."""
    server = one_model_budget(dmr_server_factory, DMR_FAIR_WAIT_SECONDS="0")
    answers: dict[str, httpx.Response] = {}
    finished: list[str] = []

    def ask(label: str, model: str) -> None:
        answers[label] = chat(server, model)
        finished.append(label)

    body = chat_body("test/a", stream=True, test={"chunks": 10, "sleep": 0.1})
    with server.client() as client, client.stream("POST", CHAT, json=body) as first:
        lines = first.iter_lines()
        next(lines)
        threads = []
        for label, model in (("b1", "test/b"), ("a2", "test/a"), ("b2", "test/b")):
            thread = threading.Thread(target=ask, args=(label, model))
            thread.start()
            threads.append(thread)
            wait_for(lambda: _waiting(server) >= len(threads), message=f"{label} to queue")
        queue = server_json(server, "/engines/queue")
        assert {item["model_name"]: item["waiting"] for item in queue} == {
            "test/b": 2,
            "test/a": 1,
        }
        assert all(item["oldest_wait_seconds"] >= 0 for item in queue)
        for _ in lines:
            pass
    for thread in threads:
        thread.join(timeout=30)
    assert {label: answer.status_code for label, answer in answers.items()} == {
        "b1": 200,
        "a2": 200,
        "b2": 200,
    }
    assert finished == ["b1", "a2", "b2"]


def test_a_wait_past_the_deadline_is_503_with_retry_after(
    dmr_server_factory: ServerFactory,
) -> None:
    server = one_model_budget(dmr_server_factory, DMR_QUEUE_TIMEOUT_SECONDS="1")
    body = chat_body("test/a", stream=True, test={"chunks": 40, "sleep": 0.1})
    with server.client() as client, client.stream("POST", CHAT, json=body) as busy:
        lines = busy.iter_lines()
        next(lines)
        started = time.monotonic()
        refused = chat(server, "test/b")
        waited = time.monotonic() - started
        assert refused.status_code == 503
        assert int(refused.headers["Retry-After"]) > 0
        message = refused.json()["error"]["message"]
        assert "DMR_QUEUE_TIMEOUT_SECONDS=1" in message and "test/b" in message
        assert 0.9 <= waited < 3.0
        assert server_json(server, "/engines/queue") == []  # it left the queue
        for _ in lines:
            pass
    assert chat(server, "test/b").status_code == 200  # the next try gets its turn
    with server.client() as client:
        assert (
            'dmr_scheduler_events_total{event="queue_timeouts"} 1.0' in client.get("/metrics").text
        )


def test_ps_and_metrics_show_the_waiting_requests(dmr_server_factory: ServerFactory) -> None:
    server = one_model_budget(dmr_server_factory)
    body = chat_body("test/a", stream=True, test={"chunks": 20, "sleep": 0.1})
    waiter = threading.Thread(target=lambda: chat(server, "test/b"))
    with server.client() as client, client.stream("POST", CHAT, json=body) as busy:
        lines = busy.iter_lines()
        next(lines)
        waiter.start()
        wait_for(lambda: _waiting(server) == 1, message="b to queue")
        (running,) = ps(server)
        assert running["model_name"] == "test/a" and running["waiting"] == 0
        metrics = client.get("/metrics").text
        assert (
            'dmr_queue_waiting{backend="test-engine",mode="completion",model="test/b"} 1.0'
            in metrics
        )
        assert "dmr_queue_oldest_wait_seconds{" in metrics
        listed = server.cli("ps")
        assert listed.returncode == 0, listed.stderr
        row = next(line for line in listed.stdout.splitlines() if line.startswith("test/b"))
        assert "waiting" in row and " 1" in row
        for _ in lines:
            pass
    waiter.join(timeout=30)


def server_json(server: DmrServer, path: str) -> Any:
    with server.client() as client:
        return client.get(path).json()


def _waiting(server: DmrServer) -> int:
    return sum(int(item["waiting"]) for item in server_json(server, "/engines/queue"))
