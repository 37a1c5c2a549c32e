"""The plugin kit: everything a plugin imports from dmr (docs/plugins.md).

Four tiers, one module each:

- `dmr.sdk` (this module), registration: the hook marker, the records hooks return
  and receive, the store a model source writes to, the errors a plugin raises for
  the server to turn into HTTP answers, and what an engine reads (GGUF headers);
- `dmr.sdk.runner`, the runner kit: what a runner subprocess written in Python
  needs to serve the runner protocol;
- `dmr.sdk.dialect`, the dialect kit: what an API dialect's views need to resolve
  a model, call, stream or proxy to its runner, limit bodies, pull, push and
  package models, answer errors, and what a plugin's CLI command needs;
- `dmr.sdk.cluster`, the cluster kit: what a placement plugin needs to start
  runners on other machines (get and verify a model there, build and watch its
  runner).

    from dmr.sdk import EngineSpec, RunnerCommand, hookimpl

Other `dmr` modules are internal and may change; the bundled plugins import only
from these four (tests/test_plugin_kit.py). A name is imported from its core
module when first used (`dmr.sdk._lazy`), so importing a tier costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dmr.sdk._lazy import lazy_exports

if TYPE_CHECKING:
    from dmr.distribution.gguf import GGUFError, GGUFFile, read_gguf
    from dmr.errors import (
        ConflictError,
        DmrError,
        InvalidRequestError,
        ModelNotFoundError,
        PayloadTooLargeError,
        RegistryError,
        RunnerError,
    )
    from dmr.hookspecs import hookimpl
    from dmr.media_types import CONFIG_V01
    from dmr.plugins import DuplicatePluginNameError, PluginContractError
    from dmr.records import (
        AcceleratorInfo,
        ApiDialect,
        Engine,
        EngineSpec,
        EngineState,
        EngineStatus,
        MemoryEstimate,
        Mode,
        ModelFormat,
        ModelPuller,
        ModelSource,
        PlacedRunner,
        ProgressCallback,
        ProgressEvent,
        ProxyRoute,
        RunnerCommand,
        RunnerConfig,
        RunnerLaunch,
        RunnerPlacement,
    )
    from dmr.scheduler.wait_queue import Priority, priority_headers, request_priority
    from dmr.store import Store, StoredModel

__all__ = [
    "CONFIG_V01",
    "AcceleratorInfo",
    "ApiDialect",
    "ConflictError",
    "DmrError",
    "DuplicatePluginNameError",
    "Engine",
    "EngineSpec",
    "EngineState",
    "EngineStatus",
    "GGUFError",
    "GGUFFile",
    "InvalidRequestError",
    "MemoryEstimate",
    "Mode",
    "ModelFormat",
    "ModelNotFoundError",
    "ModelPuller",
    "ModelSource",
    "PayloadTooLargeError",
    "PlacedRunner",
    "PluginContractError",
    "Priority",
    "ProgressCallback",
    "ProgressEvent",
    "ProxyRoute",
    "RegistryError",
    "RunnerCommand",
    "RunnerConfig",
    "RunnerError",
    "RunnerLaunch",
    "RunnerPlacement",
    "Store",
    "StoredModel",
    "dmr_version",
    "hookimpl",
    "priority_headers",
    "read_gguf",
    "request_priority",
]


def dmr_version() -> str:
    """The installed dmr's version (`0.0.0` in a source tree never installed)."""
    import dmr

    return dmr.__version__


if not TYPE_CHECKING:
    __getattr__, __dir__ = lazy_exports(__name__, __file__)
