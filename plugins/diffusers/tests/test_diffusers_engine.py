"""The engine side (runs in `dmr serve`): registration, status, command line, estimate."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import pytest
from diffusers_helpers import CPU, GPU, make_launch
from dmr.plugins import engines
from dmr.records import EngineState, Mode
from dmr_diffusers import engine as engine_module
from dmr_diffusers.bundle import find_diffusers_bundle
from dmr_diffusers.engine import MARGIN_FLOOR_BYTES, DiffusersEngine

pytestmark = pytest.mark.diffusers


def test_plugin_registers_the_engine() -> None:
    spec = next(spec for spec in engines() if spec.name == "diffusers")
    assert spec.formats == frozenset({"dduf", "diffusers"})
    assert spec.modes == frozenset({Mode.IMAGE_GENERATION})
    status = spec.engine.status()
    assert status.state is EngineState.RUNNING
    assert status.render().startswith("Running: diffusers ")


@pytest.mark.parametrize("missing", ["diffusers", "torch"])
def test_status_not_installed_without_diffusers_or_torch(
    missing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = engine_module.version

    def version(name: str) -> str:
        if name == missing:
            raise PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(engine_module, "version", version)
    status = DiffusersEngine().status()
    assert status.state is EngineState.NOT_INSTALLED
    assert missing in status.details


def test_server_side_never_imports_torch_or_diffusers(dir_bundle: Path) -> None:
    code = (
        "import sys; from pathlib import Path\n"
        "from dmr.plugins import engines\n"
        "from dmr_diffusers.engine import DiffusersEngine\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from diffusers_helpers import make_launch\n"
        f"launch = make_launch(Path({str(dir_bundle)!r}), Path('/tmp/x/runner.sock'))\n"
        "engines(); e = DiffusersEngine(); e.status(); e.runner_command(launch)\n"
        "e.estimate_memory(launch)\n"
        "leaked = {'torch', 'diffusers', 'transformers'} & set(sys.modules)\n"
        "assert not leaked, leaked\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_runner_command_for_a_diffusers_directory(dir_bundle: Path, tmp_path: Path) -> None:
    command = DiffusersEngine().runner_command(make_launch(dir_bundle, tmp_path / "r.sock"))
    argv = list(command.argv)
    assert argv[:3] == [sys.executable, "-m", "dmr_diffusers.runner"]
    assert argv[argv.index("--model") + 1] == str(dir_bundle / "model")
    assert argv[argv.index("--socket") + 1] == str(tmp_path / "r.sock")
    assert argv[argv.index("--device") + 1] == "cpu"
    assert argv[argv.index("--served-model-name") + 1] == "ai/tiny-sd:latest"
    assert argv[argv.index("--work-dir") + 1] == str(tmp_path)
    assert command.env["HF_HUB_OFFLINE"] == "1"
    assert command.cpu_share  # on the CPU it takes its share of the cores


def test_runner_command_for_a_dduf_on_a_gpu(dduf_bundle: Path, tmp_path: Path) -> None:
    launch = make_launch(dduf_bundle, tmp_path / "r.sock", device=GPU)
    command = DiffusersEngine().runner_command(launch)
    argv = list(command.argv)
    assert argv[argv.index("--model") + 1] == str(dduf_bundle / "model" / "model.dduf")
    assert argv[argv.index("--device") + 1] == "cuda:1"
    assert not command.cpu_share  # the GPU computes


def test_runner_command_refuses_other_modes_and_flags(dir_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot serve mode 'completion'"):
        DiffusersEngine().runner_command(
            make_launch(dir_bundle, tmp_path / "r.sock", mode=Mode.COMPLETION)
        )
    with pytest.raises(ValueError, match="no runtime flags"):
        DiffusersEngine().runner_command(
            make_launch(dir_bundle, tmp_path / "r.sock", runtime_flags=("--steps", "4"))
        )


def test_runner_command_without_a_pipeline_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"no diffusers pipeline"):
        DiffusersEngine().runner_command(make_launch(tmp_path, tmp_path / "r.sock"))


def test_estimate_is_weight_files_plus_a_margin(
    dir_bundle: Path, dduf_bundle: Path, tiny_diffusers_dir: Path, tiny_diffusers_dduf: Path
) -> None:
    weights = sum(path.stat().st_size for path in tiny_diffusers_dir.rglob("*.safetensors"))
    configs = sum(path.stat().st_size for path in tiny_diffusers_dir.rglob("*.json"))
    assert configs > 0  # present, and not counted as weights
    estimate = DiffusersEngine().estimate_memory(make_launch(dir_bundle, Path("/x/r.sock")))
    assert estimate.device_bytes == weights + MARGIN_FLOOR_BYTES
    assert estimate.host_bytes == 0
    dduf = DiffusersEngine().estimate_memory(
        make_launch(dduf_bundle, Path("/x/r.sock"), device=CPU)
    )
    assert dduf.device_bytes == tiny_diffusers_dduf.stat().st_size + MARGIN_FLOOR_BYTES


def test_large_pipelines_get_a_proportional_margin(tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    with weights.open("wb") as handle:  # sparse: 8 GiB on paper, nothing on disk
        handle.truncate(8 << 30)
    estimate = DiffusersEngine().estimate_memory(make_launch(tmp_path, tmp_path / "r.sock"))
    assert estimate.device_bytes == (8 << 30) + (2 << 30)


def test_bundle_finds_either_layout(dir_bundle: Path, dduf_bundle: Path) -> None:
    assert find_diffusers_bundle(dir_bundle).is_dduf is False
    found = find_diffusers_bundle(dduf_bundle)
    assert found.is_dduf and found.path.name == "model.dduf"
    assert find_diffusers_bundle(found.path) == found
