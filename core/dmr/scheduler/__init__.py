"""Runner scheduling: one runner subprocess per (engine, model, mode), admitted by memory."""

from __future__ import annotations

from dmr.scheduler.runner import RunnerHandle
from dmr.scheduler.scheduler import ConfiguredModel, Scheduler, validate_runtime_flags

__all__ = ["ConfiguredModel", "RunnerHandle", "Scheduler", "validate_runtime_flags"]
