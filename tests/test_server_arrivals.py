"""Requests that reach the server alone are marked so (`x-dmr-lone: 1`) on their way to
the runner, and requests with another near them are not (dmr/server/arrivals.py): the
llama.cpp runner starts a lone request without waiting for a burst behind it."""

from __future__ import annotations

import threading
import time
from typing import Any

from dmr.runner_support import LONE_HEADER
from dmr.server.arrivals import Arrivals

from tests.fixtures.server import DmrServer
from tests.fixtures.test_engine import add_test_model, chat_body

CHAT = "/engines/v1/chat/completions"


def test_a_request_is_alone_without_another_near_it() -> None:
    arrivals = Arrivals(neighbour_s=0.0)
    first = arrivals.arrive()
    assert arrivals.alone(first)
    second = arrivals.arrive()
    assert not arrivals.alone(first)  # another came before the first was forwarded
    assert arrivals.alone(second)


def test_a_request_just_after_another_is_not_alone() -> None:
    arrivals = Arrivals(neighbour_s=60.0)
    arrivals.arrive()
    assert not arrivals.alone(arrivals.arrive())


def echoed_lone(server: DmrServer, model: str) -> str:
    body: dict[str, Any] = {**chat_body(model, "hi"), "test": {"echo_headers": [LONE_HEADER]}}
    with server.client() as client:
        answer = client.post(CHAT, json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    text: str = answer.json()["choices"][0]["message"]["content"]
    return text.rsplit(f"{LONE_HEADER}=", 1)[1]


def test_the_server_marks_a_lone_request_and_not_one_with_company(
    test_engine_server: DmrServer,
) -> None:
    # The model loads for 2 s: the first request waits for it in the server, and a
    # second comes meanwhile, before the first is forwarded.
    add_test_model(test_engine_server.models_path, "test/lone", load_seconds=2.0)
    answers: dict[str, str] = {}

    def ask(name: str) -> None:
        answers[name] = echoed_lone(test_engine_server, "test/lone")

    first = threading.Thread(target=ask, args=("first",))
    first.start()
    time.sleep(0.5)
    second = threading.Thread(target=ask, args=("second",))
    second.start()
    first.join(60)
    second.join(60)
    assert answers == {"first": "-", "second": "1"}
    # Alone, with the runner loaded: marked.
    assert echoed_lone(test_engine_server, "test/lone") == "1"


def test_the_mark_is_the_servers_not_the_clients(test_engine_server: DmrServer) -> None:
    """A client's own `x-dmr-lone` header does not reach the runner: the server's does."""
    add_test_model(test_engine_server.models_path, "test/lone-forged")
    body: dict[str, Any] = {
        **chat_body("test/lone-forged", "hi"),
        "test": {"echo_headers": [LONE_HEADER]},
    }
    with test_engine_server.client() as client:
        client.post(CHAT, json=body, timeout=60)  # loads the runner
        time.sleep(0.05)
        answer = client.post(CHAT, json=body, headers={LONE_HEADER: "0"}, timeout=60)
    text = answer.json()["choices"][0]["message"]["content"]
    assert text.endswith(f"{LONE_HEADER}=1")  # the server's own value, not the client's
