"""The README's main job: `dmr quickstart` packages SmolLM2, the model answers, and
the README's next step, an OpenAI client at http://127.0.0.1:PORT/engines/v1, works."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import psutil
import pytest
from dmr.testing import free_port

from tests.fixtures.server import DmrServer


def _quickstart_env(tmp_path: Path) -> dict[str, str]:
    # The default address, TCP on 127.0.0.1, on a free port: 12434 may be taken here.
    # Nothing answers there, so quickstart must start a server (auto-start is off for
    # the other tests: tests/conftest.py).
    elsewhere = {"MODEL_RUNNER_HOST", "MODEL_RUNNER_SOCK", "MODEL_RUNNER_BIND", "DMR_NO_AUTOSTART"}
    env = {k: v for k, v in os.environ.items() if k not in elsewhere}
    env.update(
        MODELS_PATH=str(tmp_path / "models"),
        MODEL_RUNNER_PORT=str(free_port()),
        COLUMNS="200",
    )
    return env


def _processes_using(models_path: Path) -> list[psutil.Process]:
    """Live processes (the server and its runners) started with this test's store."""
    found = []
    for process in psutil.process_iter():
        try:
            if (
                process.environ().get("MODELS_PATH") == str(models_path)
                and process.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.mark.llama
@pytest.mark.slow
def test_quickstart_starts_a_server_packages_smollm2_and_answers(
    tmp_path: Path, smollm2_gguf: Path
) -> None:
    env = _quickstart_env(tmp_path)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "dmr", "quickstart", "Say hello."],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Started the dmr server" in result.stderr
        assert "packaging it into the store as ai/smollm2, answers capped at 256" in result.stdout
        answer = result.stdout.split("dmr run ai/smollm2", 1)[1].split("\n", 1)[1]
        assert len(answer.strip()) > 5, result.stdout
        assert "`dmr stop-runner` stops it" in result.stdout
        assert (tmp_path / "models" / "models.json").read_text().count("ai/smollm2:latest") == 1
        # The server stays up, as Docker Model Runner's does, until stop-runner, and
        # the README's next step works: an OpenAI client at the printed endpoint.
        assert _processes_using(tmp_path / "models")
        status = subprocess.run(
            [sys.executable, "-m", "dmr", "status", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        endpoint = json.loads(status.stdout)["endpoint"]
        assert endpoint == f"http://127.0.0.1:{env['MODEL_RUNNER_PORT']}/engines/v1/"
        client = openai.OpenAI(base_url=endpoint, api_key="unused")
        chat = client.chat.completions.create(
            model="ai/smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert chat.choices[0].message.content
        # The sample's answer cap: an answer that never ends its turn (here made so
        # with llama.cpp's ignore_eos) stops at 256 tokens, not at the 4,096-token context.
        endless = client.with_options(timeout=180, max_retries=0).chat.completions.create(
            model="ai/smollm2",
            messages=[{"role": "user", "content": "Hi"}],
            extra_body={"ignore_eos": True},
        )
        assert endless.choices[0].finish_reason == "length"
        assert endless.usage is not None and endless.usage.completion_tokens == 256
        stopped = subprocess.run(
            [sys.executable, "-m", "dmr", "stop-runner"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert stopped.returncode == 0, stopped.stderr
        leftovers = [p.cmdline() for p in _processes_using(tmp_path / "models")]
        assert not leftovers, f"stop-runner left processes behind: {leftovers}"
    finally:
        for process in _processes_using(tmp_path / "models"):  # safety net for a failure
            with contextlib.suppress(psutil.Error):
                process.kill()


@pytest.mark.llama
def test_quickstart_reuses_a_running_server_and_the_stored_model(
    smollm2_server: DmrServer,
) -> None:
    result = smollm2_server.cli("quickstart", "Say hello.")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "already in the store" in result.stdout
    assert "Started the dmr server" not in result.stderr
