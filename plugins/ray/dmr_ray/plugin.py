"""The plugin's hook: a Ray placement when the server has a Ray address."""

from __future__ import annotations

from dmr.sdk import RunnerPlacement, hookimpl
from dmr.sdk.cluster import Settings


@hookimpl
def dmr_runner_placement(settings: Settings) -> RunnerPlacement | None:
    if not settings.ray_address:
        return None
    from dmr_ray.placement import RayPlacement  # Ray's client only when asked for

    return RayPlacement(settings)
