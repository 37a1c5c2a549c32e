"""The server starts, answers as DMR does on its fixed routes, and reports engines."""

from __future__ import annotations

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
