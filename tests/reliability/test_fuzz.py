"""Bad input: a schema-driven fuzzer against every route `/openapi.json` lists.

For each operation, hypothesis draws bodies that break its request schema
(not JSON, the wrong JSON type, required fields missing or of the wrong type,
deep nesting, stray bytes) alongside ones that may happen to be valid. A body
the schema rejects must get a 4xx in the dialect's error shape; no answer may
be a 500 or take longer than the client's timeout. Every path also gets
fuzzed path parameters and a method it does not serve.

The store is empty and the default registry and Hugging Face endpoint point at
a local stub that answers 404 at once, so a body that happens to be valid is
refused quickly too (model not found) instead of reaching the internet.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.server import DmrServer, start_server
from tests.reliability.figures import record

EXAMPLES_PER_BODY_ROUTE = 100
EXAMPLES_PER_OTHER_ROUTE = 15
TIMEOUT = 30.0

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


class _Nothing(BaseHTTPRequestHandler):
    """Registry and Hugging Face stand-in: nothing exists here."""

    def _answer(self) -> None:
        body = b'{"errors":[{"code":"NAME_UNKNOWN"}]}'
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DmrServer]:
    stub = ThreadingHTTPServer(("127.0.0.1", 0), _Nothing)
    stub.daemon_threads = True
    thread = threading.Thread(target=stub.serve_forever, daemon=True)
    thread.start()
    host = f"127.0.0.1:{stub.server_address[1]}"
    server = start_server(
        tmp_path_factory.mktemp("reliability-fuzz"),
        {"DEFAULT_REGISTRY": host, "INSECURE_REGISTRY": "true", "HF_ENDPOINT": f"http://{host}"},
    )
    try:
        yield server
    finally:
        server.stop()
        stub.shutdown()
        stub.server_close()


def error_shape_ok(dialect: str, answer: httpx.Response) -> bool:
    try:
        body = answer.json()
    except ValueError:
        return False
    if not isinstance(body, dict):
        return False
    if dialect == "ollama":
        return isinstance(body.get("error"), str) and bool(body["error"])
    error = body.get("error")
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return False
    return dialect != "anthropic" or body.get("type") == "error"


@st.composite
def hostile_json_bodies(draw: st.DrawFn, schema: dict[str, Any]) -> bytes:
    """Bodies built to break `schema` (some may still satisfy it: checked later)."""
    properties: dict[str, Any] = schema.get("properties", {})
    required: list[str] = schema.get("required", [])
    kind = draw(
        st.sampled_from(
            ["bytes", "not_object", "wrong_types", "missing", "random_object", "deep", "bad_utf8"]
        )
    )
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "not_object":
        return json.dumps(draw(JSON_VALUES.filter(lambda v: not isinstance(v, dict)))).encode()
    if kind == "deep":
        depth = draw(st.integers(min_value=50, max_value=200_000))
        opener = draw(st.sampled_from(["[", '{"a":']))
        return (opener * depth).encode() + draw(st.sampled_from([b"", b"1", b"]"]))
    if kind == "bad_utf8":
        return b'{"model": "\xff\xfe' + draw(st.binary(max_size=20)) + b'"}'
    if kind == "random_object":
        keys = st.text(max_size=12)
        return json.dumps(draw(st.dictionaries(keys, JSON_VALUES, max_size=6))).encode()
    body: dict[str, Any] = {name: "ai/not-in-the-store" for name in required}
    if kind == "missing" and required:
        del body[draw(st.sampled_from(required))]
    elif properties:
        name = draw(st.sampled_from(sorted(properties)))
        body[name] = draw(JSON_VALUES)
    return json.dumps(body).encode()


def schema_accepts(schema: dict[str, Any], raw: bytes) -> bool:
    if not raw.strip() and not schema.get("required"):
        return True  # no body at all: every field takes its default
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return False
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return False
    return True


NASTY_PARAMS = ["..", "../../etc/passwd", "%2e%2e%2f", "a" * 300, "sha256:" + "0" * 64, "\x00"]
PATH_PARAMS = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=40
) | st.sampled_from(NASTY_PARAMS)


# Path parameters that route (a backend that exists, a name that does not).
REAL_PARAMS = {"backend": "llama.cpp", "name": "ai/not-in-the-store", "response_id": "resp_x"}


def fill_path(path: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        path = path.replace("{" + name + "}", quote(value, safe="/" if name == "name" else ""))
    return path


class Fuzzer:
    def __init__(self, server: DmrServer) -> None:
        self.client = httpx.Client(base_url=server.url, timeout=TIMEOUT)
        self.statuses: Counter[int] = Counter()
        self.problems: list[str] = []
        self.requests = 0
        self.slowest = 0.0
        self.previous = ""

    def send(
        self, method: str, path: str, body: bytes | None, content_type: str | None
    ) -> httpx.Response | None:
        headers = {"Content-Type": content_type} if content_type else {}
        started = time.monotonic()
        try:
            answer = self.client.request(method, path, content=body, headers=headers)
        except httpx.TimeoutException:
            self.problems.append(f"{method} {path}: no answer within {TIMEOUT}s")
            return None
        except httpx.TransportError as error:
            # The server dropped the connection: on this request, or after the
            # previous one on the same keep-alive connection.
            self.problems.append(f"{method} {path} (after {self.previous}): {error!r}")
            return None
        finally:
            self.previous = f"{method} {path} {body[:60] if body else b''!r}"
        self.slowest = max(self.slowest, time.monotonic() - started)
        self.requests += 1
        self.statuses[answer.status_code] += 1
        return answer

    def check(
        self, method: str, path: str, dialect: str, answer: httpx.Response | None, must_4xx: bool
    ) -> None:
        if answer is None:
            return
        status = answer.status_code
        if status == 404 and answer.request.url.path != path.split("?")[0]:
            return  # a fuzzed parameter with a `/` in it: another path, no route
        sent = answer.request.content[:80]
        where = f"{method} {path} {sent!r} -> {status}: {answer.text[:200]}"
        if status == 500 or (must_4xx and not 400 <= status < 500):
            self.problems.append(where)
        elif 400 <= status < 500 and method != "HEAD" and not error_shape_ok(dialect, answer):
            self.problems.append("wrong error shape: " + where)


def operations(server: DmrServer) -> list[tuple[str, str, dict[str, Any]]]:
    spec = httpx.get(server.url + "/openapi.json", timeout=30).json()
    return [
        (path, method.upper(), operation)
        for path, methods in spec["paths"].items()
        for method, operation in methods.items()
    ]


def test_openapi_lists_the_real_routes(fuzz_server: DmrServer) -> None:
    ops = operations(fuzz_server)
    listed = {(method, path) for path, method, _ in ops}
    for expected in [
        ("POST", "/engines/v1/chat/completions"),
        ("POST", "/api/chat"),
        ("POST", "/anthropic/v1/messages"),
        ("GET", "/models/{name}"),
        ("GET", "/openapi.json"),
    ]:
        assert expected in listed
    dialects = {op["x-dmr-dialect"] for _, _, op in ops}
    assert dialects == {"openai", "ollama", "anthropic"}


def quiet(examples: int) -> settings:
    # No deadline (a shared 2-core machine is slow at times), no example database
    # (runs do not depend on each other), no health checks (the server is the target).
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


CONTENT_TYPES = ["application/json", "text/plain", None, "application/x-www-form-urlencoded"]


def fuzz_operation(fuzzer: Fuzzer, path: str, method: str, operation: dict[str, Any]) -> None:
    dialect = operation["x-dmr-dialect"]
    params = [p["name"] for p in operation["parameters"]]
    content = operation.get("requestBody", {}).get("content", {})
    schema = content.get("application/json", {}).get("schema")

    if schema is not None:

        @quiet(EXAMPLES_PER_BODY_ROUTE)
        @given(body=hostile_json_bodies(schema), content_type=st.sampled_from(CONTENT_TYPES))
        def fuzz_body(body: bytes, content_type: str | None) -> None:
            target = fill_path(path, {name: REAL_PARAMS.get(name, "x") for name in params})
            answer = fuzzer.send(method, target, body, content_type)
            fuzzer.check(method, target, dialect, answer, not schema_accepts(schema, body))

        fuzz_body()

    @quiet(EXAMPLES_PER_OTHER_ROUTE)
    @given(
        values=st.fixed_dictionaries({name: PATH_PARAMS for name in params}),
        junk=st.none() | st.binary(max_size=64),
    )
    def fuzz_params(values: dict[str, str], junk: bytes | None) -> None:
        target = fill_path(path, values)
        answer = fuzzer.send(method, target, junk if method != "GET" else None, None)
        fuzzer.check(method, target, dialect, answer, must_4xx=False)

    fuzz_params()

    # A method the path does not serve: 405 in the dialect's shape.
    wrong = "PUT" if method != "PUT" else "PATCH"
    target = fill_path(path, {name: "x" for name in params})
    fuzzer.check(wrong, target, dialect, fuzzer.send(wrong, target, b"{}", None), True)


def test_fuzzed_bodies_get_4xx_in_the_dialect_shape(fuzz_server: DmrServer) -> None:
    fuzzer = Fuzzer(fuzz_server)
    started = time.monotonic()
    ops = operations(fuzz_server)
    try:
        for path, method, operation in ops:
            if path.endswith("/openapi.json") or (method == "GET" and path == "/logs"):
                continue  # nothing to fuzz / a stream that follows when asked
            fuzz_operation(fuzzer, path, method, operation)
    finally:
        fuzzer.client.close()
    elapsed = time.monotonic() - started
    record(
        "fuzz_every_route",
        operations=len(ops),
        requests=fuzzer.requests,
        seconds=round(elapsed, 1),
        slowest_answer_s=round(fuzzer.slowest, 2),
        statuses={str(k): v for k, v in sorted(fuzzer.statuses.items())},
        problems=len(fuzzer.problems),
    )
    assert not fuzzer.problems, "\n".join(fuzzer.problems[:30])
    assert fuzz_server.process.poll() is None
