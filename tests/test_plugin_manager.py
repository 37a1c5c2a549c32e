"""The plugin manager: hooks documented, duplicates refused, plugins disabled by name."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
from dmr import hookspecs, plugins
from dmr.hookspecs import hookimpl
from dmr.records import ModelFormat

from tests.fixtures.server import DmrServer

HOOK_NAMES = [name for name in dir(hookspecs.DmrSpec) if name.startswith("dmr_")]


def test_every_hook_is_prefixed_typed_and_documented_with_an_example() -> None:
    public = [n for n in vars(hookspecs.DmrSpec) if not n.startswith("_")]
    assert public and all(name.startswith("dmr_") for name in public)
    for name in HOOK_NAMES:
        function = getattr(hookspecs.DmrSpec, name)
        doc = inspect.getdoc(function) or ""
        assert "Example" in doc and "hookimpl" in doc, f"{name} needs a docstring with an example"
        annotation = inspect.signature(function).return_annotation
        assert annotation is not inspect.Signature.empty, f"{name} needs a return type"


class _FormatPlugin:
    def __init__(self, name: str) -> None:
        self.format_name = name

    @hookimpl
    def dmr_model_formats(self) -> list[ModelFormat]:
        return [ModelFormat(name=self.format_name, media_types=(), preferred_engine="x")]


def test_duplicate_record_names_fail_loudly() -> None:
    pm = plugins.new_plugin_manager(load_entry_points=False)
    pm.register(_FormatPlugin("gguf"), name="impostor")
    with pytest.raises(plugins.DuplicatePluginNameError, match="gguf"):
        plugins.model_formats(pm)


def test_new_records_from_a_plugin_are_seen() -> None:
    pm = plugins.new_plugin_manager(load_entry_points=False)
    pm.register(_FormatPlugin("onnx"), name="onnx-plugin")
    assert "onnx" in {fmt.name for fmt in plugins.model_formats(pm)}


def test_builtins_load_first_and_probe_always_finds_a_cpu() -> None:
    import asyncio

    pm = plugins.new_plugin_manager(load_entry_points=False)
    names = [name for name, _ in pm.list_name_plugin()]
    assert names[: len(plugins.BUILTIN_PLUGINS)] == list(plugins.BUILTIN_PLUGINS)
    devices = asyncio.run(plugins.probe_hardware(pm))
    cpus = [d for d in devices if d.kind == "cpu"]
    assert len(cpus) == 1 and cpus[0].total_memory > 0 and (cpus[0].cores or 0) >= 1


def test_disabled_plugins_are_blocked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMR_DISABLED_PLUGINS", "dmr.formats, dmr.hardware.nvidia")
    pm = plugins.new_plugin_manager(load_entry_points=False)
    assert pm.is_blocked("dmr.formats")
    assert plugins.model_formats(pm) == []


def test_dmr_plugins_command_lists_builtins_and_honours_disabling() -> None:
    env = dict(os.environ, COLUMNS="200")
    listed = subprocess.run(
        [sys.executable, "-m", "dmr", "plugins"], env=env, capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    assert "dmr.formats" in listed.stdout and "dmr_model_formats" in listed.stdout
    env["DMR_DISABLED_PLUGINS"] = "dmr.formats"
    blocked = subprocess.run(
        [sys.executable, "-m", "dmr", "plugins"], env=env, capture_output=True, text=True
    )
    assert blocked.returncode == 0, blocked.stderr
    assert "dmr.formats" not in blocked.stdout


def test_a_probe_that_raises_is_skipped_and_reported(
    dmr_server_factory: Callable[..., DmrServer],
) -> None:
    """A broken third-party probe costs its own devices, not the server's start."""
    server = dmr_server_factory(DMR_TEST_BROKEN_PROBE="no driver for the frobnicator")
    with server.client() as client:
        hardware = client.get("/engines/hardware").json()
    assert [d["kind"] for d in hardware["devices"]] == ["cpu"]  # the other probes still ran
    assert hardware["probe_errors"] == [
        {"plugin": "test-engine", "error": "RuntimeError: no driver for the frobnicator"}
    ]
    assert "hardware probe test-engine failed" in server.log()
    status = server.cli("status")
    assert status.returncode == 0, status.stderr
    assert "test-engine: RuntimeError: no driver for the frobnicator" in status.stdout

