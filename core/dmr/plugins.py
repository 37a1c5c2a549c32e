"""The plugin manager: built-ins first, then entry points, then a pending check."""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import pluggy

from dmr import hookspecs

if TYPE_CHECKING:
    from dmr.records import (
        AcceleratorInfo,
        ApiDialect,
        EngineSpec,
        ModelFormat,
        ModelSource,
        RunnerPlacement,
    )
    from dmr.settings import Settings

__all__ = [
    "BUILTIN_PLUGINS",
    "DuplicatePluginNameError",
    "PluginContractError",
    "PluginInfo",
    "ProbeFailure",
    "api_dialects",
    "engines",
    "get_plugin_manager",
    "list_plugins",
    "model_formats",
    "model_sources",
    "new_plugin_manager",
    "probe_hardware",
    "probe_hardware_report",
    "resolve",
    "runner_placement",
]

# Modules inside dmr that register through the same hooks a third party uses.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "dmr.formats",
    "dmr.hardware.cpu",  # GPU probes are the dmr-gpus plugin (plugins/gpus)
    "dmr.distribution.oci",
    "dmr.distribution.huggingface",
)

T = TypeVar("T")
log = logging.getLogger(__name__)


class DuplicatePluginNameError(RuntimeError):
    """Two plugins registered records with the same name."""


class PluginContractError(RuntimeError):
    """A plugin's hook returned something the hook's contract does not allow."""


def disabled_plugin_names() -> set[str]:
    raw = os.environ.get("DMR_DISABLED_PLUGINS", "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def new_plugin_manager(*, load_entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh manager: built-ins, then installed `dmr` entry points."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs.DmrSpec)
    disabled = disabled_plugin_names()
    for name in disabled:
        pm.set_blocked(name)
    for module_name in BUILTIN_PLUGINS:
        if module_name in disabled:
            continue
        pm.register(importlib.import_module(module_name), name=module_name)
    if load_entry_points:
        # load_setuptools_entrypoints honours set_blocked() by entry-point name.
        pm.load_setuptools_entrypoints(hookspecs.PROJECT_NAME)
    pm.check_pending()
    return pm


@cache
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager (tests build their own with `new_plugin_manager`)."""
    return new_plugin_manager()


async def resolve(value: T | Any) -> T:
    """Await `value` when a hook returned an awaitable (pluggy itself is synchronous)."""
    if inspect.isawaitable(value):
        return await value  # type: ignore[no-any-return]
    return value  # type: ignore[no-any-return]


class _Named(Protocol):
    @property
    def name(self) -> str: ...


N = TypeVar("N", bound=_Named)


def _unique(kind: str, results: Iterable[Sequence[N] | None]) -> list[N]:
    seen: dict[str, N] = {}
    for batch in results:
        for record in batch or ():
            if record.name in seen:
                raise DuplicatePluginNameError(f"two plugins register the {kind} {record.name!r}")
            seen[record.name] = record
    return list(seen.values())


def _registered(pm: pluggy.PluginManager | None, hook_name: str) -> Iterable[Sequence[Any]]:
    """Each implementation's records of a registration hook, called one by one so that
    a plugin breaking the contract is named. Registration hooks are read where no
    event loop may be awaited (the CLI, app construction): an awaitable is refused."""
    hook = getattr((pm or get_plugin_manager()).hook, hook_name)
    for impl in hook.get_hookimpls():
        result = impl.function()
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()  # never awaited: no "was never awaited" warning
            raise PluginContractError(
                f"plugin {impl.plugin_name!r}: {hook_name} returned an awaitable; registration"
                " hooks return their records (only dmr_probe_hardware, dmr_server_startup and"
                " dmr_server_shutdown may be async)"
            )
        if result is not None and not isinstance(result, Sequence):
            raise PluginContractError(
                f"plugin {impl.plugin_name!r}: {hook_name} returned {type(result).__name__},"
                " not a list of records"
            )
        yield result or ()


def engines(pm: pluggy.PluginManager | None = None) -> list[EngineSpec]:
    return _unique("engine", _registered(pm, "dmr_engines"))


def model_sources(pm: pluggy.PluginManager | None = None) -> list[ModelSource]:
    return _unique("model source", _registered(pm, "dmr_model_sources"))


def model_formats(pm: pluggy.PluginManager | None = None) -> list[ModelFormat]:
    return _unique("model format", _registered(pm, "dmr_model_formats"))


def api_dialects(pm: pluggy.PluginManager | None = None) -> list[ApiDialect]:
    return _unique("API dialect", _registered(pm, "dmr_api_dialects"))


def runner_placement(
    settings: Settings, pm: pluggy.PluginManager | None = None
) -> RunnerPlacement | None:
    """The cluster placement a plugin offers for `settings`, or None (local runners)."""
    placement: RunnerPlacement | None = (pm or get_plugin_manager()).hook.dmr_runner_placement(
        settings=settings
    )
    return placement


@dataclass(frozen=True)
class ProbeFailure:
    """A hardware probe that raised: logged, skipped, and shown by `dmr status`."""

    plugin: str
    error: str


async def probe_hardware_report(
    pm: pluggy.PluginManager | None = None,
) -> tuple[list[AcceleratorInfo], list[ProbeFailure]]:
    """Every probe's devices, and the probes that failed. Each probe is called on its
    own (not through one hook call, which the first exception would end), so one broken
    probe costs only its own devices, never the server's start."""
    found: list[AcceleratorInfo] = []
    failed: list[ProbeFailure] = []
    for impl in (pm or get_plugin_manager()).hook.dmr_probe_hardware.get_hookimpls():
        try:
            found.extend(await resolve(impl.function()))
        except Exception as error:  # a third-party probe may fail in any way
            log.warning("hardware probe %s failed and is skipped: %s", impl.plugin_name, error)
            failed.append(ProbeFailure(impl.plugin_name, f"{type(error).__name__}: {error}"))
    return found, failed


async def probe_hardware(pm: pluggy.PluginManager | None = None) -> list[AcceleratorInfo]:
    """Every probe's devices; a probe that fails is logged and skipped, never fatal."""
    devices, _failed = await probe_hardware_report(pm)
    return devices


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...]


def list_plugins(pm: pluggy.PluginManager | None = None) -> list[PluginInfo]:
    """What `dmr plugins` prints: each plugin, its distribution and the hooks it implements."""
    pm = pm or get_plugin_manager()
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    infos = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:  # blocked
            continue
        dist = dists.get(id(plugin))
        hooks = tuple(sorted(caller.name for caller in pm.get_hookcallers(plugin) or ()))
        infos.append(
            PluginInfo(
                name=name,
                distribution=dist.project_name if dist else "dmr (built-in)",
                version=dist.version if dist else None,
                hooks=hooks,
            )
        )
    return infos
