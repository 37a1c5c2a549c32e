"""Typed, frozen records that plugins hand to the core through hooks.

Registration hooks return these records (never bare callbacks), so the core can
check names for duplicates and list what each plugin contributed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import quart

    from dmr.store import Store

__all__ = [
    "AcceleratorInfo",
    "ApiDialect",
    "Engine",
    "EngineSpec",
    "EngineState",
    "EngineStatus",
    "MemoryEstimate",
    "Mode",
    "ModelFormat",
    "ModelPuller",
    "ModelSource",
    "PlacedRunner",
    "ProgressCallback",
    "ProgressEvent",
    "RunnerCommand",
    "RunnerConfig",
    "RunnerLaunch",
    "RunnerPlacement",
]


class Mode(StrEnum):
    """What a runner is started for; one runner per (engine, model, mode)."""

    COMPLETION = "completion"
    EMBEDDING = "embedding"
    RERANKING = "reranking"
    IMAGE_GENERATION = "image-generation"


# --------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class AcceleratorInfo:
    """One device a runner can use. The CPU probe always reports one of these."""

    name: str  # "cpu", "NVIDIA H100 80GB HBM3"
    kind: str  # "cpu", "cuda", "rocm", "metal", ...
    index: int
    total_memory: int  # bytes
    free_memory: int  # bytes
    cores: int | None = None
    driver: str | None = None
    details: Mapping[str, str] = field(default_factory=dict)
    # The cluster node it is on (a `RunnerPlacement`'s node ID); None: this machine.
    node: str | None = None

    @property
    def is_gpu(self) -> bool:
        return self.kind != "cpu"


# --------------------------------------------------------------------------- progress


@dataclass(frozen=True)
class ProgressEvent:
    """One progress line (docs/compatibility.md §4); serialised as one NDJSON object."""

    type: str  # "progress" | "success" | "warning" | "error"
    message: str
    mode: str = "pull"  # "pull" | "push"
    total: int = 0
    layer_id: str | None = None
    layer_size: int = 0
    layer_current: int = 0

    def to_json(self) -> dict[str, Any]:
        line: dict[str, Any] = {"type": self.type, "message": self.message, "mode": self.mode}
        if self.total:
            line["total"] = self.total
        if self.layer_id is not None:
            line["layer"] = {
                "id": self.layer_id,
                "size": self.layer_size,
                "current": self.layer_current,
            }
        return line


ProgressCallback = Callable[[ProgressEvent], None]


# --------------------------------------------------------------------------- store


@runtime_checkable
class ModelPuller(Protocol):
    """Fetches a model into the store. Implemented by model-source plugins."""

    async def pull(
        self,
        reference: str,
        store: Store,
        progress: ProgressCallback,
        *,
        bearer_token: str | None = None,
    ) -> str:
        """Pull `reference` into `store` and return the model ID (`sha256:...`)."""
        ...


@dataclass(frozen=True)
class ModelSource:
    """A place models come from: an OCI registry, the Hugging Face Hub, ..."""

    name: str
    # Normalised reference prefixes this source claims ("huggingface.co/").
    # The source with an empty tuple is the fallback (OCI registries).
    prefixes: tuple[str, ...]
    puller: ModelPuller


@dataclass(frozen=True)
class ModelFormat:
    """A weight format, the media types that carry it and the engine that runs it."""

    name: str  # "gguf", "safetensors", "dduf", "diffusers"
    # Layer media types of this format: a model whose config names no format is
    # given the one whose media types its layers carry (Scheduler.model_format).
    media_types: tuple[str, ...]
    preferred_engine: str  # EngineSpec.name


# --------------------------------------------------------------------------- engines


class EngineState(StrEnum):
    RUNNING = "Running"
    ERROR = "Error"
    NOT_INSTALLED = "Not Installed"
    INSTALLING = "Installing"


@dataclass(frozen=True)
class EngineStatus:
    state: EngineState
    details: str

    def render(self) -> str:
        return f"{self.state.value}: {self.details}"


@dataclass(frozen=True)
class RunnerConfig:
    """Per-model settings from `/engines/_configure` (and Ollama `options`)."""

    context_size: int | None = None
    runtime_flags: tuple[str, ...] = ()
    keep_alive: float | None = None  # seconds; None = server default; <0 = never unload
    speculative_draft_model: str | None = None
    speculative_num_tokens: int | None = None
    speculative_min_acceptance_rate: float | None = None
    engine_options: Mapping[str, Any] = field(default_factory=dict)  # "vllm", "llamacpp" blocks
    # Runners of the model to keep on different cluster nodes (`--replicas`); None = 1.
    replicas: int | None = None


@dataclass(frozen=True)
class RunnerLaunch:
    """Everything an engine needs to build a runner's command line."""

    model_id: str  # "sha256:..."
    model_name: str  # the reference the client used, for display and served-model-name
    bundle_dir: Path  # store bundle: config.json + model/
    model_config: Mapping[str, Any]  # the OCI config's "config" block
    mode: Mode
    socket_path: Path  # the runner must serve HTTP on this unix socket
    config: RunnerConfig
    device: AcceleratorInfo
    draft_bundle_dir: Path | None = None
    # Bytes admission lets runners use on `device` (DMR_MEMORY_BUDGET, else its free
    # memory); engines size defaults such as the context by it. None: not known.
    memory_budget: int | None = None
    # The store's folder for what a runner keeps of this model across loads (the
    # llama.cpp runner's prompt caches): counted by `dmr df`, emptied by `dmr purge`,
    # removed with the model. None: nothing may be kept.
    prompt_cache_dir: Path | None = None


@dataclass(frozen=True)
class RunnerCommand:
    """A runner subprocess to start. The core starts, watches and stops it."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    # Seconds to wait for GET /health to answer 200 before giving up.
    startup_timeout: float = 120.0
    # The runner answers `POST /cpu-share {"busy_runners": n}` by computing with 1/n
    # of its threads: the scheduler sends it while n runners compute on the CPU
    # (docs/scheduler.md, "CPU runners share the cores").
    cpu_share: bool = False


@runtime_checkable
class PlacedRunner(Protocol):
    """A runner a `RunnerPlacement` started on a cluster node: the surface the
    scheduler uses of a local runner process, plus where it listens."""

    name: str
    stopping: bool

    @property
    def pid(self) -> int | None: ...

    @property
    def returncode(self) -> int | None:
        """None while it runs; its exit code (or -9 for a lost node) once ended."""
        ...

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of its HTTP endpoint, once `start` returned."""
        ...

    async def start(self) -> RunnerCommand:
        """Get the model onto the node, verify it, start the runner there; the
        command the node's engine built (its startup timeout, its `cpu_share`)."""
        ...

    async def wait_healthy(self, client: Any, startup_timeout: float) -> None: ...

    async def wait(self) -> int: ...

    async def stop(self) -> None: ...

    def tail(self, count: int = 20) -> list[str]: ...

    def failure_message(self, count: int = 5) -> str: ...


@runtime_checkable
class RunnerPlacement(Protocol):
    """Puts runners on the nodes of a cluster instead of this machine
    (`dmr_runner_placement`; the Ray plugin's: docs/cluster.md)."""

    name: str

    async def start(self) -> None:
        """Connect; raise `DmrError` with a clear message, within a deadline, if not."""
        ...

    async def aclose(self) -> None: ...

    @property
    def connected(self) -> bool: ...

    def devices(self) -> list[AcceleratorInfo]:
        """The live nodes runners may go to, one device each (`node` set)."""
        ...

    def status(self) -> Mapping[str, Any]:
        """For `dmr status` and the health route: address, connected, nodes, error."""
        ...

    def watch(self, changed: Callable[[], None]) -> None:
        """Call `changed` on the event loop whenever the nodes change (one joins,
        one is lost, the cluster is lost): the scheduler places what waits again."""
        ...

    def place(
        self, engine: str, launch: RunnerLaunch, *, name: str, memory: int, log_path: Path | None
    ) -> PlacedRunner:
        """A runner for `launch` on the node of `launch.device` (not started yet), which
        admission gave `memory` bytes there."""
        ...


@dataclass(frozen=True)
class MemoryEstimate:
    """What a runner will hold on its device; admission compares it to free memory."""

    device_bytes: int  # weights + KV cache + compute buffers on the chosen device
    host_bytes: int = 0  # extra system RAM when the device is a GPU

    @property
    def total(self) -> int:
        return self.device_bytes + self.host_bytes


@runtime_checkable
class Engine(Protocol):
    """Starts runners for one inference backend. See `EngineSpec`."""

    def status(self) -> EngineStatus:
        """Whether the engine can run here ("Running: llama-cpp-python 0.3.36")."""
        ...

    def runner_command(self, launch: RunnerLaunch) -> RunnerCommand:
        """The subprocess that serves `launch` on `launch.socket_path`.

        Raise `ValueError` with a clear message for settings the engine refuses
        (a runtime flag outside its allow-list, a mode it cannot serve).
        """
        ...

    def estimate_memory(self, launch: RunnerLaunch) -> MemoryEstimate:
        """Bytes the runner will need on `launch.device` (weights + KV cache)."""
        ...


@dataclass(frozen=True)
class EngineSpec:
    """An inference engine ("llama.cpp", "vllm", "diffusers")."""

    name: str
    formats: frozenset[str]  # ModelFormat names it can run
    modes: frozenset[Mode]
    engine: Engine
    # Runtime flags `_configure` may pass through; everything else is refused.
    allowed_flags: frozenset[str] = frozenset()
    # Disk used by the engine's own files, for /engines/df.
    disk_usage: Callable[[], int] | None = None
    # Kinds of device (AcceleratorInfo.kind) the engine runs on: admission picks among
    # these only, and `dmr status` lists them.
    device_kinds: frozenset[str] = frozenset({"cpu"})


# --------------------------------------------------------------------------- server


@dataclass(frozen=True)
class ProxyRoute:
    """A route whose requests go to a runner as they are, answered past Quart.

    `paths` may hold one `{backend}` segment (`/engines/{backend}/v1/completions`),
    which names the engine. The server forwards a `POST` to one of them to the
    model's runner at `runner_path`, in `mode`, straight from the ASGI server (no
    per-request or per-chunk work of Quart's). A request it cannot forward plainly
    (an `Origin` header, an `X-Preload-Only` one, a missing or wrong API key, a
    body that is not a JSON object naming a stored model, an unknown backend)
    goes to the dialect's blueprint, which must serve the same paths and gives
    the answer.
    """

    paths: tuple[str, ...]
    runner_path: str
    mode: Mode
    default_backend: str | None = None


@dataclass(frozen=True)
class ApiDialect:
    """An HTTP API dialect mounted into the server (OpenAI, Ollama, ...)."""

    name: str
    blueprint: quart.Blueprint
    url_prefix: str | None = None
    # Routes that only forward bytes to a runner; see `ProxyRoute`.
    proxy_routes: tuple[ProxyRoute, ...] = ()
