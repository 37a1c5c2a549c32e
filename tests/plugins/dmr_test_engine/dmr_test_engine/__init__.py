"""A third-party dmr plugin for tests: the "testfmt" format and the "test-engine" engine.

Its runner (`dmr_test_engine.runner`) is a small real HTTP server on the unix
socket the scheduler hands it. What a model does is set in its OCI config, under
`config.testfmt`:

    {"memory": 1048576,          # bytes estimate_memory() reports
     "load_seconds": 0.0,        # /health answers 503 this long
     "fail_load": "text",        # print text to stderr and exit 1 while loading
     "ignore_sigterm": true,     # only SIGKILL stops the runner
     "metrics_sleep": 5.0}       # GET /metrics answers this late

What a request does is set in its JSON body, under "test":

    {"sleep": 0.1,               # seconds between streamed chunks
     "chunks": 5,                # how many chunks a stream has
     "crash": "text",            # print text to stderr and exit 1 before answering
     "echo_headers": ["x-name"]} # add " x-name=VALUE" (or "=-") to the answer's text

A chat message containing "[slow]" streams with 0.4 s between chunks; one
containing "[die]" makes the runner exit after two streamed chunks.

FAKE GPU: with `DMR_TEST_FAKE_GPU="NAME:TOTAL_MIB:FREE_MIB"` in the server's
environment, the plugin's hardware probe reports one CUDA device of that name
and memory, so GPU scheduling paths run on machines without one. With
`DMR_TEST_BROKEN_PROBE=message` the probe raises RuntimeError(message) instead.
`DMR_TEST_ENGINE_DEVICE_KINDS=cpu` (default `cpu,cuda`) sets the engine's device kinds.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from dmr.sdk import (
    CONFIG_V01,
    AcceleratorInfo,
    EngineSpec,
    EngineState,
    EngineStatus,
    MemoryEstimate,
    Mode,
    ModelFormat,
    ModelSource,
    ProgressCallback,
    ProgressEvent,
    RunnerCommand,
    RunnerLaunch,
    Store,
    StoredModel,
    hookimpl,
)

__all__ = [
    "ENGINE_NAME",
    "FORMAT_NAME",
    "MEDIA_TYPE",
    "SOURCE_PREFIX",
    "TestEngine",
    "TestPuller",
    "write_test_model",
]

ENGINE_NAME = "test-engine"
FORMAT_NAME = "testfmt"
MEDIA_TYPE = "application/vnd.dmr.test.weights.v1"
SOURCE_PREFIX = "test://"
ALLOWED_FLAGS = frozenset({"--temp", "--top-k", "--threads"})
DEFAULT_MEMORY = 1024 * 1024


class TestEngine:
    def status(self) -> EngineStatus:
        return EngineStatus(EngineState.RUNNING, "dmr-test-engine 0.1.0")

    def runner_command(self, launch: RunnerLaunch) -> RunnerCommand:
        settings = launch.model_config.get(FORMAT_NAME) or {}
        argv = [
            sys.executable,
            "-m",
            "dmr_test_engine.runner",
            "--socket",
            str(launch.socket_path),
            "--model-name",
            launch.model_name,
            "--mode",
            launch.mode.value,
            "--load-seconds",
            str(settings.get("load_seconds", 0.0)),
        ]
        if settings.get("ignore_sigterm"):
            argv += ["--ignore-sigterm"]
        if settings.get("metrics_sleep"):
            argv += ["--metrics-sleep", str(settings["metrics_sleep"])]
        if settings.get("fail_load"):
            argv += ["--fail-load", str(settings["fail_load"])]
        if launch.config.context_size:
            argv += ["--ctx-size", str(launch.config.context_size)]
        if launch.config.runtime_flags:
            argv += ["--", *launch.config.runtime_flags]
        return RunnerCommand(argv=tuple(argv), startup_timeout=30.0)

    def estimate_memory(self, launch: RunnerLaunch) -> MemoryEstimate:
        settings = launch.model_config.get(FORMAT_NAME) or {}
        return MemoryEstimate(device_bytes=int(settings.get("memory", DEFAULT_MEMORY)))


def write_test_model(
    store: Store, tag: str, *, name_format: bool = True, **behaviour: Any
) -> StoredModel:
    """Put a tiny "testfmt" model in `store` under `tag`.

    `behaviour` goes to the model config's `testfmt` block: `memory` (bytes the
    engine estimates), `load_seconds`, `fail_load` (stderr text, then exit 1).
    Without `name_format` the config does not say "testfmt": only the layer's
    media type does.
    """
    weights = f"test weights for {tag}".encode()
    weights_digest = store.put_blob_bytes(weights)
    block: dict[str, Any] = {"size": f"{len(weights)} B", FORMAT_NAME: behaviour}
    if name_format:
        block["format"] = FORMAT_NAME
    config = {
        "config": block,
        "descriptor": {"created": "2026-01-01T00:00:00Z"},
        "rootfs": {"type": "rootfs", "diff_ids": [weights_digest]},
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_digest = store.put_blob_bytes(config_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": CONFIG_V01, "digest": config_digest, "size": len(config_bytes)},
        "layers": [{"mediaType": MEDIA_TYPE, "digest": weights_digest, "size": len(weights)}],
    }
    return store.add_model(json.dumps(manifest).encode(), [tag])


class TestPuller:
    """The `test://NAME` source: "pulls" a tiny test model as `test/NAME`, so a model
    source with its own URL scheme is exercised end to end."""

    async def pull(
        self,
        reference: str,
        store: Store,
        progress: ProgressCallback,
        *,
        bearer_token: str | None = None,
    ) -> str:
        name = reference.removeprefix(SOURCE_PREFIX)
        progress(ProgressEvent(type="progress", message=f"making {name}"))
        return write_test_model(store, f"test/{name}").id


@hookimpl
def dmr_model_sources() -> Sequence[ModelSource]:
    return [ModelSource(name="test-source", prefixes=(SOURCE_PREFIX,), puller=TestPuller())]


@hookimpl
def dmr_model_formats() -> Sequence[ModelFormat]:
    return [ModelFormat(name=FORMAT_NAME, media_types=(MEDIA_TYPE,), preferred_engine=ENGINE_NAME)]


@hookimpl
def dmr_engines() -> Sequence[EngineSpec]:
    return [
        EngineSpec(
            name=ENGINE_NAME,
            formats=frozenset({FORMAT_NAME}),
            modes=frozenset({Mode.COMPLETION, Mode.EMBEDDING}),
            engine=TestEngine(),
            allowed_flags=ALLOWED_FLAGS,
            device_kinds=frozenset(
                os.environ.get("DMR_TEST_ENGINE_DEVICE_KINDS", "cpu,cuda").split(",")
            ),
        )
    ]


@hookimpl
def dmr_probe_hardware() -> Sequence[AcceleratorInfo]:
    """A FAKE CUDA device, only when a test asks for one (see the module docstring)."""
    broken = os.environ.get("DMR_TEST_BROKEN_PROBE")
    if broken:
        raise RuntimeError(broken)
    fake = os.environ.get("DMR_TEST_FAKE_GPU")
    if not fake:
        return []
    name, total_mib, free_mib = fake.rsplit(":", 2)
    return [
        AcceleratorInfo(
            name=name,
            kind="cuda",
            index=0,
            total_memory=int(total_mib) * 1024 * 1024,
            free_memory=int(free_mib) * 1024 * 1024,
            driver="fake",
        )
    ]
