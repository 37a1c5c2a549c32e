"""Per-model `_configure` settings, kept in the store so they survive a restart.

`runner-configs.json` beside `models.json` (docs/compatibility.md §3) holds one
entry per model ID. Readers of the file never lock (it is replaced atomically);
a writer takes its lock for the read-modify-write, so two servers sharing a
store never lose each other's entries. Entries of models no longer in the store
are dropped, with a log line, when the scheduler starts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock

from dmr.durations import format_duration
from dmr.errors import StoreError
from dmr.records import Mode, RunnerConfig
from dmr.store.layout import atomic_write

__all__ = [
    "CONFIGS_FILE",
    "ConfiguredModel",
    "ModelConfigs",
    "config_from_json",
    "config_to_json",
    "describe_config",
]

log = logging.getLogger(__name__)

CONFIGS_FILE = "runner-configs.json"
FORMAT_VERSION = 1
ENGINE_BLOCKS = ("llamacpp", "vllm")

_T = TypeVar("_T", int, float, str)


@dataclass(frozen=True)
class ConfiguredModel:
    """A `_configure` call remembered for a model (by ID)."""

    model_name: str
    backend: str
    mode: Mode
    config: RunnerConfig


def config_to_json(configured: ConfiguredModel) -> dict[str, Any]:
    """The stored form: `_configure`'s body keys, `keep_alive` in seconds."""
    config = configured.config
    item: dict[str, Any] = {
        "model": configured.model_name,
        "backend": configured.backend,
        "mode": configured.mode.value,
        "context-size": config.context_size,
        "runtime-flags": list(config.runtime_flags),
        "keep_alive_seconds": config.keep_alive,
        "replicas": config.replicas,
        "speculative": {
            "draft_model": config.speculative_draft_model,
            "num_tokens": config.speculative_num_tokens,
            "min_acceptance_rate": config.speculative_min_acceptance_rate,
        },
    }
    for key, block in config.engine_options.items():
        item[key] = dict(block)
    return item


def describe_config(
    model_id: str,
    configured: ConfiguredModel,
    packaged: Mapping[str, Any],
    default_keep_alive: float,
) -> dict[str, Any]:
    """A `GET /engines/_configure` item: the values in effect for the model's next load,
    and in `sources` where each came from: `configure`, `model` (the packaged config's
    `context_size`) or `default` (the server's, or for a null context size the engine's,
    chosen when it loads the model)."""
    config = configured.config
    sources: dict[str, str] = {}
    context: int | None = config.context_size
    if context is not None:
        sources["context-size"] = "configure"
    else:
        from_model = packaged.get("context_size")
        if isinstance(from_model, int) and not isinstance(from_model, bool) and from_model > 0:
            context, sources["context-size"] = from_model, "model"
        else:
            sources["context-size"] = "default"
    sources["runtime-flags"] = "configure" if config.runtime_flags else "default"
    keep_alive = config.keep_alive
    sources["keep_alive"] = "configure" if keep_alive is not None else "default"
    item: dict[str, Any] = {
        "model": configured.model_name,
        "model_id": model_id,
        "backend": configured.backend,
        "mode": configured.mode.value,
        "context-size": context,
        "runtime-flags": list(config.runtime_flags),
        "keep_alive": format_duration(default_keep_alive if keep_alive is None else keep_alive),
        "replicas": config.replicas or 1,
    }
    sources["replicas"] = "configure" if config.replicas is not None else "default"
    speculative = (
        config.speculative_draft_model,
        config.speculative_num_tokens,
        config.speculative_min_acceptance_rate,
    )
    if any(value is not None for value in speculative):
        item["speculative"] = {
            "draft_model": config.speculative_draft_model,
            "num_tokens": config.speculative_num_tokens,
            "min_acceptance_rate": config.speculative_min_acceptance_rate,
        }
        sources["speculative"] = "configure"
    for key, block in config.engine_options.items():
        item[key] = dict(block)
        sources[key] = "configure"
    item["sources"] = sources
    return item


def config_from_json(item: Mapping[str, Any]) -> ConfiguredModel:
    """Back from the stored form; ValueError names what is wrong with a hand-edited entry."""
    name, backend = item.get("model"), item.get("backend")
    if not isinstance(name, str) or not name or not isinstance(backend, str) or not backend:
        raise ValueError("'model' and 'backend' must be names")
    mode = Mode(item.get("mode") or Mode.COMPLETION.value)
    context = _optional(item, "context-size", int)
    if context is not None and context <= 0:
        raise ValueError("'context-size' must be positive")
    flags = item.get("runtime-flags") or []
    if not isinstance(flags, list) or not all(isinstance(flag, str) for flag in flags):
        raise ValueError("'runtime-flags' must be a list of strings")
    keep_alive = _optional(item, "keep_alive_seconds", float)
    replicas = _optional(item, "replicas", int)
    if replicas is not None and replicas <= 0:
        raise ValueError("'replicas' must be positive")
    speculative = item.get("speculative") or {}
    if not isinstance(speculative, Mapping):
        raise ValueError("'speculative' must be an object")
    engine_options: dict[str, Any] = {}
    for key in ENGINE_BLOCKS:
        block = item.get(key)
        if block is not None:
            if not isinstance(block, Mapping):
                raise ValueError(f"'{key}' must be an object")
            engine_options[key] = dict(block)
    config = RunnerConfig(
        context_size=context,
        runtime_flags=tuple(flags),
        keep_alive=keep_alive,
        speculative_draft_model=_optional(speculative, "draft_model", str) or None,
        speculative_num_tokens=_optional(speculative, "num_tokens", int),
        speculative_min_acceptance_rate=_optional(speculative, "min_acceptance_rate", float),
        engine_options=engine_options,
        replicas=replicas,
    )
    return ConfiguredModel(model_name=name, backend=backend, mode=mode, config=config)


def _optional(item: Mapping[str, Any], key: str, kind: type[_T]) -> _T | None:
    value = item.get(key)
    if value is None:
        return None
    numeric = kind is float and isinstance(value, int)
    if isinstance(value, bool) or not (isinstance(value, kind) or numeric):
        raise ValueError(f"{key!r} must be a {kind.__name__}, got {value!r}")
    return kind(value)


class ModelConfigs:
    """The remembered configurations, by model ID; `path` None keeps them in memory only."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = FileLock(str(path.with_name(f".{path.name}.lock"))) if path else None
        self._entries: dict[str, ConfiguredModel] = {}

    def load(self, present: Callable[[str], bool]) -> None:
        """Read the file; entries of models `present` denies are dropped from it."""
        self._entries = {}
        if self.path is None or self._lock is None:
            return
        with self._lock:
            raw = self._read()
            gone = [model_id for model_id in raw if not present(model_id)]
            for model_id in gone:
                name = raw[model_id].get("model") if isinstance(raw[model_id], dict) else None
                log.warning(
                    "dropped the configuration of %s (%s): the model is no longer in the store",
                    name or model_id, model_id,
                )  # fmt: skip
                del raw[model_id]
            if gone:
                self._write(raw)
        for model_id, item in raw.items():
            try:
                self._entries[model_id] = config_from_json(item)
            except (ValueError, TypeError) as error:
                log.error("ignored the configuration of %s in %s: %s", model_id, self.path, error)
        if self._entries:
            log.info("loaded %d model configuration(s) from %s", len(self._entries), self.path)

    def get(self, model_id: str) -> ConfiguredModel | None:
        return self._entries.get(model_id)

    def __iter__(self) -> Iterator[tuple[str, ConfiguredModel]]:
        return iter(list(self._entries.items()))

    def set(self, model_id: str, configured: ConfiguredModel, *, persist: bool = True) -> None:
        """Remember `configured`; written to the file first, so a failed write changes nothing.

        `persist` False keeps it in memory only (a per-request setting such as
        Ollama's `num_ctx`), leaving the stored one for the next start.
        """
        if persist and self.path is not None and self._lock is not None:
            with self._lock:
                raw = self._read()
                raw[model_id] = config_to_json(configured)
                self._write(raw)
        self._entries[model_id] = configured

    def _read(self) -> dict[str, Any]:
        assert self.path is not None
        try:
            body = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            log.error("ignored %s, which cannot be read (%s); it is replaced on the next "
                      "configure", self.path, error)  # fmt: skip
            return {}
        models = body.get("models") if isinstance(body, dict) else None
        if not isinstance(models, dict):
            log.error("ignored %s: it has no 'models' object", self.path)
            return {}
        return models

    def _write(self, models: Mapping[str, Any]) -> None:
        assert self.path is not None
        body = {"version": FORMAT_VERSION, "models": dict(models)}
        try:
            atomic_write(self.path, json.dumps(body, indent=2).encode())
        except OSError as error:
            message = f"cannot save the model configurations to {self.path}: {error}"
            raise StoreError(message) from error
