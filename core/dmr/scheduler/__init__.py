"""Runner scheduling: one runner subprocess per (engine, model, mode), admitted by memory."""

from __future__ import annotations

from dmr.scheduler.configuration import validate_runtime_flags
from dmr.scheduler.model_configs import ConfiguredModel
from dmr.scheduler.runner import RunnerHandle
from dmr.scheduler.scheduler import Scheduler
from dmr.scheduler.wait_queue import Priority, request_priority

__all__ = [
    "ConfiguredModel",
    "Priority",
    "RunnerHandle",
    "Scheduler",
    "request_priority",
    "validate_runtime_flags",
]
