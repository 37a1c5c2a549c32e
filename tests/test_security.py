"""API key, CORS and TLS against live `dmr serve` processes and real clients."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.fixtures.server import DmrServer, free_port

ServerFactory = Callable[..., DmrServer]
API_KEY = "test-key-5f1c9a"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DmrServer]:
    from tests.fixtures.server import start_server

    server = start_server(tmp_path_factory.mktemp("dmr-keyed"), {"DMR_API_KEY": API_KEY})
    yield server
    server.stop()


# --------------------------------------------------------------------------- API key


def test_api_key_guards_every_route_but_root_and_health(keyed_server: DmrServer) -> None:
    with httpx.Client(base_url=keyed_server.url, timeout=30) as client:
        assert client.get("/").status_code == 200
        assert client.get("/engines/status").status_code == 200
        for method, path in [
            ("GET", "/models"),
            ("GET", "/version"),
            ("GET", "/engines/ps"),
            ("GET", "/v1/models"),
            ("POST", "/engines/v1/chat/completions"),
            ("POST", "/models/create"),
            ("GET", "/api/tags"),
            ("GET", "/no/such/route"),
        ]:
            response = client.request(method, path, json={} if method == "POST" else None)
            assert response.status_code == 401, (method, path, response.text)
            error = response.json()["error"]
            assert error["type"] == "authentication_error"
            assert error["code"] == "invalid_api_key"
        wrong = client.get("/models", headers={"Authorization": "Bearer not-the-key"})
        assert wrong.status_code == 401
        near = client.get("/models", headers={"Authorization": f"Bearer {API_KEY}x"})
        assert near.status_code == 401
        assert client.get("/models", headers={"Authorization": f"Bearer {API_KEY}"}).json() == []
        assert client.get("/models", headers={"x-api-key": API_KEY}).status_code == 200


def test_api_key_open_prefix_cannot_be_escaped(keyed_server: DmrServer) -> None:
    with httpx.Client(base_url=keyed_server.url, timeout=30) as client:
        # The web UI's page asks for the key itself, so it loads without one (404 without a UI).
        assert client.get("/ui").status_code != 401
        assert client.get("/ui/static/none.js").status_code != 401
    # httpx normalises "..", so the request line is written by hand.
    with socket.create_connection(("127.0.0.1", keyed_server.port), timeout=10) as sock:
        sock.sendall(
            b"GET /ui/static/../../models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]


def test_api_key_from_file(dmr_server_factory: ServerFactory, tmp_path: Path) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text("from-a-file\n")
    server = dmr_server_factory(DMR_API_KEY_FILE=str(key_file))
    with server.client() as client:
        assert client.get("/models").status_code == 401
        auth = {"Authorization": "Bearer from-a-file"}
        assert client.get("/models", headers=auth).status_code == 200


def test_real_clients_pass_the_key(keyed_server: DmrServer) -> None:
    # OpenAI and Anthropic SDKs send their api_key; Ollama's client takes headers.
    good = openai.OpenAI(base_url=keyed_server.url + "/engines/v1", api_key=API_KEY)
    assert good.models.list().data == []
    bad = openai.OpenAI(base_url=keyed_server.url + "/engines/v1", api_key="nope")
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()

    claude = anthropic.Anthropic(base_url=keyed_server.url + "/anthropic", api_key="nope")
    with pytest.raises(anthropic.AuthenticationError):
        claude.messages.create(
            model="ai/smollm2", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )

    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert ollama.Client(host=keyed_server.url, headers=headers).list().models == []
    with pytest.raises(ollama.ResponseError) as denied:
        ollama.Client(host=keyed_server.url).list()
    assert denied.value.status_code == 401


def test_cli_sends_the_key(keyed_server: DmrServer) -> None:
    def dmr_ls(key: str | None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in keyed_server.env.items() if k != "DMR_API_KEY"}
        if key is not None:
            env["DMR_API_KEY"] = key
        return subprocess.run(
            [sys.executable, "-m", "dmr", "ls"], env=env, capture_output=True, text=True, timeout=60
        )

    assert dmr_ls(None).returncode != 0
    result = dmr_ls(API_KEY)
    assert result.returncode == 0, result.stderr + result.stdout


# --------------------------------------------------------------------------- CORS


@pytest.fixture(scope="module")
def cors_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DmrServer]:
    from tests.fixtures.server import start_server

    origins = "https://app.example.com, http://tools.example.org:*"
    server = start_server(tmp_path_factory.mktemp("dmr-cors"), {"DMR_ORIGINS": origins})
    yield server
    server.stop()


@pytest.mark.parametrize(
    "origin",
    [
        "http://localhost:3000",
        "http://localhost:51234",
        "http://127.0.0.1:8080",
        "http://[::1]:5173",
        "https://app.example.com",
        "http://tools.example.org:9999",
        "http://tools.example.org:1",
    ],
)
def test_cors_allowed_origins(cors_server: DmrServer, origin: str) -> None:
    with cors_server.client() as client:
        simple = client.get("/models", headers={"Origin": origin})
        assert simple.status_code == 200
        assert simple.headers["Access-Control-Allow-Origin"] == origin
        assert "Origin" in simple.headers["Vary"]

        preflight = client.options(
            "/engines/v1/chat/completions",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == origin
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    assert int(preflight.headers["Access-Control-Max-Age"]) > 0


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example.com",
        "http://app.example.com",  # scheme differs from the allowed https origin
        "https://app.example.com:8443",  # no wildcard: only the default port
        "https://tools.example.org:9999",
        "http://localhost.evil.com:3000",
        "http://notlocalhost:3000",
        "null",
    ],
)
def test_cors_foreign_origins(cors_server: DmrServer, origin: str) -> None:
    with cors_server.client() as client:
        simple = client.get("/models", headers={"Origin": origin})
        assert simple.status_code == 200
        assert "Access-Control-Allow-Origin" not in simple.headers
        preflight = client.options(
            "/models", headers={"Origin": origin, "Access-Control-Request-Method": "GET"}
        )
    assert preflight.status_code == 403
    assert "Access-Control-Allow-Origin" not in preflight.headers


def test_cors_preflight_needs_no_key_and_401_is_readable(keyed_server: DmrServer) -> None:
    origin = "http://localhost:4000"
    with keyed_server.client() as client:
        preflight = client.options(
            "/v1/models", headers={"Origin": origin, "Access-Control-Request-Method": "GET"}
        )
        assert preflight.status_code == 204
        denied = client.get("/v1/models", headers={"Origin": origin})
    assert denied.status_code == 401
    # Without CORS headers on the 401 a browser app could not tell a bad key from a network error.
    assert denied.headers["Access-Control-Allow-Origin"] == origin


# --------------------------------------------------------------------------- TLS


def write_self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@contextlib.contextmanager
def serving(
    tmp_path: Path, probe: Callable[[], httpx.Response], **extra_env: str
) -> Iterator[httpx.Response]:
    """`dmr serve` with `extra_env`, for servers `start_server` cannot poll (TLS, other
    addresses); yields `probe()`'s first answer and stops the process group after."""
    env = dict(os.environ)
    env.update(MODELS_PATH=str(tmp_path / "models"), **extra_env)
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dmr", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        response: httpx.Response | None = None
        while response is None and time.monotonic() < deadline and process.poll() is None:
            try:
                response = probe()
            except httpx.ConnectError:
                time.sleep(0.2)
        assert response is not None, log_path.read_text()
        yield response
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)


def test_tls_serves_https_only(tmp_path: Path) -> None:
    cert, key = write_self_signed(tmp_path)
    port = free_port()
    trusted = ssl.create_default_context(cafile=str(cert))
    url = f"https://127.0.0.1:{port}"
    with serving(
        tmp_path,
        lambda: httpx.get(url + "/", verify=trusted, timeout=2),
        MODEL_RUNNER_PORT=str(port),
        MODEL_RUNNER_TLS_CERT=str(cert),
        MODEL_RUNNER_TLS_KEY=str(key),
    ) as response:
        assert response.text == "Docker Model Runner is running"
        assert httpx.get(url + "/models", verify=trusted, timeout=5).json() == []
        # The certificate is what the client checks: an untrusting client refuses it.
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/", timeout=5)
        # Plain HTTP on the TLS port gets no answer.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=5)


def test_bind_address_is_an_explicit_choice(tmp_path: Path) -> None:
    # Another loopback address stands in for "beyond 127.0.0.1" without leaving the machine.
    port = free_port()
    with serving(
        tmp_path,
        lambda: httpx.get(f"http://127.0.0.2:{port}/", timeout=2),
        MODEL_RUNNER_PORT=str(port),
        MODEL_RUNNER_BIND="127.0.0.2",
    ) as response:
        assert response.status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
