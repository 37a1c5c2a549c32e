"""`dmr context`: named remote runners, stored where Docker Model Runner's CLI keeps them
($DOCKER_CONFIG/model/contexts.json, its shape), and the active one is where every
command goes (after MODEL_RUNNER_HOST). Real CLI, real server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.server import DmrServer, free_port
from tests.fixtures.test_engine import add_test_model


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dmr", *args], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def local_env(test_engine_server: DmrServer, tmp_path: Path) -> dict[str, str]:
    """No MODEL_RUNNER_HOST, a local port where nothing listens, nothing auto-started:
    a command reaches the test server only through the active context."""
    env = {k: v for k, v in test_engine_server.env.items() if k != "MODEL_RUNNER_HOST"}
    env.update(
        DOCKER_CONFIG=str(tmp_path / "docker-config"),
        MODEL_RUNNER_PORT=str(free_port()),
        MODELS_PATH=str(tmp_path / "local-models"),
        DMR_NO_AUTOSTART="1",
        COLUMNS="200",
    )
    return env


def test_create_use_ls_inspect_rm(test_engine_server: DmrServer, local_env: dict[str, str]) -> None:
    add_test_model(test_engine_server.models_path, "test/remote-one")
    env = local_env
    host = test_engine_server.url

    created = cli(env, "context", "create", "lab", "--host", host, "--description", "the lab")
    assert created.returncode == 0, created.stderr
    assert created.stdout == 'Context "lab" created.\n'
    stored = json.loads((Path(env["DOCKER_CONFIG"]) / "model" / "contexts.json").read_text())
    assert stored["version"] == 1 and "current" not in stored
    lab = stored["contexts"]["lab"]
    assert lab["host"] == host and lab["description"] == "the lab"
    assert lab["tls"] == {"enabled": False, "skipVerify": False, "caCert": ""}
    assert lab["createdAt"].endswith("Z")

    # Not active yet: the local server is not running and none may start.
    assert cli(env, "ls").returncode != 0
    listed = [line.strip() for line in cli(env, "context", "ls").stdout.splitlines()]
    assert listed[0].split() == ["NAME", "HOST", "DESCRIPTION", "CURRENT"]
    assert listed[1].startswith("default") and listed[1].endswith("*")
    assert listed[2].startswith("lab") and host in listed[2] and not listed[2].endswith("*")

    used = cli(env, "context", "use", "lab")
    assert used.stdout == 'Current context is now "lab".\n'
    answered = cli(env, "ls")
    assert answered.returncode == 0, answered.stderr
    assert "test/remote-one" in answered.stdout  # the lab server's store
    assert cli(env, "context", "ls").stdout.splitlines()[2].strip().endswith("*")
    overridden = cli({**env, "MODEL_RUNNER_HOST": "http://127.0.0.1:9"}, "context", "ls")
    assert "MODEL_RUNNER_HOST='http://127.0.0.1:9' overrides the active context" in (
        overridden.stderr
    )

    [shown, default] = json.loads(cli(env, "context", "inspect", "lab", "default").stdout)
    assert shown["name"] == "lab" and shown["host"] == host
    assert default["name"] == "default" and default["host"] == "(auto-detect)"

    refused = cli(env, "context", "rm", "lab")
    assert refused.returncode != 0 and "is currently active" in refused.stderr
    assert cli(env, "context", "use", "default").returncode == 0
    removed = cli(env, "context", "rm", "lab")
    assert removed.returncode == 0 and removed.stdout == 'Context "lab" removed.\n'
    assert json.loads(Path(env["DOCKER_CONFIG"], "model", "contexts.json").read_text()) == {
        "version": 1,
        "contexts": {},
    }


def test_bad_input_is_refused_clearly(local_env: dict[str, str]) -> None:
    env = local_env
    for args, message in [
        (("create", "default", "--host", "http://x:1"), "context name 'default' is reserved"),
        (("create", "-bad", "--host", "http://x:1"), "No such option"),
        (("create", "a b", "--host", "http://x:1"), "invalid context name 'a b'"),
        (("create", "lab"), "--host is required"),
        (("create", "lab", "--host", "x:1"), "must include scheme and host"),
        (("create", "lab", "--host", "ftp://x:1"), "unsupported scheme 'ftp'"),
        (("create", "lab", "--host", "http://x:1", "--tls-ca-cert", "/nope.pem"), "cannot read"),
        (("use", "nowhere"), "context 'nowhere' not found"),
        (("rm", "default"), "is reserved and cannot be removed"),
        (("inspect", "nowhere"), "context 'nowhere' not found"),
    ]:
        result = cli(env, "context", *args)
        assert result.returncode != 0, args
        assert message in result.stderr, (args, result.stderr)
    assert cli(env, "context", "create", "lab", "--host", "http://x:1").returncode == 0
    again = cli(env, "context", "create", "lab", "--host", "http://x:1")
    assert again.returncode != 0 and "context 'lab' already exists" in again.stderr


def test_an_active_context_that_does_not_answer_is_named(local_env: dict[str, str]) -> None:
    env = {**local_env, "DMR_NO_AUTOSTART": ""}  # autostart allowed: still nothing is started
    dead = f"http://127.0.0.1:{free_port()}"
    assert cli(env, "context", "create", "gone", "--host", dead).returncode == 0
    assert cli(env, "context", "use", "gone").returncode == 0

    result = cli(env, "ls")

    assert result.returncode != 0
    assert f"cannot reach the server of context gone at {dead}" in result.stderr
    assert "`dmr context use default`" in result.stderr
    assert not (Path(env["MODELS_PATH"]) / "logs").exists()  # no local server was started
