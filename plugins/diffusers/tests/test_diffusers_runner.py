"""The real runner subprocess on the tiny pipeline: protocol, images, errors, lifetime."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from diffusers_helpers import RunnerProcess, make_launch, short_socket
from dmr.testing import wait_for_health
from PIL import Image

pytestmark = pytest.mark.diffusers


def _images(response: httpx.Response) -> list[Image.Image]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["created"], int)
    return [Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) for item in body["data"]]


def test_health_models_and_metrics(image_runner: RunnerProcess) -> None:
    with image_runner.client() as client:
        assert client.get("/health").status_code == 200
        models = client.get("/v1/models").json()
        assert models["data"][0]["id"] == "ai/tiny-sd:latest"
        assert "diffusers:images_total" in client.get("/metrics").text


def test_generates_pngs_of_the_requested_size(image_runner: RunnerProcess) -> None:
    body = {"prompt": "a red square", "size": "64x128", "steps": 2, "seed": 1, "n": 2}
    with image_runner.client() as client:
        images = _images(client.post("/v1/images/generations", json=body))
    assert len(images) == 2
    assert all(image.format == "PNG" and image.size == (64, 128) for image in images)
    assert images[0].tobytes() != images[1].tobytes()  # n images, not n copies


def _threads(client: httpx.Client) -> int:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("diffusers:threads "):
            return int(float(line.split()[1]))
    raise AssertionError("no diffusers:threads")


def test_a_cpu_share_takes_effect_at_the_next_generation(image_runner: RunnerProcess) -> None:
    body = {"prompt": "a red square", "size": "64x64", "steps": 2, "seed": 1}
    with image_runner.client() as client:
        loaded = _threads(client)
        assert loaded >= 1
        try:
            answer = client.post("/cpu-share", json={"busy_runners": 2})
            assert answer.status_code == 200
            assert answer.json()["threads"] == _threads(client) == max(1, loaded // 2)
            assert len(_images(client.post("/v1/images/generations", json=body))) == 1
            assert client.post("/cpu-share", json={"busy_runners": 64}).json()["threads"] == 1
            for bad in (0, -1, 1.5, "2", True, None):
                refused = client.post("/cpu-share", json={"busy_runners": bad})
                assert refused.status_code == 400 and "busy_runners" in refused.text
        finally:
            assert client.post("/cpu-share", json={"busy_runners": 1}).status_code == 200
        assert _threads(client) == loaded
        assert len(_images(client.post("/v1/images/generations", json=body))) == 1


def test_same_seed_same_image_and_other_formats(image_runner: RunnerProcess) -> None:
    body = {"prompt": "a cat", "size": "64x64", "steps": 2, "seed": 42}
    with image_runner.client() as client:
        first = _images(client.post("/v1/images/generations", json=body))[0]
        again = _images(client.post("/v1/images/generations", json=body))[0]
        other = _images(client.post("/v1/images/generations", json={**body, "seed": 43}))[0]
        negative = {**body, "negative_prompt": "a dog", "guidance_scale": 3.0}
        steered = _images(client.post("/v1/images/generations", json=negative))[0]
        jpeg = _images(
            client.post("/v1/images/generations", json={**body, "output_format": "jpeg"})
        )
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()
    assert first.tobytes() != steered.tobytes()
    assert jpeg[0].format == "JPEG"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b'{"prompt": "x", "size": "65x64"}', "size"),
        (b'{"prompt": "x", "response_format": "url"}', "response_format"),
        (b'{"size": "64x64"}', "prompt"),
    ],
)
def test_bad_input_is_an_openai_shaped_400(
    image_runner: RunnerProcess, body: bytes, param: str | None
) -> None:
    with image_runner.client() as client:
        response = client.post("/v1/images/generations", content=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"]


def test_health_answers_while_an_image_is_generated(image_runner: RunnerProcess) -> None:
    """Generation runs in a thread: the event loop keeps answering."""
    body = {"prompt": "slow", "size": "256x256", "steps": 12, "seed": 5}
    done: list[httpx.Response] = []

    def generate() -> None:
        with image_runner.client() as client:
            done.append(client.post("/v1/images/generations", json=body))

    worker = threading.Thread(target=generate)
    worker.start()
    try:
        time.sleep(0.5)  # the request is in the pipeline now
        with image_runner.client(timeout=5) as client:
            started = time.monotonic()
            assert client.get("/health").status_code == 200
            answered = time.monotonic() - started
        generating = not done
    finally:
        worker.join(timeout=120)
    assert generating, "the generation finished before /health was asked: make it longer"
    assert answered < 1.0
    assert _images(done[0])[0].size == (256, 256)


def test_dduf_is_unpacked_loaded_and_cleaned_up(dduf_bundle: Path) -> None:
    launch = make_launch(dduf_bundle, short_socket())
    runner = RunnerProcess(launch)
    try:
        work_dir = launch.socket_path.parent
        # Weights are in memory once healthy: the unpacked copy is gone, only the socket
        # left, and the direct-stream drop box every runner keeps beside it.
        assert sorted(path.name for path in work_dir.iterdir()) == [
            "runner.sock",
            "runner.sock.direct",
        ]
        body = {"prompt": "a red square", "size": "64x64", "steps": 2, "seed": 1}
        with runner.client() as client:
            assert _images(client.post("/v1/images/generations", json=body))[0].size == (64, 64)
    finally:
        runner.stop()


def test_a_broken_model_exits_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.dduf").write_bytes(b"not a zip archive")
    runner = RunnerProcess(make_launch(tmp_path, short_socket()), wait=False)
    try:
        assert runner.process.wait(timeout=120) == 1
        assert "failed to load model.dduf" in runner.output()
    finally:
        runner.stop()


def test_runner_exits_when_its_parent_dies(dir_bundle: Path) -> None:
    """A parent killed with SIGKILL cannot stop the runner: the runner notices."""
    launch = make_launch(dir_bundle, short_socket())
    from dmr_diffusers.engine import DiffusersEngine

    argv = list(DiffusersEngine().runner_command(launch).argv)
    parent_code = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen({argv!r}, stdout=subprocess.DEVNULL,\n"
        "                         stderr=subprocess.DEVNULL)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True
    )
    runner_pid = None
    try:
        assert parent.stdout is not None
        runner_pid = int(parent.stdout.readline())
        runner = psutil.Process(runner_pid)
        wait_for_health(launch.socket_path, 120)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 20
        while runner.is_running() and runner.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the orphaned runner kept running"
            time.sleep(0.2)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if runner_pid is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(runner_pid).kill()
        if parent.stdout is not None:
            parent.stdout.close()
