"""The cluster kit: what a placement plugin needs to run dmr's runners on other
machines (docs/plugins.md, "The cluster kit"; the Ray plugin uses it).

    from dmr.sdk.cluster import RunnerProcess, Settings, engines, pull_model

A placement (`dmr_runner_placement`, returning a `dmr.sdk.RunnerPlacement`) starts
each runner on a node, where the node's own plugins build the runner's command
(`engines()`) from a `RunnerLaunch` whose paths are the node's: the model pulled
into the node's store (`pull_model`) and its every blob checked against its digest
(`hash_file`) first. `RunnerProcess` starts, watches and stops the runner there as
the scheduler does here. `Settings` are the server's (`ray_address` and the rest).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dmr.sdk._lazy import lazy_exports

if TYPE_CHECKING:
    from dmr.distribution.service import pull_model
    from dmr.plugins import engines
    from dmr.scheduler.admission import format_bytes
    from dmr.scheduler.runner_process import RunnerProcess, explain_exit
    from dmr.settings import Settings
    from dmr.store.blobs import hash_file

__all__ = [
    "RunnerProcess",
    "Settings",
    "engines",
    "explain_exit",
    "format_bytes",
    "hash_file",
    "pull_model",
]

if not TYPE_CHECKING:
    __getattr__, __dir__ = lazy_exports(__name__, __file__)
