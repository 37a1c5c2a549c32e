"""The dmr-gpus probes through a real `dmr serve`: FAKE `rocm-smi`, `vulkaninfo` and
`system_profiler` scripts (replaying outputs recorded from real GPUs,
plugins/gpus/tests/recorded/README.md) first on the server's PATH; their devices reach
admission (the runner lands on the GPU, a model larger than its free memory is
refused) and `dmr status` (each device with the engines that can use it, and a
failing probe's error)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.fixtures.server import DmrServer
from tests.fixtures.test_engine import MiB, add_test_model, chat_body, ps

RECORDED = Path(__file__).resolve().parents[1] / "plugins" / "gpus" / "tests" / "recorded"
GiB = 1024 * MiB
ServerFactory = Callable[..., DmrServer]


def fake_tools(folder: Path, **tools: str) -> str:
    """FAKE tools in `folder`, each a script named like the real tool that prints a
    recorded output (a file name in RECORDED) or the text given; the PATH to start
    the server with."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, output in tools.items():
        recorded = RECORDED / output
        body = (
            f"cat {shlex.quote(str(recorded))}"
            if recorded.is_file()
            else (f"printf '%s\\n' {shlex.quote(output)}")
        )
        script = folder / name.replace("rocm_smi", "rocm-smi")  # keywords have no "-"
        header = f"#!/bin/sh\n# FAKE {script.name} for dmr's tests (no such GPU here)\n"
        script.write_text(header + body + "\n")
        script.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def chat(server: DmrServer, model: str) -> httpx.Response:
    with server.client() as client:
        return client.post("/engines/v1/chat/completions", json=chat_body(model))


def status_devices(server: DmrServer) -> tuple[dict[str, Any], str]:
    answer = server.cli("status", "--json")
    assert answer.returncode == 0, answer.stderr
    plain = server.cli("status")
    assert plain.returncode == 0, plain.stderr
    return json.loads(answer.stdout), plain.stdout


def test_rocm_gpus_reach_admission_and_status(
    dmr_server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = dmr_server_factory(
        PATH=fake_tools(tmp_path / "fake-gpu-tools", rocm_smi="rocm-smi-two-cards.json"),
        DMR_TEST_ENGINE_DEVICE_KINDS="cpu,rocm",
    )
    add_test_model(server.models_path, "test/small", memory=8 * MiB)
    add_test_model(server.models_path, "test/huge", memory=30 * GiB)

    assert chat(server, "test/small").status_code == 200
    # The GPU with the most free memory: the RX 7900 XT, not the iGPU or the CPU.
    assert [runner["device"] for runner in ps(server)] == ["Radeon RX 7900 XT"]
    refused = chat(server, "test/huge")
    assert refused.status_code == 507
    assert "Radeon RX 7900 XT" in refused.json()["error"]["message"]

    report, plain = status_devices(server)
    rocm = {device["index"]: device for device in report["devices"] if device["kind"] == "rocm"}
    assert rocm[0]["total_memory"] == 21458059264
    assert rocm[0]["free_memory"] == 21458059264 - 27856896
    assert rocm[0]["driver"] == "6.7.0"
    assert {"diffusers", "llama.cpp", "test-engine"} <= set(rocm[0]["engines"])
    assert "vllm" not in rocm[0]["engines"]  # dmr-vllm declares cuda and cpu only
    assert rocm[1]["name"] == "Raphael"
    assert report["probe_errors"] == []
    assert "rocm:0 Radeon RX 7900 XT — 20.0 GiB free of 20.0 GiB — engines:" in plain


def test_a_vulkan_gpu_is_used_and_llvmpipe_is_not(
    dmr_server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = dmr_server_factory(
        PATH=fake_tools(tmp_path / "fake-gpu-tools", vulkaninfo="vulkaninfo-radv-and-llvmpipe.txt"),
        DMR_TEST_ENGINE_DEVICE_KINDS="vulkan",
    )
    add_test_model(server.models_path, "test/small", memory=8 * MiB)
    assert chat(server, "test/small").status_code == 200
    assert [runner["device"] for runner in ps(server)] == ["AMD Radeon RX 6800 XT (RADV NAVI21)"]
    report, plain = status_devices(server)
    assert [d["kind"] for d in report["devices"]] == ["cpu", "vulkan"]
    assert "vulkan:0 AMD Radeon RX 6800 XT (RADV NAVI21) — 14.7 GiB free of 16.0 GiB" in plain


def test_metal_unified_memory_and_a_broken_probe_beside_it(
    dmr_server_factory: ServerFactory, tmp_path: Path
) -> None:
    """A Mac's GPU (the FAKE system_profiler replays an M3 Pro) is used, while a
    vulkaninfo that prints garbage is one line in `dmr status`, not a failed start."""
    server = dmr_server_factory(
        PATH=fake_tools(
            tmp_path / "fake-gpu-tools",
            system_profiler="system_profiler-m3-pro.json",
            vulkaninfo="Segmentation fault (core dumped)",
        ),
        DMR_TEST_ENGINE_DEVICE_KINDS="cpu,metal",
    )
    add_test_model(server.models_path, "test/small", memory=8 * MiB)
    assert chat(server, "test/small").status_code == 200
    assert [runner["device"] for runner in ps(server)] == ["Apple M3 Pro"]

    report, plain = status_devices(server)
    [gpu] = [d for d in report["devices"] if d["kind"] == "metal"]
    assert gpu["details"]["memory"] == "unified" and gpu["details"]["gpu_cores"] == "18"
    assert {"diffusers", "llama.cpp", "test-engine"} <= set(gpu["engines"])
    assert report["probe_errors"] == [
        {
            "plugin": "vulkan",
            "error": "GpuProbeError: vulkaninfo printed no Vulkan report:"
            " 'Segmentation fault (core dumped)'",
        }
    ]
    assert "metal:0 Apple M3 Pro" in plain
    assert "vulkan: GpuProbeError: vulkaninfo printed no Vulkan report" in plain
    assert "hardware probe vulkan failed" in server.log()


def test_the_plugin_guide_s_gpu_backend_example_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/plugins.md's third-party probe, run as written against a FAKE `acme-smi`."""
    guide = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    source = re.search(r"```python\n(# dmr_acme/probe\.py\n.*?)```", guide, re.DOTALL)
    assert source, "docs/plugins.md lost its GPU backend example"
    module = ModuleType("dmr_acme_probe")
    exec(compile(source.group(1), "docs/plugins.md", "exec"), module.__dict__)

    folder = tmp_path / "fake-gpu-tools"
    monkeypatch.setenv("PATH", os.pathsep.join([str(folder), os.environ["PATH"]]))
    assert asyncio.run(module.dmr_probe_hardware()) == []  # no tool: no device
    printed = '[{"name": "Acme X1", "total_bytes": 68719476736, "free_bytes": 60129542144}]'
    fake_tools(folder, **{"acme-smi": printed})
    [device] = asyncio.run(module.dmr_probe_hardware())
    assert (device.name, device.kind, device.total_memory) == ("Acme X1", "acme", 64 * GiB)
    assert device.free_memory == 56 * GiB
