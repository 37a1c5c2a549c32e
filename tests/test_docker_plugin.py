"""`docker model` through the real `docker` CLI, with the plugin `dmr docker-plugin install`
writes, and the calls Docker Compose makes for a project's `models:`.

The docker CLI runs plugins without a Docker daemon; `scripts/install-test-deps`
installs Debian's `docker.io` where no `docker` is on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.registry import LocalRegistry
from tests.fixtures.server import DmrServer
from tests.fixtures.store import package_smollm2
from tests.fixtures.test_engine import add_test_model


@dataclass
class Docker:
    """The `docker` CLI with its own DOCKER_CONFIG, aimed at one dmr server."""

    env: dict[str, str]

    @property
    def plugin(self) -> Path:
        return Path(self.env["DOCKER_CONFIG"]) / "cli-plugins" / "docker-model"

    def dmr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run([sys.executable, "-m", "dmr", *args])

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self._run(["docker", *args], timeout)

    def plugin_itself(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The plugin's file run directly, as Docker Compose runs it."""
        return self._run([str(self.plugin), *args])

    def _run(self, command: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, env=self.env, capture_output=True, text=True, timeout=timeout
        )


def docker_for(server: DmrServer, config_dir: Path) -> Docker:
    if shutil.which("docker") is None:
        pytest.skip("the docker CLI is not installed (scripts/install-test-deps)")
    docker = Docker({**server.env, "DOCKER_CONFIG": str(config_dir)})
    installed = docker.dmr("docker-plugin", "install")
    assert installed.returncode == 0, installed.stderr
    return docker


@pytest.fixture
def docker(test_engine_server: DmrServer, tmp_path: Path) -> Iterator[Docker]:
    yield docker_for(test_engine_server, tmp_path / "docker-config")


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"rc {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


# --------------------------------------------------------------------------- the plugin


def test_install_writes_a_plugin_the_docker_cli_lists(docker: Docker) -> None:
    assert docker.plugin.is_file() and os.access(docker.plugin, os.X_OK)
    metadata = json.loads(ok(docker.plugin_itself("docker-cli-plugin-metadata")))
    assert metadata["SchemaVersion"] == "0.1.0"
    assert metadata["Vendor"] == "dmr" and metadata["Version"] and metadata["ShortDescription"]

    listed = ok(docker("help"))
    assert any(line.split()[:1] == ["model*"] for line in listed.splitlines()), listed
    assert "Client version:" in ok(docker("model", "version"))
    assert "Server version: 0.1.0" in ok(docker("model", "version"))
    # The docker CLI's own options come before `model`; the plugin drops them.
    assert "Server version:" in ok(docker("--log-level", "warn", "-D", "model", "version"))
    ok(docker.dmr("docker-plugin", "install"))  # again: replaces its own file


def test_uninstall_removes_it_and_docker_model_then_fails(docker: Docker) -> None:
    assert ok(docker.dmr("docker-plugin", "uninstall")).startswith("Removed ")
    assert not docker.plugin.exists()
    gone = docker("model", "ls")
    assert gone.returncode != 0
    assert "model" in gone.stderr
    assert "No docker-model plugin" in ok(docker.dmr("docker-plugin", "uninstall"))


def test_a_docker_model_that_dmr_did_not_write_is_left_alone(docker: Docker) -> None:
    docker.plugin.write_text("#!/bin/sh\necho someone else's\n")

    refused = docker.dmr("docker-plugin", "install")
    kept = docker.dmr("docker-plugin", "uninstall")

    for result in (refused, kept):
        assert result.returncode == 1
        assert result.stderr.startswith("error: ") and "--force" in result.stderr
    assert "someone else's" in docker.plugin.read_text()
    ok(docker.dmr("docker-plugin", "install", "--force"))
    assert "Server version:" in ok(docker("model", "version"))


# --------------------------------------------------------------------------- verbs


def test_docker_model_ls_ps_status_and_run(docker: Docker, test_engine_server: DmrServer) -> None:
    server = test_engine_server
    add_test_model(server.models_path, "test/docker")

    assert "test/docker" in ok(docker("model", "ls"))
    [model] = json.loads(ok(docker("model", "ls", "--json")))
    assert model["tags"] == ["test/docker:latest"] and model["id"].startswith("sha256:")
    assert isinstance(model["created"], int) and isinstance(model["config"], dict)

    assert ok(docker("model", "run", "test/docker", "hello there")) == (
        "[1 messages] echo: hello there\n"
    )
    ps = ok(docker("model", "ps"))
    assert ps.startswith("MODEL NAME") and "test/docker" in ps

    status = json.loads(ok(docker("model", "status", "--json")))
    assert status["running"] is True
    assert status["endpoint"] == f"{server.url}/engines/v1/"
    assert status["endpointHost"] == status["endpoint"]
    assert status["backends"]["test-engine"].startswith("Running")
    assert status["engines"] == status["backends"]  # dmr's own field, kept
    assert "Docker Model Runner is running" in ok(docker("model", "status"))


def test_compose_reads_json_only(docker: Docker, test_engine_server: DmrServer) -> None:
    """Compose runs the plugin's file itself and parses stdout and stderr together."""
    add_test_model(test_engine_server.models_path, "test/composed")
    for args in (("ls", "--json"), ("status", "--json")):
        result = docker.plugin_itself(*args)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        json.loads(result.stdout)
    status = json.loads(docker.plugin_itself("status", "--json").stdout)
    assert status["endpoint"] == f"{test_engine_server.url}/engines/v1/"


def test_compose_provider_sequence_through_the_docker_cli(
    docker: Docker, test_engine_server: DmrServer
) -> None:
    """What Compose runs for `provider: {type: model, options: {model, context-size,
    runtime-flags}}` (service `llm`): `compose metadata`, then `compose --project-name P
    up --OPTION=VALUE ... llm`, reading JSON lines from stdout; later `down`."""
    server = test_engine_server
    add_test_model(server.models_path, "test/provided")

    metadata = json.loads(ok(docker("model", "compose", "metadata")))
    assert metadata["description"] == "Docker Model Runner"
    options = {p["name"]: p for p in metadata["up"]["parameters"]}
    assert sorted(options) == [
        "backend", "context-size", "model", "runtime-flags", "speculative-draft-model",
        "speculative-min-acceptance-rate", "speculative-num-tokens",
    ]  # fmt: skip
    assert options["model"]["required"] is True and options["model"]["type"] == "stringArray"
    assert options["context-size"] == {
        "name": "context-size",
        "description": "context size for the model",
        "required": False,
        "type": "int64",
        "default": "-1",
    }
    assert metadata["down"]["parameters"] is None

    up = docker.plugin_itself(
        "compose", "--project-name", "demo", "up", "--model=test/provided",
        "--context-size=2048", "--runtime-flags=--temp 0", "llm",
    )  # fmt: skip
    assert up.returncode == 0, up.stdout + up.stderr
    lines = [json.loads(line) for line in up.stdout.splitlines()]
    assert {line["type"] for line in lines} <= {"info", "setenv"}
    setenv = dict(line["message"].split("=", 1) for line in lines if line["type"] == "setenv")
    assert setenv == {"MODEL": "test/provided", "URL": f"{server.url}/engines/v1/"}
    infos = [line["message"] for line in lines if line["type"] == "info"]
    assert infos[0] == "Initializing model runner..."
    assert "Setting context size to 2048" in infos
    assert "Setting raw runtime flags to --temp 0" in infos
    assert infos[-1] == "Successfully configured backend for model test/provided"
    with server.client() as http:
        [config] = http.get("/engines/_configure", params={"model": "test/provided"}).json()
    assert config["context-size"] == 2048 and config["runtime-flags"] == ["--temp", "0"]

    # Through the docker CLI too (`docker model compose ...`), then `down`.
    again = ok(
        docker("model", "compose", "--project-name", "demo", "up", "--model", "test/provided")
    )
    assert json.loads(again.splitlines()[-1])["type"] == "setenv"
    assert ok(docker.plugin_itself("compose", "--project-name", "demo", "down", "llm")) == ""


def test_compose_provider_errors_are_json_lines(docker: Docker) -> None:
    missing = docker.plugin_itself("compose", "--project-name", "demo", "up", "llm")
    assert missing.returncode == 1
    assert json.loads(missing.stdout) == {"type": "error", "message": "options.model is required"}

    # A registry that refuses connections: the pull fails at once, said as Compose reads it.
    unpullable = docker.plugin_itself(
        "compose", "--project-name", "demo", "up", "--model=127.0.0.1:1/x/y:1", "llm"
    )
    assert unpullable.returncode == 1
    last = json.loads(unpullable.stdout.splitlines()[-1])
    assert last["type"] == "error" and last["message"].startswith("Failed to pull model: ")


# --------------------------------------------------------------------------- SmolLM2


@pytest.mark.llama
def test_docker_model_run_answers_with_smollm2(smollm2_server: DmrServer, tmp_path: Path) -> None:
    docker = docker_for(smollm2_server, tmp_path / "docker-config")

    answer = ok(docker("model", "run", "ai/smollm2", "What is the capital of France?"))

    assert answer.strip(), "the model printed nothing"
    assert "ai/smollm2" in ok(docker("model", "ps"))


@pytest.mark.llama
@pytest.mark.registry
def test_compose_sequence_then_the_printed_endpoint_answers(
    dmr_server_factory: Callable[..., DmrServer],
    oci_registry: LocalRegistry,
    smollm2_gguf: Path,
    tmp_path: Path,
) -> None:
    """Compose's calls for `models: {llm: {model: M, context_size: 2048, runtime_flags:
    [...]}}`, in its order, through the docker CLI: the model is pulled from the local
    registry (pushed there first by `docker model push`)."""
    import openai

    server = dmr_server_factory(INSECURE_REGISTRY="true")
    model = f"{oci_registry.host}/ai/smollm2-compose:v1"
    package_smollm2(server.models_path, smollm2_gguf, tag=model)
    docker = docker_for(server, tmp_path / "docker-config")
    ok(docker("model", "push", model))
    ok(docker("model", "rm", model))

    available = json.loads(ok(docker("model", "ls", "--json")))
    assert model not in [tag for listed in available for tag in listed["tags"]]
    ok(docker("model", "pull", model))
    ok(docker("model", "configure", "--context-size", "2048", model, "--", "--temp", "0"))
    status = json.loads(ok(docker("model", "status", "--json")))
    available = json.loads(ok(docker("model", "ls", "--json")))
    assert model in [tag for listed in available for tag in listed["tags"]]

    configured = json.loads(ok(docker("model", "configure", "show", model)))
    assert "2048" in json.dumps(configured) and "--temp" in json.dumps(configured)
    client = openai.OpenAI(base_url=status["endpoint"], api_key="unused")
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
    )
    assert reply.choices[0].message.content
    with server.client() as http:
        [runner] = http.get("/engines/ps").json()
    assert runner["model_name"] in (model, model.removesuffix(":v1"))
