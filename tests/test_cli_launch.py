"""`dmr launch`: each app started with its environment pointed at this server, as
`docker model launch` gives it. The apps are FAKES (none is installed here): small
executables on PATH, in a folder named `fake-apps`, that record their argv and
environment as JSON and exit 0 (or the code they are told)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.server import DmrServer

FAKE_APP = """#!{python}
# FAKE {name}: stands in for the real app in dmr's tests; records how it was run.
import json, os, sys
with open({record!r}, "w") as out:
    json.dump({{"argv": sys.argv, "env": dict(os.environ)}}, out)
sys.exit(int(os.environ.get("FAKE_APP_EXIT", "0")))
"""


def fake_app(folder: Path, name: str) -> Path:
    """A fake `name` executable in `folder`; returns where it writes its record."""
    folder.mkdir(exist_ok=True)
    record = folder / f"{name}.record.json"
    path = folder / name
    path.write_text(FAKE_APP.format(python=sys.executable, name=name, record=str(record)))
    path.chmod(0o755)
    return record


@pytest.fixture
def env(test_engine_server: DmrServer, tmp_path: Path) -> dict[str, str]:
    """The CLI's environment with PATH holding only the fake apps and Python's folder
    (so no real app or docker is found), HOME in the test's folder."""
    folder = tmp_path / "fake-apps"
    folder.mkdir()
    return {
        **test_engine_server.env,
        "PATH": f"{folder}:{Path(sys.executable).parent}",
        "HOME": str(tmp_path / "home"),
    }


def launch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dmr", "launch", *args],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def fakes(env: dict[str, str]) -> Path:
    return Path(env["PATH"].split(":")[0])


KEY = "sk-docker-model-runner"


@pytest.mark.parametrize(
    ("app", "expected"),
    [
        ("codex", {"OPENAI_BASE_URL": "{url}/v1", "OPENAI_API_KEY": KEY}),
        ("opencode", {"OPENAI_BASE_URL": "{url}/engines/v1"}),
        ("claude", {"ANTHROPIC_BASE_URL": "{url}/anthropic", "ANTHROPIC_API_KEY": KEY}),
    ],
)  # fmt: skip
def test_host_apps_run_with_their_environment(
    env: dict[str, str], test_engine_server: DmrServer, app: str, expected: dict[str, str]
) -> None:
    record = fake_app(fakes(env), app)

    result = launch(env, app, "--", "--print", "hello there")

    assert result.returncode == 0, result.stderr
    ran = json.loads(record.read_text())
    assert ran["argv"][1:] == ["--print", "hello there"]
    for key, value in expected.items():
        assert ran["env"][key] == value.format(url=test_engine_server.url), key
    assert ran["env"]["HOME"] == env["HOME"]  # the rest of the environment is kept


def test_the_pointed_at_urls_answer(env: dict[str, str], test_engine_server: DmrServer) -> None:
    """The URLs given are ones this server serves: a model list on each."""
    record = fake_app(fakes(env), "codex")
    assert launch(env, "codex").returncode == 0
    given = json.loads(record.read_text())["env"]
    import httpx

    assert httpx.get(given["OPENAI_BASE_URL"] + "/models").json()["object"] == "list"
    record = fake_app(fakes(env), "claude")
    assert launch(env, "claude").returncode == 0
    anthropic = json.loads(record.read_text())["env"]["ANTHROPIC_BASE_URL"]
    answer = httpx.post(anthropic + "/v1/messages", json={})
    assert answer.status_code == 400 and answer.json()["type"] == "error"  # Anthropic's shape
    assert test_engine_server.url in anthropic


def test_the_app_exit_code_is_passed_on(env: dict[str, str]) -> None:
    fake_app(fakes(env), "codex")
    assert launch({**env, "FAKE_APP_EXIT": "3"}, "codex").returncode == 3


def test_a_missing_app_says_how_to_get_it(
    env: dict[str, str], test_engine_server: DmrServer
) -> None:
    result = launch(env, "claude")

    assert result.returncode == 1
    assert "'claude' executable not found in PATH." in result.stderr
    assert f"ANTHROPIC_BASE_URL={test_engine_server.url}/anthropic" in result.stderr
    assert "npm install -g @anthropic-ai/claude-code" in result.stderr


def test_openwebui_runs_open_webui_serve_with_both_connections(
    env: dict[str, str], test_engine_server: DmrServer
) -> None:
    record = fake_app(fakes(env), "open-webui")

    result = launch(env, "openwebui", "--port", "3999")

    assert result.returncode == 0, result.stderr
    ran = json.loads(record.read_text())
    assert ran["argv"][1:] == ["serve", "--port", "3999"]
    url = test_engine_server.url
    assert ran["env"]["OPENAI_API_BASE_URL"] == f"{url}/engines/v1"
    assert ran["env"]["OLLAMA_BASE_URL"] == url
    assert ran["env"]["WEBUI_AUTH"] == "false"


def test_web_apps_without_their_command_use_docker_or_say_how(
    env: dict[str, str], test_engine_server: DmrServer
) -> None:
    port = test_engine_server.url.rsplit(":", 1)[1]
    dry = launch(env, "anythingllm", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith(
        "Would run: docker run --rm -p 3001:3001 -v anythingllm_storage:/app/server/storage"
        " --add-host host.docker.internal:host-gateway -e STORAGE_DIR=/app/server/storage"
        " -e LLM_PROVIDER=docker-model-runner"
        f" -e DOCKER_MODEL_RUNNER_BASE_PATH=http://host.docker.internal:{port}"
        " mintplexlabs/anythingllm:latest"
    )
    missing = launch(env, "openwebui")
    assert missing.returncode == 1
    assert "pip install open-webui" in missing.stderr and "or docker" in missing.stderr

    record = fake_app(fakes(env), "docker")  # a FAKE docker: records the run it was given
    ran = launch(env, "openwebui", "--detach", "--port", "3100")
    assert ran.returncode == 0, ran.stderr
    argv = json.loads(record.read_text())["argv"][1:]
    assert argv[:5] == ["run", "--rm", "-d", "-p", "3100:8080"]
    assert argv[-1] == "ghcr.io/open-webui/open-webui:latest"
    assert f"OPENAI_API_BASE_URL=http://host.docker.internal:{port}/engines/v1" in argv


def test_list_config_dry_run_and_errors(env: dict[str, str], test_engine_server: DmrServer) -> None:
    fake_app(fakes(env), "codex")
    listed = launch(env).stdout
    assert listed.startswith("Supported apps:")
    lines = {line.split()[0]: line for line in listed.splitlines()[2:-2] if line.strip()}
    assert sorted(lines) == ["anythingllm", "claude", "codex", "openclaw", "opencode", "openwebui"]
    assert "(not installed)" in lines["claude"] and "(not installed)" not in lines["codex"]

    config = launch(env, "claude", "--config")
    assert config.stdout.splitlines()[0] == "Configuration for claude (host app):"
    assert f"ANTHROPIC_BASE_URL={test_engine_server.url}/anthropic" in config.stdout

    dry = launch(env, "codex", "--dry-run", "--", "exec", "hi")
    assert dry.stdout.splitlines()[0] == "Would run: codex exec hi"
    assert not (fakes(env) / "codex.record.json").exists()  # nothing ran

    claw = launch(env, "openclaw", "--dry-run")
    assert "openclaw config set models.providers.docker-model-runner.baseUrl" in claw.stdout

    loose = launch(env, "codex", "exec")
    assert loose.returncode == 1 and "Use '--' to pass extra arguments" in loose.stderr

    unknown = launch(env, "emacs")
    assert unknown.returncode == 1 and "unsupported app 'emacs'" in unknown.stderr


def test_opencode_model_writes_its_provider(
    env: dict[str, str], test_engine_server: DmrServer
) -> None:
    fake_app(fakes(env), "opencode")
    config_path = Path(env["HOME"]) / ".config" / "opencode" / "opencode.json"
    config_path.parent.mkdir(parents=True)
    config_path.write_text(json.dumps({"theme": "dark"}))

    assert launch(env, "opencode", "--model", "ai/smollm2").returncode == 0

    config = json.loads(config_path.read_text())
    assert config["theme"] == "dark"  # kept
    provider = config["provider"]["dmr"]
    assert provider["options"]["baseURL"] == f"{test_engine_server.url}/v1"
    assert provider["models"]["ai/smollm2"] == {"name": "ai/smollm2", "_launch": True}
    assert os.access(fakes(env) / "opencode", os.X_OK)
