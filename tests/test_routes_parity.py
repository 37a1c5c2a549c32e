"""Routes Docker Model Runner serves that dmr matched later (issue 27): the Responses
API under every prefix DMR registers, and `POST /engines/install-backend` /
`uninstall-backend` with DMR's status codes (docs/compatibility.md §4)."""

from __future__ import annotations

from collections.abc import Callable

import openai
import pytest

from tests.fixtures.server import DmrServer
from tests.fixtures.test_engine import add_test_model

# pkg/responses/handler.go registers the dialect under each of these.
RESPONSES_PREFIXES = ("", "/v1", "/engines", "/engines/v1", "/engines/test-engine/v1")


@pytest.mark.parametrize("prefix", RESPONSES_PREFIXES)
def test_responses_on_every_prefix(test_engine_server: DmrServer, prefix: str) -> None:
    add_test_model(test_engine_server.models_path, "test/responses")
    client = openai.OpenAI(
        base_url=f"{test_engine_server.url}{prefix}", api_key="unused", max_retries=0
    )

    made = client.responses.create(model="test/responses", input="hello there")

    assert made.output_text == "[1 messages] echo: hello there"
    assert client.responses.retrieve(made.id).output_text == made.output_text
    assert [item.type for item in client.responses.input_items.list(made.id).data] == ["message"]
    streamed = list(client.responses.create(model="test/responses", input="again", stream=True))
    assert streamed[-1].type == "response.completed"
    client.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)


def test_responses_under_a_backend_use_that_backend(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "test/on-backend")
    body = {"model": "test/on-backend", "input": "hi"}
    with test_engine_server.client() as http:
        assert http.post("/engines/test-engine/v1/responses", json=body).status_code == 200
        [runner] = http.get("/engines/ps").json()
        assert runner["backend_name"] == "test-engine"
        unknown = http.post("/engines/no-such-engine/v1/responses", json=body)
    assert unknown.status_code == 404
    assert "unknown backend 'no-such-engine'" in unknown.json()["error"]["message"]


def test_install_backend_reports_an_installed_one(test_engine_server: DmrServer) -> None:
    with test_engine_server.client() as http:
        answer = http.post("/engines/install-backend", json={"backend": "test-engine"})
    assert answer.status_code == 200
    body = answer.json()
    assert body["installed"] is True and body["status"].startswith("Running")


def test_install_and_uninstall_backend_errors(test_engine_server: DmrServer) -> None:
    with test_engine_server.client() as http:
        for route in ("/engines/install-backend", "/engines/uninstall-backend"):
            for bad in (b"", b"{}", b'{"backend": ""}', b"[1]", b"{oops"):
                answer = http.post(route, content=bad)
                assert answer.status_code == 400, (route, bad)
                assert answer.json()["error"]["message"] == "invalid request: backend is required"
            unknown = http.post(route, json={"backend": "tensorrt"})
            assert unknown.status_code == 404
            assert "backend not found: 'tensorrt'" in unknown.json()["error"]["message"]


def test_uninstall_of_an_installed_plugin_gives_the_pip_command(
    test_engine_server: DmrServer,
) -> None:
    with test_engine_server.client() as http:
        answer = http.post("/engines/uninstall-backend", json={"backend": "test-engine"})
        assert http.post("/engines/install-backend", json={"backend": "test-engine"}).is_success
    assert answer.status_code == 500  # DMR's code for an uninstall that did not happen
    body = answer.json()
    assert body["installed"] is True
    assert "`pip uninstall dmr-test-engine`" in body["error"]["message"]
    assert body["message"].startswith("backend uninstall failed: ")


def test_a_missing_engine_gets_its_exact_pip_install(
    dmr_server_factory: Callable[..., DmrServer],
) -> None:
    server = dmr_server_factory(DMR_DISABLED_PLUGINS="vllm")
    with server.client() as http:
        install = http.post("/engines/install-backend", json={"backend": "vllm"})
        uninstall = http.post("/engines/uninstall-backend", json={"backend": "vllm"})
        status = http.get("/engines/status").json()
    assert install.status_code == 500
    message = install.json()["error"]["message"]
    assert message.startswith("backend installation failed: ")
    assert "`pip install -e 'plugins/vllm[cpu]'" in message and "restart" in message
    assert install.json()["installed"] is False
    assert uninstall.status_code == 200 and uninstall.json()["installed"] is False
    assert status["vllm"].startswith("Not Installed")
