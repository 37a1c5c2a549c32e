"""Settings read from the environment, once per server or CLI process.

The variables: docs/compatibility.md §7.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from dmr.durations import parse_duration

__all__ = ["DEFAULT_PORT", "Settings", "default_log_dir"]

DEFAULT_PORT = 12434
MAX_BODY_BYTES = 10 * 1024 * 1024


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _default_models_path() -> Path:
    return Path.home() / ".docker" / "models"


def default_log_dir(models_path: Path) -> Path:
    """Where the server's and runners' logs go without `MODEL_RUNNER_LOG_DIR`: beside
    the models, so `dmr logs` works out of the box (docs/operations.md)."""
    return models_path / "logs"


@dataclass(frozen=True)
class Settings:
    models_path: Path = field(default_factory=_default_models_path)
    # TCP port, 127.0.0.1:12434 as Docker Model Runner's; None = the unix socket only.
    port: int | None = DEFAULT_PORT
    host: str = "127.0.0.1"
    socket_path: Path | None = None  # a unix socket, beside the port or instead of it
    idle_timeout: float = 300.0  # seconds; 0 = never
    disable_metrics: bool = False
    llama_args: str | None = None
    llama_server_path: str | None = None
    log_level: str = "INFO"
    # `from_env` always sets one (default_log_dir); None, for settings built in
    # code (tests, embedders), writes no log files.
    log_dir: Path | None = None
    origins: tuple[str, ...] = ()
    default_registry: str = "index.docker.io"
    insecure_registry: bool = False
    registry_mirrors: tuple[str, ...] = ()
    api_key: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    # Memory budget for runners in bytes; None = the probed free memory.
    memory_budget: int | None = None
    max_queue: int = 64
    # Requests one runner may hold at once (its slots plus its own queue); beyond
    # that a request gets 503 with Retry-After instead of waiting without bound.
    max_runner_requests: int = 128
    # Seconds a request for a model that is not loaded waits before requests for the
    # loaded models on its device queue behind it (docs/scheduler.md).
    fair_wait: float = 3.0
    # Seconds a request may wait for memory before a 503 with Retry-After; 0 = no limit.
    queue_timeout: float = 120.0
    # Seconds a runner must have been idle before batch work may evict it.
    batch_evict_after: float = 30.0
    # CPU runners that compute at once divide the cores (docs/scheduler.md);
    # DMR_CPU_SHARE=0 leaves every runner at its own thread count.
    cpu_share: bool = True
    # A Ray cluster to place runners on (`dmr serve --ray-address`, DMR_RAY_ADDRESS;
    # the dmr-ray plugin, docs/cluster.md); None = runners on this machine.
    ray_address: str | None = None
    # The store is on storage every node mounts at the same path: nodes load from it
    # (after verifying its digests) instead of pulling into their own store.
    ray_shared_store: bool = False
    # Seconds to reach the cluster before `dmr serve` gives up with an error.
    ray_connect_timeout: float = 30.0

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        port = env.get("MODEL_RUNNER_PORT")
        socket_path = env.get("MODEL_RUNNER_SOCK")
        idle = env.get("MODEL_RUNNER_IDLE_TIMEOUT")
        api_key = env.get("DMR_API_KEY")
        api_key_file = env.get("DMR_API_KEY_FILE")
        if not api_key and api_key_file:
            api_key = Path(api_key_file).read_text().strip()
        budget = env.get("DMR_MEMORY_BUDGET")
        models_path = (
            Path(env["MODELS_PATH"]).expanduser()
            if env.get("MODELS_PATH")
            else _default_models_path()
        )
        return cls(
            models_path=models_path,
            # MODEL_RUNNER_SOCK alone: that socket only; with MODEL_RUNNER_PORT: both.
            port=int(port) if port else (None if socket_path else DEFAULT_PORT),
            host=env.get("MODEL_RUNNER_BIND", "127.0.0.1"),
            socket_path=Path(socket_path).expanduser() if socket_path else None,
            idle_timeout=_idle_timeout_seconds(idle),
            disable_metrics=_flag("DISABLE_METRICS"),
            llama_args=env.get("LLAMA_ARGS") or None,
            llama_server_path=env.get("LLAMA_SERVER_PATH") or None,
            log_level=env.get("LOG_LEVEL", "INFO").upper(),
            log_dir=Path(env["MODEL_RUNNER_LOG_DIR"]).expanduser()
            if env.get("MODEL_RUNNER_LOG_DIR")
            else default_log_dir(models_path),
            origins=tuple(o.strip() for o in env.get("DMR_ORIGINS", "").split(",") if o.strip()),
            default_registry=env.get("DEFAULT_REGISTRY", "index.docker.io"),
            insecure_registry=_flag("INSECURE_REGISTRY"),
            registry_mirrors=tuple(
                m.strip()
                for m in env.get("MODEL_RUNNER_REGISTRY_MIRRORS", "").split(",")
                if m.strip()
            ),
            api_key=api_key or None,
            tls_cert=Path(env["MODEL_RUNNER_TLS_CERT"])
            if env.get("MODEL_RUNNER_TLS_CERT")
            else None,
            tls_key=Path(env["MODEL_RUNNER_TLS_KEY"]) if env.get("MODEL_RUNNER_TLS_KEY") else None,
            memory_budget=int(budget) if budget else None,
            max_queue=int(env.get("DMR_MAX_QUEUE", "64")),
            max_runner_requests=int(env.get("DMR_MAX_RUNNER_REQUESTS", "128")),
            fair_wait=_seconds(env, "DMR_FAIR_WAIT_SECONDS", 3.0),
            queue_timeout=_seconds(env, "DMR_QUEUE_TIMEOUT_SECONDS", 120.0),
            batch_evict_after=_seconds(env, "DMR_BATCH_EVICT_AFTER_SECONDS", 30.0),
            cpu_share=env.get("DMR_CPU_SHARE", "1").strip().lower() not in ("0", "false", "no"),
            ray_address=env.get("DMR_RAY_ADDRESS", "").strip() or None,
            ray_shared_store=_flag("DMR_RAY_SHARED_STORE"),
            ray_connect_timeout=_seconds(env, "DMR_RAY_CONNECT_TIMEOUT_SECONDS", 30.0),
        )


def _seconds(env: os._Environ[str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, not {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must not be negative, not {raw!r}")
    return value


def _idle_timeout_seconds(idle: str | None) -> float:
    # DMR_IDLE_TIMEOUT_SECONDS is unclamped so that tests can unload within seconds.
    exact = os.environ.get("DMR_IDLE_TIMEOUT_SECONDS")
    if exact:
        return max(float(exact), 0.0)
    return parse_idle_timeout(idle) if idle else 300.0


def parse_idle_timeout(value: str) -> float:
    """`MODEL_RUNNER_IDLE_TIMEOUT`: Go duration, 0 = never, else clamped to 1m..24h.

    As DMR does (docs/compatibility.md §5).
    """
    seconds = parse_duration(value)
    if seconds <= 0:
        return 0.0
    return min(max(seconds, 60.0), 24 * 3600.0)
