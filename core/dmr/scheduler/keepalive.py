"""How long an idle runner stays loaded (docs/compatibility.md §5)."""

from __future__ import annotations

__all__ = ["idle_deadline_seconds"]


def idle_deadline_seconds(keep_alive: float | None, idle_timeout: float) -> float | None:
    """Seconds an idle runner lives, 0 to unload at once, None to keep it forever.

    A model's `keep_alive` (from the request or `_configure`) wins over the
    server's idle timeout: `0` unloads right after the request, negative never
    unloads. The server's `MODEL_RUNNER_IDLE_TIMEOUT` of 0 means never.
    """
    if keep_alive is not None:
        if keep_alive < 0:
            return None
        return keep_alive
    if idle_timeout <= 0:
        return None
    return idle_timeout
