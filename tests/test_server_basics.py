"""The server starts, answers as DMR does on its fixed routes, and reports engines."""

from __future__ import annotations

import re
import socket
import time

from tests.fixtures.server import DmrServer


def test_root_answers_like_dmr(dmr_server: DmrServer) -> None:
    with dmr_server.client() as client:
        response = client.get("/")
    assert response.status_code == 200
    assert response.text == "Docker Model Runner is running"


def test_version_route_and_cli(dmr_server: DmrServer) -> None:
    with dmr_server.client() as client:
        version = client.get("/version").json()["version"]
    result = dmr_server.cli("version")
    assert result.returncode == 0, result.stderr
    assert f"Server version: {version}" in result.stdout


def test_engines_status_lists_every_known_engine(dmr_server: DmrServer) -> None:
    with dmr_server.client() as client:
        status = client.get("/engines/status").json()
    for engine in ("llama.cpp", "vllm", "diffusers"):
        assert engine in status
        state = status[engine].split(":", 1)[0]
        assert state in {"Running", "Error", "Not Installed", "Installing"}


def test_server_binds_loopback_only(dmr_server: DmrServer) -> None:
    import psutil

    connections = psutil.Process(dmr_server.process.pid).net_connections(kind="tcp")
    listening = [c.laddr for c in connections if c.status == psutil.CONN_LISTEN]
    assert listening, "server is not listening"
    assert all(addr.ip == "127.0.0.1" for addr in listening)


def test_an_answer_before_the_body_keeps_the_connection_usable(dmr_server: DmrServer) -> None:
    """A 404 for an unknown backend is decided before the body is read; the body must
    still be consumed, or the connection dies under a client that reuses it (found by
    the fuzzer as "server disconnected without sending a response")."""
    with socket.create_connection(("127.0.0.1", dmr_server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /engines/nope/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n"
        )
        time.sleep(0.2)  # the body arrives after the routing decision
        sock.sendall(b"{}")
        first = _read_response(sock)
        sock.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
        second = _read_response(sock)
    assert first.startswith(b"HTTP/1.1 404")
    assert second.startswith(b"HTTP/1.1 200") and b'"version"' in second


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body
