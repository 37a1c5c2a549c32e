"""The Ray cluster check before a vLLM runner starts, against a real two-node Ray cluster.

A head and a second node, each its own `ray start` on 127.0.0.1, as on two machines.
No GPU exists here: each node declares one `GPU` resource (`--num-gpus 1`), a fake
named as such, which is all the check reads; vLLM itself is never started (its CPU
build refuses the Ray executor, see test_vllm_e2e.py).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

# Found, not imported: Ray runs only in the check's child processes, never in pytest's.
if importlib.util.find_spec("ray") is None:
    pytest.skip("the Ray check needs dmr-vllm[ray]", allow_module_level=True)

from dmr.testing import free_port
from dmr_vllm import launch
from dmr_vllm.ray_cluster import RayClusterError, check_in_subprocess, shape_of

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

RAY_ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}


@dataclass
class LocalCluster:
    address: str
    temp_dir: Path

    def raylets(self) -> list[psutil.Process]:
        """The cluster's raylets (one per node), the head's first."""
        found = []
        for process in psutil.process_iter(["cmdline"]):
            cmdline = process.info["cmdline"] or []
            if (
                cmdline
                and cmdline[0].endswith("raylet")
                and any(str(self.temp_dir) in part for part in cmdline)
            ):
                found.append(process)
        # The head's socket is `raylet`, the second node's `raylet.1`.
        return sorted(found, key=lambda p: any("raylet.1" in part for part in p.cmdline()))


def _ray(*args: str) -> subprocess.CompletedProcess[str]:
    ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    return subprocess.run(
        [ray, *args], capture_output=True, text=True, env=RAY_ENV, timeout=180, check=False
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    # Short: Ray's socket paths live under it and must stay below 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="dmr-ray-"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus", "1", "--num-gpus", "1", "--disable-usage-stats"]
    try:
        head = _ray(
            "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
            "--include-dashboard", "false", "--temp-dir", str(temp_dir), *common,
        )  # fmt: skip
        assert head.returncode == 0, head.stdout + head.stderr
        worker = _ray(
            "start", "--address", address, "--node-ip-address", "127.0.0.1", *common,
        )  # fmt: skip
        assert worker.returncode == 0, worker.stdout + worker.stderr
        yield LocalCluster(address, temp_dir)
    finally:
        _ray("stop", "--force")
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_shape_counts_only_live_nodes() -> None:
    nodes = [
        {"Alive": True, "Resources": {"GPU": 2.0, "CPU": 8.0}},
        {"Alive": False, "Resources": {"GPU": 2.0}},
        {"Alive": True, "Resources": {"CPU": 4.0}},
    ]
    shape = shape_of(nodes, "GPU")
    assert (shape.nodes, shape.devices) == (2, 2.0)
    assert shape.describe() == "2 live nodes with 2 GPU in all"


def test_two_nodes_serve_a_two_stage_model(cluster: LocalCluster) -> None:
    described = check_in_subprocess(cluster.address, 2)
    assert described == f"the Ray cluster at {cluster.address} has 2 live nodes with 2 GPU in all"


def test_too_few_devices_is_a_clear_error_and_vllm_never_starts(
    cluster: LocalCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(RayClusterError, match=r"has 2 live nodes with 2 GPU in all; .* need 3 GPU"):
        check_in_subprocess(cluster.address, 3)
    # The runner's supervisor stops before vLLM: its would-be server module writes a file.
    marker = tmp_path / "started"
    module = tmp_path / "fake_vllm_server.py"
    module.write_text(f"open({str(marker)!r}, 'w').close()\n")
    sys.path.insert(0, str(tmp_path))
    try:
        argv = ["--ray-address", cluster.address, "--ray-devices", "3", "--"]
        assert launch.main(argv, module="fake_vllm_server") == launch.EXIT_NO_CLUSTER
    finally:
        sys.path.remove(str(tmp_path))
    assert "dmr: cannot start vLLM on Ray: the Ray cluster" in capsys.readouterr().out
    assert not marker.exists()


def test_no_cluster_at_the_address_fails_within_the_deadline() -> None:
    started = time.monotonic()
    with pytest.raises(RayClusterError, match="no Ray cluster answer"):
        check_in_subprocess(f"127.0.0.1:{free_port()}", 1, timeout=20)
    assert time.monotonic() - started < 40


def test_a_lost_node_is_seen(cluster: LocalCluster) -> None:
    """Last in the module: it kills the second node, as a machine that goes away."""
    raylets = cluster.raylets()
    assert len(raylets) == 2, raylets
    second = raylets[1]
    for process in [*second.children(recursive=True), second]:
        process.kill()
    # Ray marks a node dead after its missed health checks (about 10 s here).
    deadline = time.monotonic() + 90
    while True:
        try:
            check_in_subprocess(cluster.address, 2)
        except RayClusterError as error:
            assert "has 1 live node with 1 GPU in all" in str(error)
            break
        assert time.monotonic() < deadline, "the lost node was never noticed"
        time.sleep(2)
