"""The long-lived objects routes use, kept on `app.extensions["dmr"]`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy
from quart import current_app

if TYPE_CHECKING:
    from quart import Quart

    from dmr.records import AcceleratorInfo, EngineSpec
    from dmr.scheduler import Scheduler
    from dmr.settings import Settings
    from dmr.store import Store

__all__ = ["Services", "get_services", "services_for"]


@dataclass
class Services:
    settings: Settings
    plugins: pluggy.PluginManager
    store: Store
    scheduler: Scheduler
    engines: dict[str, EngineSpec]
    devices: list[AcceleratorInfo]
    # Free-form room for plugins (the Responses store, the request recorder, ...).
    extras: dict[str, Any] = field(default_factory=dict)


def get_services() -> Services:
    services: Services = current_app.extensions["dmr"]
    return services


def services_for(app: Quart) -> Services:
    """`app`'s services outside a request (`dmr_server_startup(app)`, a background task)."""
    services: Services = app.extensions["dmr"]
    return services
