"""`dmr serve` stays small while idle: its start-up imports no engine, no registry or
Hub client and no numpy (each is imported by the request that needs it), and a model
upload is read with backpressure instead of piling up in memory."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from dmr.server.uploads import UPLOAD_BUFFER_BYTES, BoundedBody

# Never in the idle server process. Engines run in runner subprocesses; the rest is
# pull, push, packaging and Ollama `/api/create` work, imported when such a request
# comes. (jinja2 is not listed: Quart imports it through Flask.)
NOT_AT_START = (
    "torch", "vllm", "diffusers", "llama_cpp", "transformers", "safetensors", "numpy",
    "oras", "requests", "jsonschema", "huggingface_hub", "tqdm",
    "dmr.distribution.registry_client",
    "dmr.distribution.packaging", "dmr.distribution.progress", "dmr_apis.ollama.go_template",
)  # fmt: skip

START_AND_ANSWER = textwrap.dedent(
    """
    import asyncio, json, sys
    from dmr.server.app import create_app
    from dmr.settings import Settings

    async def main():
        app = create_app(Settings.from_env())  # as `dmr serve` builds it
        async with app.test_app() as started:  # runs before_serving: store, scheduler
            client = started.test_client()
            for path in ("/", "/models", "/engines/status"):
                response = await client.get(path)
                assert response.status_code == 200, (path, response.status_code)

    asyncio.run(main())
    print(json.dumps(sorted(sys.modules)))
    """
)


def test_a_started_server_imports_no_engine_registry_or_hub_code(tmp_path: Path) -> None:
    env = {**os.environ, "MODELS_PATH": str(tmp_path / "models")}
    env.pop("DMR_DISABLED_PLUGINS", None)  # every installed plugin, as in production
    done = subprocess.run(
        [sys.executable, "-c", START_AND_ANSWER],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    modules = set(json.loads(done.stdout.strip().splitlines()[-1]))
    loaded = [
        name
        for name in NOT_AT_START
        if name in modules or any(m.startswith(name + ".") for m in modules)
    ]
    assert loaded == [], f"imported at server start: {loaded}"


async def test_an_upload_body_holds_at_most_its_buffer_until_read() -> None:
    body = BoundedBody(expected_content_length=None, max_content_length=None)
    chunk = b"x" * (UPLOAD_BUFFER_BYTES // 4)
    for _ in range(4):
        await asyncio.wait_for(body.wait_for_room(), 1)
        body.append(chunk)
    # Full: the receiver waits (so the server stops reading the socket) until the
    # handler takes what is buffered.
    waiting = asyncio.ensure_future(body.wait_for_room())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    taken = await body.__anext__()
    assert len(taken) == UPLOAD_BUFFER_BYTES
    await asyncio.wait_for(waiting, 1)
    body.append(b"end")
    body.set_complete()
    assert await body.__anext__() == b"end"
