"""The one import place for plugin authors (docs/plugins.md).

    from dmr.sdk import EngineSpec, RunnerCommand, hookimpl

Everything here is the public plugin contract: the hook marker, the records hooks
return and receive, the store a model source's puller writes to, and the errors
a plugin may raise for the core to turn into HTTP answers. Other `dmr` modules
are internal and may change.
"""

from __future__ import annotations

from dmr.errors import DmrError, InvalidRequestError, ModelNotFoundError, RegistryError
from dmr.hookspecs import hookimpl
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
    ProgressCallback,
    ProgressEvent,
    ProxyRoute,
    RunnerCommand,
    RunnerConfig,
    RunnerLaunch,
)
from dmr.scheduler.wait_queue import Priority, priority_headers, request_priority
from dmr.store import Store, StoredModel

__all__ = [
    "AcceleratorInfo",
    "ApiDialect",
    "DmrError",
    "DuplicatePluginNameError",
    "Engine",
    "EngineSpec",
    "EngineState",
    "EngineStatus",
    "InvalidRequestError",
    "MemoryEstimate",
    "Mode",
    "ModelFormat",
    "ModelNotFoundError",
    "ModelPuller",
    "ModelSource",
    "PluginContractError",
    "Priority",
    "ProgressCallback",
    "ProgressEvent",
    "ProxyRoute",
    "RegistryError",
    "RunnerCommand",
    "RunnerConfig",
    "RunnerLaunch",
    "Store",
    "StoredModel",
    "hookimpl",
    "priority_headers",
    "request_priority",
]
