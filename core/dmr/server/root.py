"""`/`, `/version`, `/engines/status`, `/engines/df` (docs/compatibility.md §4 control routes)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from quart import Blueprint, Response

from dmr import __version__
from dmr.engine_install_hints import INSTALL_HINTS
from dmr.plugins import probe_hardware_report
from dmr.records import EngineState, EngineStatus
from dmr.server.services import get_services

blueprint = Blueprint("dmr_root", __name__)

# Engines DMR reports even when no plugin provides them, so clients see "Not Installed".
KNOWN_ENGINES = INSTALL_HINTS


@blueprint.get("/")
async def index() -> Response:
    return Response("Docker Model Runner is running", mimetype="text/plain")


@blueprint.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@blueprint.get("/engines/status")
async def engines_status() -> dict[str, str]:
    services = get_services()
    report: dict[str, str] = {}
    for name, spec in services.engines.items():
        try:
            status = spec.engine.status()
        except Exception as error:  # a broken engine plugin must not break the route
            status = EngineStatus(EngineState.ERROR, str(error))
        report[name] = status.render()
    placement = services.scheduler.placement
    if placement is not None:
        # Beside the engines, as `dmr status` lists it; a lost cluster is no failed
        # health check: runners then start on this machine.
        report[placement.name] = _cluster_line(placement.status())
    for name, hint in KNOWN_ENGINES.items():
        report.setdefault(name, EngineStatus(EngineState.NOT_INSTALLED, hint).render())
    return report


@blueprint.get("/engines/hardware")
async def engines_hardware() -> dict[str, Any]:
    """dmr's own route: each device the probes find now, and the engines that can use it."""
    services = get_services()
    # Probed again: free memory is what a user asking now wants to see.
    devices, failed = await probe_hardware_report(services.plugins)
    return {
        "probe_errors": [{"plugin": f.plugin, "error": f.error} for f in failed],
        "devices": [
            {
                "name": device.name,
                "kind": device.kind,
                "index": device.index,
                "total_memory": device.total_memory,
                "free_memory": device.free_memory,
                "cores": device.cores,
                "driver": device.driver,
                "details": dict(device.details),
                "engines": sorted(
                    name
                    for name, spec in services.engines.items()
                    if device.kind in spec.device_kinds
                ),
            }
            for device in devices
        ],
        # What admission uses: the devices probed when the server started, or the
        # cluster's nodes while a placement is connected.
        "scheduler_devices": [device.name for device in services.scheduler.placement_devices()],
        "cluster": (
            dict(services.scheduler.placement.status())
            if services.scheduler.placement is not None
            else None
        ),
    }


def _cluster_line(status: Mapping[str, Any]) -> str:
    nodes = list(status.get("nodes") or [])
    if status.get("connected"):
        return f"Running: cluster at {status.get('address')}, {len(nodes)} nodes: " + ", ".join(
            nodes
        )
    return (
        f"Error: not connected to the cluster at {status.get('address')} ({status.get('error')});"
        " new runners start on this machine"
    )


@blueprint.get("/engines/df")
async def engines_df() -> dict[str, int]:
    services = get_services()
    engine_disk = sum(spec.disk_usage() for spec in services.engines.values() if spec.disk_usage)
    return {
        "models_disk_usage": services.store.disk_usage(),
        "default_backend_disk_usage": engine_disk,
        # dmr's own: runners' prompt caches kept across loads (docs/scheduler.md).
        "prompt_cache_disk_usage": services.store.prompt_cache_usage(),
    }
