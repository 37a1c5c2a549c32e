"""The hooks dmr plugins implement (pluggy project name and entry-point group: `dmr`).

Every hook is prefixed `dmr_`. Registration hooks (`dmr_model_sources`,
`dmr_model_formats`, `dmr_engines`, `dmr_api_dialects`) return typed, frozen
records from `dmr.records`, directly: they are read where nothing can be awaited,
and an awaitable is refused with `PluginContractError` naming the plugin. The core
rejects two records with the same name. `dmr_probe_hardware`, `dmr_server_startup`
and `dmr_server_shutdown` may return their value or an awaitable of it; the core
awaits through `dmr.plugins.resolve`.

A plugin is a module with `@hookimpl` functions, declared in its distribution's
`pyproject.toml`::

    [project.entry-points.dmr]
    myengine = "dmr_myengine.plugin"
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import quart

    from dmr.records import (
        AcceleratorInfo,
        ApiDialect,
        EngineSpec,
        ModelFormat,
        ModelSource,
        RunnerPlacement,
    )
    from dmr.settings import Settings

__all__ = ["PROJECT_NAME", "DmrSpec", "hookimpl", "hookspec"]

PROJECT_NAME = "dmr"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class DmrSpec:
    """Namespace for the hook specifications."""

    # ----------------------------------------------------------------------- store

    @hookspec
    def dmr_model_sources(self) -> Sequence[ModelSource]:
        """Places models are pulled from.

        Example::

            @hookimpl
            def dmr_model_sources():
                return [ModelSource(name="s3", prefixes=("s3://",), puller=S3Puller())]
        """
        raise NotImplementedError

    @hookspec
    def dmr_model_formats(self) -> Sequence[ModelFormat]:
        """Weight formats, their layer media types and the engine that runs them.

        Example::

            @hookimpl
            def dmr_model_formats():
                return [ModelFormat(
                    name="gguf",
                    media_types=("application/vnd.docker.ai.gguf.v3",),
                    preferred_engine="llama.cpp",
                )]
        """
        raise NotImplementedError

    # ----------------------------------------------------------------------- scheduler

    @hookspec
    def dmr_engines(self) -> Sequence[EngineSpec]:
        """Inference engines that start runner subprocesses for a model and mode.

        Example::

            @hookimpl
            def dmr_engines():
                return [EngineSpec(
                    name="llama.cpp",
                    formats=frozenset({"gguf"}),
                    modes=frozenset({Mode.COMPLETION, Mode.EMBEDDING}),
                    engine=LlamaCppEngine(),
                    allowed_flags=frozenset({"--temp", "--top-k"}),
                )]
        """
        raise NotImplementedError

    # ----------------------------------------------------------------------- hardware

    @hookspec
    def dmr_probe_hardware(
        self,
    ) -> Sequence[AcceleratorInfo] | Awaitable[Sequence[AcceleratorInfo]]:
        """Devices found on this machine (every probe's results are kept). A probe
        that raises is logged and skipped, its error shown by `dmr status` and
        `GET /engines/hardware` (`probe_errors`); the other probes still count.

        Example::

            @hookimpl
            def dmr_probe_hardware():
                total, free = read_rocm_memory()
                return [AcceleratorInfo(name="MI300X", kind="rocm", index=0,
                                        total_memory=total, free_memory=free)]
        """
        raise NotImplementedError

    # ----------------------------------------------------------------------- placement

    @hookspec(firstresult=True)
    def dmr_runner_placement(self, settings: Settings) -> RunnerPlacement | None:
        """Where runners run when not on this machine: a cluster's placement for these
        settings (the Ray plugin's when `settings.ray_address` is set), or None. The
        first plugin that returns one wins; without one, runners are local processes.

        Example::

            @hookimpl
            def dmr_runner_placement(settings):
                if settings.ray_address:
                    return RayPlacement(settings)
                return None
        """
        raise NotImplementedError

    # ----------------------------------------------------------------------- API dialects

    @hookspec
    def dmr_api_dialects(self) -> Sequence[ApiDialect]:
        """Quart blueprints mounted into the server.

        Example::

            bp = quart.Blueprint("hello", __name__)

            @bp.get("/hello")
            async def hello():
                return {"hello": "world"}

            @hookimpl
            def dmr_api_dialects():
                return [ApiDialect(name="hello", blueprint=bp)]
        """
        raise NotImplementedError

    # CLI commands are not a hook: loading every plugin costs a `dmr` command a second.
    # A plugin declares each command in the `dmr.cli` entry-point group instead, which
    # the CLI reads without importing anything (`dmr.cli.main`):
    #
    #     [project.entry-points."dmr.cli"]
    #     hello = "my_plugin.cli:hello"      # a click command or group

    # ----------------------------------------------------------------------- lifecycle

    @hookspec
    def dmr_server_startup(self, app: quart.Quart) -> Awaitable[None] | None:
        """Called once the server's services exist, before it accepts requests.

        Example::

            @hookimpl
            async def dmr_server_startup(app):
                app.extensions["my-plugin"] = await open_connection()
        """

    @hookspec
    def dmr_server_shutdown(self, app: quart.Quart) -> Awaitable[None] | None:
        """Called when the server stops, after runners were stopped.

        Example::

            @hookimpl
            async def dmr_server_shutdown(app):
                await app.extensions["my-plugin"].close()
        """
