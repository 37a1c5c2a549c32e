"""The GPU probes against recorded tool outputs and FAKE libraries (no AMD, Vulkan,
Apple or NVIDIA GPU here): parsing, a missing tool (no device, no error), a tool that
fails or prints garbage (a `GpuProbeError` that `dmr status` shows), and the hooks as
the plugin manager loads them from the entry points."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psutil
import pytest
from dmr import plugins
from dmr_gpus import metal, nvidia, rocm, vulkan
from dmr_gpus.tools import GpuProbeError, run_tool
from gpus_fakes import RECORDED, FakeGpu, GiB, fake_amdsmi, fake_pynvml, write_fake_tool


@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder first on PATH for FAKE tools; no real GPU library is importable."""
    folder = tmp_path / "fake-gpu-tools"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setitem(sys.modules, "amdsmi", None)  # import amdsmi -> ImportError
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], driver_present=False))
    monkeypatch.delenv("DMR_DISABLED_PLUGINS", raising=False)
    return folder


# ----------------------------------------------------------------------------- ROCm


def test_rocm_smi_json_gives_each_card_with_its_vram() -> None:
    devices = rocm.parse_rocm_smi_json((RECORDED / "rocm-smi-two-cards.json").read_text())
    assert [(d.name, d.kind, d.index) for d in devices] == [
        ("Radeon RX 7900 XT", "rocm", 0),
        ("Raphael", "rocm", 1),
    ]
    assert devices[0].total_memory == 21458059264
    assert devices[0].free_memory == 21458059264 - 27856896
    assert devices[0].driver == "6.7.0"
    assert devices[0].details["gfx_version"] == "gfx1100"


def test_rocm_smi_of_rocm5_with_a_warning_before_the_json() -> None:
    [device] = rocm.parse_rocm_smi_json((RECORDED / "rocm-smi-rocm5.json").read_text())
    assert device.name == "Instinct MI210"
    assert device.free_memory == 68702699520 - 10960896


async def test_the_rocm_probe_runs_rocm_smi_from_path(fake_bin: Path) -> None:
    write_fake_tool(fake_bin, "rocm-smi", recorded="rocm-smi-two-cards.json")
    devices = await rocm.dmr_probe_hardware()
    assert [d.name for d in devices] == ["Radeon RX 7900 XT", "Raphael"]
    assert devices[0].details["source"] == "rocm-smi"


async def test_no_rocm_smi_and_no_amdsmi_is_no_device(fake_bin: Path) -> None:
    assert await rocm.probe_rocm() == []


@pytest.mark.parametrize(
    ("stdout", "stderr", "code", "expected"),
    [
        ("Segmentation fault\n", "", 0, "rocm-smi printed no JSON: 'Segmentation fault'"),
        ('{"card0": {"GPU use (%)": "0"}}', "", 0, "rocm-smi's card0 has no 'VRAM Total Memory"),
        ('{"card0": {"x": }}', "", 0, "JSON that does not parse"),
        ("", "Permission denied: /dev/kfd", 2, "exited with 2: 'Permission denied: /dev/kfd'"),
    ],
)
async def test_a_failing_or_garbled_rocm_smi_is_a_clear_probe_error(
    fake_bin: Path, stdout: str, stderr: str, code: int, expected: str
) -> None:
    write_fake_tool(fake_bin, "rocm-smi", stdout=stdout, stderr=stderr, exit_code=code)
    with pytest.raises(GpuProbeError) as raised:
        await rocm.probe_rocm()
    assert expected in str(raised.value)


async def test_rocm_smi_without_an_amd_gpu_is_no_device(fake_bin: Path) -> None:
    # What rocm-smi prints where the amdgpu driver is not loaded.
    write_fake_tool(
        fake_bin, "rocm-smi",
        stdout="ERROR:root:Driver not initialized (amdgpu not found in modules)\n", exit_code=1,
    )  # fmt: skip
    assert await rocm.probe_rocm() == []


async def test_the_amdsmi_library_is_used_when_it_imports(
    fake_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fake_tool(fake_bin, "rocm-smi", stdout="never read", exit_code=9)
    monkeypatch.setitem(
        sys.modules, "amdsmi", fake_amdsmi([FakeGpu("AMD Instinct MI300X", 192 * GiB, 2 * GiB)])
    )
    [device] = await rocm.probe_rocm()
    assert (device.name, device.kind, device.index) == ("AMD Instinct MI300X", "rocm", 0)
    assert (device.total_memory, device.free_memory) == (192 * GiB, 190 * GiB)
    assert device.driver == "6.8.5" and device.details["source"] == "amdsmi"


async def test_amdsmi_without_a_driver_is_no_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "amdsmi", fake_amdsmi([], driver_present=False))
    assert await rocm.probe_rocm() == []


async def test_amdsmi_failing_a_memory_query_is_a_clear_probe_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpus = [FakeGpu("AMD Instinct MI300X", 192 * GiB, 0)]
    monkeypatch.setitem(sys.modules, "amdsmi", fake_amdsmi(gpus, fail_on="usage"))
    with pytest.raises(GpuProbeError, match=r"amdsmi: .*NOT_SUPPORTED \(usage\)"):
        await rocm.probe_rocm()
    monkeypatch.setitem(sys.modules, "amdsmi", fake_amdsmi(gpus, fail_on="driver"))
    [device] = await rocm.probe_rocm()  # the driver version is optional
    assert device.driver is None


# ----------------------------------------------------------------------------- Vulkan


def test_vulkaninfo_gives_the_largest_device_local_heap_and_its_budget() -> None:
    report = (RECORDED / "vulkaninfo-radv-and-llvmpipe.txt").read_text()
    parsed = vulkan.parse_vulkaninfo(report)
    assert [d.properties["deviceType"] for d in parsed] == [
        "PHYSICAL_DEVICE_TYPE_DISCRETE_GPU",
        "PHYSICAL_DEVICE_TYPE_CPU",
    ]
    device = vulkan.to_accelerator(parsed[0])
    assert (device.name, device.kind, device.index) == (
        "AMD Radeon RX 6800 XT (RADV NAVI21)", "vulkan", 0,
    )  # fmt: skip
    assert device.total_memory == 17163091968  # heap 0, not the 256 MiB BAR heap
    assert device.free_memory == 16542867456 - 734003200  # budget - usage
    assert device.driver == "Mesa 24.0.5"
    assert device.details["vendor_id"] == "0x1002"


async def test_the_vulkan_probe_leaves_out_cpu_implementations(fake_bin: Path) -> None:
    write_fake_tool(fake_bin, "vulkaninfo", recorded="vulkaninfo-radv-and-llvmpipe.txt")
    devices = await vulkan.dmr_probe_hardware()
    assert [d.name for d in devices] == ["AMD Radeon RX 6800 XT (RADV NAVI21)"]


async def test_a_gpu_that_nvml_reports_is_not_counted_again_by_vulkan(
    fake_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fake_tool(fake_bin, "vulkaninfo", recorded="vulkaninfo-nvidia-and-intel.txt")
    monkeypatch.setitem(
        sys.modules, "pynvml", fake_pynvml([FakeGpu("NVIDIA GeForce RTX 4090", 24 * GiB, 0)])
    )
    [intel] = await vulkan.probe_vulkan()
    assert intel.name == "Intel(R) Graphics (RPL-S)" and intel.index == 1
    # Its driver has no memory budget extension: free is the heap's size.
    assert intel.total_memory == intel.free_memory == 33567498240
    # With the NVIDIA probe switched off, Vulkan reports the NVIDIA GPU.
    monkeypatch.setenv("DMR_DISABLED_PLUGINS", "nvidia")
    names = [d.name for d in await vulkan.probe_vulkan()]
    assert names == ["NVIDIA GeForce RTX 4090", "Intel(R) Graphics (RPL-S)"]


async def test_no_vulkaninfo_or_no_vulkan_driver_is_no_device(fake_bin: Path) -> None:
    assert await vulkan.probe_vulkan() == []
    # vulkan-tools installed on a machine without a Vulkan driver (the loader's words).
    write_fake_tool(
        fake_bin, "vulkaninfo", exit_code=1,
        stderr="ERROR: [Loader Message] Code 0 : vkCreateInstance: Found no drivers!\n"
        "Cannot create Vulkan instance.\nERROR at ./vulkaninfo/vulkaninfo.h:573:"
        "vkCreateInstance failed with ERROR_INCOMPATIBLE_DRIVER\n",
    )  # fmt: skip
    assert await vulkan.probe_vulkan() == []


@pytest.mark.parametrize(
    ("stdout", "stderr", "code", "expected"),
    [
        ("\x00\x17garbage", "", 0, "vulkaninfo printed no Vulkan report"),
        ("VULKANINFO\nGPU0:\n\tdeviceName = Broken\n", "", 0, "no device-local memory heap"),
        ("", "vkEnumeratePhysicalDevices failed with ERROR_DEVICE_LOST", 139, "exited with 139"),
    ],
)
async def test_a_failing_or_garbled_vulkaninfo_is_a_clear_probe_error(
    fake_bin: Path, stdout: str, stderr: str, code: int, expected: str
) -> None:
    write_fake_tool(fake_bin, "vulkaninfo", stdout=stdout, stderr=stderr, exit_code=code)
    with pytest.raises(GpuProbeError, match=expected):
        await vulkan.probe_vulkan()


# ----------------------------------------------------------------------------- Metal


async def test_apple_silicon_reports_its_unified_memory(fake_bin: Path) -> None:
    write_fake_tool(fake_bin, "system_profiler", recorded="system_profiler-m3-pro.json")
    [device] = await metal.dmr_probe_hardware()
    assert (device.name, device.kind, device.index) == ("Apple M3 Pro", "metal", 0)
    assert device.total_memory == psutil.virtual_memory().total
    assert 0 < device.free_memory <= device.total_memory
    assert device.details["memory"] == "unified" and device.details["gpu_cores"] == "18"


def test_a_discrete_mac_gpu_reports_its_vram() -> None:
    output = (RECORDED / "system_profiler-imac-pro-vega.json").read_text()
    [device] = metal.parse_displays(output)
    assert device.name == "Radeon Pro Vega 64"
    assert device.total_memory == device.free_memory == 16 * GiB


async def test_no_system_profiler_is_no_device(fake_bin: Path) -> None:
    assert await metal.probe_metal() == []  # every machine but a Mac


@pytest.mark.parametrize(
    ("stdout", "expected"),
    [
        ("<plist>", "system_profiler printed no JSON"),
        ('{"SPDisplaysDataType": {}}', "no SPDisplaysDataType list"),
        ('{"SPDisplaysDataType": [{"spdisplays_metal": "yes", "spdisplays_vram": "lots"}]}',
         "VRAM size it does not explain: 'lots'"),
    ],
)  # fmt: skip
async def test_garbled_system_profiler_output_is_a_clear_probe_error(
    fake_bin: Path, stdout: str, expected: str
) -> None:
    write_fake_tool(fake_bin, "system_profiler", stdout=stdout)
    with pytest.raises(GpuProbeError, match=expected):
        await metal.probe_metal()


# ----------------------------------------------------------------------------- NVIDIA


def test_the_nvidia_probe_reads_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = [FakeGpu("NVIDIA H100 80GB HBM3", 80 * GiB, GiB), FakeGpu("NVIDIA L4", 24 * GiB, 0)]
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(gpus))
    devices = nvidia.dmr_probe_hardware()
    assert [(d.name, d.kind, d.index) for d in devices] == [
        ("NVIDIA H100 80GB HBM3", "cuda", 0),
        ("NVIDIA L4", "cuda", 1),
    ]
    assert devices[0].free_memory == 79 * GiB and devices[0].driver == "550.54.15"


def test_no_nvml_or_no_nvidia_driver_is_no_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert nvidia.probe_nvidia() == []
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], driver_present=False))
    assert nvidia.probe_nvidia() == []


def test_an_nvml_failure_after_init_is_a_clear_probe_error(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = [FakeGpu("NVIDIA H100 80GB HBM3", 80 * GiB, 0)]
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(gpus, fail_on="memory"))
    with pytest.raises(GpuProbeError, match=r"NVML: Unknown Error \(memory\)"):
        nvidia.probe_nvidia()


# ----------------------------------------------------------------------------- wiring


async def test_each_backend_is_its_own_entry_point_and_failures_are_reported(
    fake_bin: Path,
) -> None:
    pm = plugins.new_plugin_manager()
    assert {"nvidia", "rocm", "vulkan", "metal"} <= {name for name, _ in pm.list_name_plugin()}
    assert "dmr.hardware.nvidia" not in plugins.BUILTIN_PLUGINS
    write_fake_tool(fake_bin, "rocm-smi", stdout="Segmentation fault")
    write_fake_tool(fake_bin, "system_profiler", recorded="system_profiler-m3-pro.json")
    devices, failed = await plugins.probe_hardware_report(pm)
    assert [(f.plugin, f.error) for f in failed] == [
        ("rocm", "GpuProbeError: rocm-smi printed no JSON: 'Segmentation fault'")
    ]
    assert {d.kind for d in devices} >= {"cpu", "metal"}


async def test_a_hanging_tool_is_stopped(tmp_path: Path) -> None:
    hanging = tmp_path / "fake-hanging-tool"
    hanging.write_text("#!/bin/sh\n# FAKE tool that never answers\nexec sleep 60\n")
    hanging.chmod(0o755)
    with pytest.raises(GpuProbeError, match=r"did not answer within 0\.5 s"):
        await run_tool([str(hanging)], limit_seconds=0.5)
