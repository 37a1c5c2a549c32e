"""The README's main job: `dmr quickstart` packages SmolLM2 and the model answers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.fixtures.server import DmrServer


def _quickstart_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MODEL_RUNNER_HOST"}
    env.update(
        MODELS_PATH=str(tmp_path / "models"),
        XDG_RUNTIME_DIR=str(tmp_path),  # no default socket: quickstart must start its own server
        MODEL_RUNNER_PORT="1",  # nothing listens there, so no running server is mistaken for ours
        COLUMNS="200",
    )
    return env


def _processes_using(models_path: Path) -> list[list[str]]:
    """Processes (the server and its runners) started with this test's store."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("MODELS_PATH") == str(models_path):
                found.append(process.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.mark.llama
@pytest.mark.slow
def test_quickstart_starts_a_server_packages_smollm2_and_answers(
    tmp_path: Path, smollm2_gguf: Path
) -> None:
    env = _quickstart_env(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "dmr", "quickstart", "Say hello."],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "packaging it into the store as ai/smollm2" in result.stdout
    answer = result.stdout.split("dmr run ai/smollm2", 1)[1].split("\n", 1)[1]
    assert len(answer.strip()) > 5, result.stdout
    assert (tmp_path / "models" / "models.json").read_text().count("ai/smollm2:latest") == 1
    leftovers = _processes_using(tmp_path / "models")
    assert not leftovers, f"quickstart left processes behind: {leftovers}"


@pytest.mark.llama
def test_quickstart_reuses_a_running_server_and_the_stored_model(
    smollm2_server: DmrServer,
) -> None:
    result = smollm2_server.cli("quickstart", "Say hello.")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "already in the store" in result.stdout
    assert "started dmr serve" not in result.stdout
