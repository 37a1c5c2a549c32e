"""The plugin manager: hooks documented, duplicates refused, plugins disabled by name."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

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
    monkeypatch.setenv("DMR_DISABLED_PLUGINS", "dmr.formats, nvidia")
    pm = plugins.new_plugin_manager(load_entry_points=False)
    assert pm.is_blocked("dmr.formats")
    assert plugins.model_formats(pm) == []
    # Entry points too: the GPU probes of dmr-gpus are switched off one by one.
    loaded = {name for name, plugin in plugins.new_plugin_manager().list_name_plugin() if plugin}
    assert "nvidia" not in loaded and {"rocm", "vulkan", "metal"} <= loaded


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


class _AsyncEngines:
    @hookimpl
    async def dmr_engines(self) -> list[object]:
        return []


class _NotAList:
    @hookimpl
    def dmr_model_formats(self) -> object:
        return ModelFormat(name="bare", media_types=("x/y",), preferred_engine="x")


def test_registration_hooks_refuse_awaitables_and_name_the_plugin() -> None:
    """Registration hooks are read where nothing is awaited: an `async def dmr_engines`
    gets a clear error naming it, not "'coroutine' object is not iterable"."""
    pm = plugins.new_plugin_manager(load_entry_points=False)
    pm.register(_AsyncEngines(), name="async-engines")
    expected = r"'async-engines'.*dmr_engines.*awaitable"
    with pytest.raises(plugins.PluginContractError, match=expected):
        plugins.engines(pm)
    pm = plugins.new_plugin_manager(load_entry_points=False)
    pm.register(_NotAList(), name="not-a-list")
    with pytest.raises(plugins.PluginContractError, match=r"'not-a-list'.*ModelFormat"):
        plugins.model_formats(pm)


def test_async_probes_are_awaited() -> None:
    import asyncio

    from dmr.records import AcceleratorInfo

    class AsyncProbe:
        @hookimpl
        async def dmr_probe_hardware(self) -> list[AcceleratorInfo]:
            await asyncio.sleep(0)
            return [AcceleratorInfo(name="npu", kind="npu", index=0, total_memory=1, free_memory=1)]

    pm = plugins.new_plugin_manager(load_entry_points=False)
    pm.register(AsyncProbe(), name="async-probe")
    assert "npu" in {device.kind for device in asyncio.run(plugins.probe_hardware(pm))}


def test_the_scheduler_uses_the_formats_of_the_app_s_plugin_manager(tmp_path: Path) -> None:
    """Not the process-wide manager's: an app built on its own manager sees its formats."""
    import asyncio

    from dmr.server.app import build_services
    from dmr.settings import Settings

    pm = plugins.new_plugin_manager(load_entry_points=False)
    pm.register(_FormatPlugin("only-here"), name="only-here")
    services = asyncio.run(build_services(Settings(models_path=tmp_path / "models"), pm))
    assert "only-here" in services.scheduler.formats()
    assert "only-here" not in {fmt.name for fmt in plugins.model_formats()}


def test_a_model_source_with_its_own_scheme_is_reachable(
    dmr_server_factory: Callable[..., DmrServer],
) -> None:
    """The test plugin's `test://NAME` source: such a reference is no OCI name, and is
    routed to its source instead of being refused as an invalid registry."""
    server = dmr_server_factory()
    pulled = server.cli("pull", "test://hello")
    assert pulled.returncode == 0, pulled.stderr
    assert "pulled successfully" in pulled.stdout
    with server.client() as client:
        assert client.get("/models/test/hello").json()["config"]["format"] == "testfmt"
        chat = client.post(
            "/engines/v1/chat/completions",
            json={"model": "test/hello", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert chat.status_code == 200, chat.text
        # Without a source claiming the scheme it stays an invalid name, refused at once.
        refused = client.post("/models/create", json={"from": "nosuch://x"})
    assert refused.status_code == 400


def test_the_plugin_guide_documents_every_hook_and_every_public_name() -> None:
    """docs/plugins.md must cover each hook and each name the plugin kit's four tiers
    (`dmr.sdk`, `dmr.sdk.runner`, `dmr.sdk.dialect`, `dmr.sdk.cluster`) and
    `dmr.testing` export (as datasette checks its plugin hooks page)."""
    from dmr import sdk, testing
    from dmr.sdk import cluster, dialect, runner

    guide = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    missing = [f"`{name}" for name in HOOK_NAMES if f"`{name}" not in guide]
    for tier in (sdk, runner, dialect, cluster):
        missing += [f"`{name}`" for name in tier.__all__ if f"`{name}`" not in guide]
    missing += [f"`{name}" for name in testing.__all__ if f"`{name}" not in guide]
    assert not missing, f"docs/plugins.md does not mention {missing}"
    # The SDK is the import place: every record a hook returns is exported there.
    from dmr import records

    assert set(records.__all__) <= set(sdk.__all__)
