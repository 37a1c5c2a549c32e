"""Per-model runner configuration (`_configure`): checked against the model's engine,
remembered by model ID (`ModelConfigs`, kept in the store), described for
`GET /engines/_configure`, and turned into the `RunnerLaunch` a runner starts with.

Stopping the runners a new configuration outdates is the scheduler's part
(`Scheduler.configure`): it owns the runners.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmr.errors import InvalidRequestError
from dmr.records import RunnerConfig, RunnerLaunch
from dmr.reference import display_name
from dmr.scheduler.admission import choose_device, memory_budget
from dmr.scheduler.model_configs import CONFIGS_FILE, ConfiguredModel, ModelConfigs, describe_config

if TYPE_CHECKING:
    from dmr.records import AcceleratorInfo, EngineSpec, Mode
    from dmr.scheduler.engine_resolver import EngineResolver
    from dmr.settings import Settings
    from dmr.store import Store, StoredModel

__all__ = [
    "UNSET_SOCKET",
    "ModelConfiguration",
    "split_raw_flags",
    "validate_runtime_flags",
]

log = logging.getLogger(__name__)

# Stands in for the runner's socket while its memory is estimated.
UNSET_SOCKET = Path("/nonexistent/dmr-runner.sock")


def validate_runtime_flags(spec: EngineSpec, flags: Sequence[str]) -> tuple[str, ...]:
    """Flags through the engine's allow-list; no value may name a path (docs/compatibility.md §5).

    `--flag=value` and `--flag value` are both accepted; a bare value must
    follow an allowed flag.
    """
    checked: list[str] = []
    for flag in flags:
        if "/" in flag or "\\" in flag:
            raise InvalidRequestError(f"runtime flag {flag!r} may not contain '/' or '\\'")
        if flag.startswith("-") and not _is_number(flag):
            name = flag.split("=", 1)[0]
            if name not in spec.allowed_flags:
                allowed = ", ".join(sorted(spec.allowed_flags)) or "none"
                raise InvalidRequestError(
                    f"runtime flag {name!r} is not allowed for {spec.name} (allowed: {allowed})"
                )
        elif not checked or not checked[-1].startswith("-") or "=" in checked[-1]:
            raise InvalidRequestError(f"runtime flag value {flag!r} does not follow a flag")
        checked.append(flag)
    return tuple(checked)


def split_raw_flags(raw: str) -> list[str]:
    try:
        return shlex.split(raw)
    except ValueError as error:
        raise InvalidRequestError(f"raw-runtime-flags: {error}") from error


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class ModelConfiguration:
    """The configurations `_configure` remembered, and the launches they make."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        resolver: EngineResolver,
        devices: Sequence[AcceleratorInfo],
    ) -> None:
        self.settings = settings
        self.store = store
        self.resolver = resolver
        self.devices = devices
        self._configs = ModelConfigs(store.root / CONFIGS_FILE)

    def load(self) -> None:
        """Read the remembered configurations; those of models gone from the store are dropped."""
        present = {entry.id for entry in self.store.index.read()}
        self._configs.load(present.__contains__)

    def check(
        self, model: str, mode: Mode, backend: str | None, config: RunnerConfig
    ) -> tuple[StoredModel, EngineSpec]:
        """The model and the engine `config` is for, once both accept it: its runtime
        flags, its draft model, and the engine's own options."""
        stored = self.store.get(model)  # raises ModelNotFoundError (404) for an unknown name
        spec = self.resolver.engine_for(stored, mode, backend)
        validate_runtime_flags(spec, config.runtime_flags)
        if config.speculative_draft_model:
            self.store.get(config.speculative_draft_model)
        self._check_engine_accepts(model, stored, mode, spec, config)
        return stored, spec

    def _check_engine_accepts(
        self,
        model: str,
        stored: StoredModel,
        mode: Mode,
        spec: EngineSpec,
        config: RunnerConfig,
    ) -> None:
        """Refuse now what the engine would refuse at load time (its own options, such
        as the `vllm` block), instead of in the background preload `_configure` starts.

        Only ValueError, the engines' "refused" signal, counts here; anything else
        the estimate raises is reported by admission when the runner is loaded.
        """
        device = choose_device(self.devices, spec.device_kinds)
        launch = self.launch(model, stored, mode, config, device)
        try:
            spec.engine.estimate_memory(launch)
        except ValueError as error:
            raise InvalidRequestError(str(error)) from error
        except Exception as error:
            log.debug("%s could not estimate %s while configuring: %r", spec.name, model, error)

    def remember(self, model_id: str, configured: ConfiguredModel, *, persist: bool = True) -> None:
        """Keep `configured` for the model's next loads (in the store too, when `persist`)."""
        self._configs.set(model_id, configured, persist=persist)

    def config_for(self, model_id: str) -> RunnerConfig:
        configured = self._configs.get(model_id)
        return configured.config if configured else RunnerConfig()

    def describe(self, model: str | None = None) -> list[dict[str, Any]]:
        """`GET /engines/_configure` items: each value in effect, and its `sources`."""
        wanted: str | None = None
        if model:
            wanted = self.store.get(model).id
        default_keep_alive = self.settings.idle_timeout or -1
        items = []
        for model_id, configured in self._configs:
            if wanted is not None and model_id != wanted:
                continue
            stored = self.store.find(model_id)
            if stored is None:
                continue  # removed since it was configured; start-up drops the entry
            block = stored.config.get("config")
            packaged = block if isinstance(block, Mapping) else {}
            items.append(describe_config(model_id, configured, packaged, default_keep_alive))
        return items

    def launch(
        self,
        model: str,
        stored: StoredModel,
        mode: Mode,
        config: RunnerConfig,
        device: AcceleratorInfo,
        socket_path: Path = UNSET_SOCKET,
    ) -> RunnerLaunch:
        """What a runner of `model` with `config` on `device` is started with."""
        draft_dir = None
        if config.speculative_draft_model:
            draft_dir = self.store.get(config.speculative_draft_model).bundle_dir
        block = stored.config.get("config")
        return RunnerLaunch(
            model_id=stored.id,
            # Metrics, ps and logs label a runner by this: one spelling per model.
            model_name=display_name(model),
            bundle_dir=stored.bundle_dir,
            model_config=block if isinstance(block, Mapping) else {},
            mode=mode,
            socket_path=socket_path,
            config=config,
            device=device,
            draft_bundle_dir=draft_dir,
            memory_budget=memory_budget(device, self.settings.memory_budget),
            prompt_cache_dir=self.store.layout.prompt_cache(stored.id),
        )
