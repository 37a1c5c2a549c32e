"""Is there a Ray cluster with room for the runner's workers? Asked before vLLM starts.

vLLM's Ray executor, given a cluster with fewer GPUs than its world size, logs a
warning and waits for a placement group that never comes (vLLM 0.32,
`v1/executor/ray_utils.py`: "Avoid immediate rejection to allow user-initiated
placement group created"), and one that finds no cluster at the address retries
for a while. Either way the runner hangs until dmr's start-up timeout. The runner
supervisor (`dmr_vllm.launch`) therefore runs this check first, in a subprocess
with a deadline, and a failing check ends the start with one plain line the
server hands to the client.

`python -m dmr_vllm.ray_cluster --address ADDR --devices N [--resource GPU]`:
exit 0 and a description of the cluster, or exit 3 and why it cannot serve.
Needs the `ray` package (`pip install 'dmr-vllm[ray]'`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CHECK_TIMEOUT_S",
    "ClusterShape",
    "RayClusterError",
    "check_cluster",
    "check_in_subprocess",
    "main",
    "shape_of",
]

# Connecting to a live cluster takes 2-5 s on a loaded 2-core machine; a dead
# address is retried by Ray for longer than that.
CHECK_TIMEOUT_S = 60.0
EXIT_REFUSED = 3


class RayClusterError(Exception):
    """The cluster is missing or too small for the runner; the message says which."""


@dataclass(frozen=True)
class ClusterShape:
    """The live nodes of a cluster and how much of `resource` they offer together."""

    nodes: int
    devices: float
    resource: str

    def describe(self) -> str:
        noun = "node" if self.nodes == 1 else "nodes"
        return f"{self.nodes} live {noun} with {self.devices:g} {self.resource} in all"


def shape_of(nodes: Sequence[dict[str, Any]], resource: str) -> ClusterShape:
    """The shape of `ray.nodes()`'s answer: dead nodes (a stopped worker) do not count."""
    alive = [node for node in nodes if node.get("Alive")]
    devices = sum(float((node.get("Resources") or {}).get(resource, 0)) for node in alive)
    return ClusterShape(nodes=len(alive), devices=devices, resource=resource)


def check_cluster(address: str, devices: float, resource: str = "GPU") -> ClusterShape:
    """Connect to the cluster at `address` and check it offers `devices` of `resource`.

    Raises RayClusterError when no cluster answers or it is too small.
    """
    try:
        import ray
    except ImportError:
        raise RayClusterError(
            "the ray executor needs the ray package on this machine (pip install 'dmr-vllm[ray]')"
        ) from None
    try:
        # Ray prints its connection banner on stdout/stderr; the caller wants one line.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise RayClusterError(
            f"no Ray cluster answers at {address} ({first_line}); start one with "
            "`ray start --head` and join the other nodes with `ray start --address=...`"
        ) from None
    try:
        shape = shape_of(ray.nodes(), resource)  # type: ignore[no-untyped-call]
    finally:
        ray.shutdown()
    if shape.devices < devices:
        raise RayClusterError(
            f"the Ray cluster at {address} has {shape.describe()}; this model's vLLM "
            f"workers need {devices:g} {resource} (tensor-parallel-size x "
            "pipeline-parallel-size): add nodes or lower the sizes"
        )
    return shape


def check_in_subprocess(
    address: str, devices: float, resource: str = "GPU", timeout: float = CHECK_TIMEOUT_S
) -> str:
    """`check_cluster` in a child interpreter, killed after `timeout` seconds: Ray's
    own retries must not hold the runner's start-up. The cluster's description."""
    command = [
        sys.executable,
        "-m",
        "dmr_vllm.ray_cluster",
        "--address",
        address,
        "--devices",
        f"{devices:g}",
        "--resource",
        resource,
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RayClusterError(
            f"no Ray cluster answered at {address} within {timeout:g} s"
        ) from None
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    message = lines[-1] if lines else done.stderr.strip()[-500:]
    if done.returncode != 0:
        raise RayClusterError(message or f"the Ray check exited with code {done.returncode}")
    return message


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dmr_vllm.ray_cluster")
    parser.add_argument("--address", required=True)
    parser.add_argument("--devices", type=float, required=True)
    parser.add_argument("--resource", default="GPU")
    args = parser.parse_args(argv)
    try:
        shape = check_cluster(args.address, args.devices, args.resource)
    except RayClusterError as error:
        print(error, flush=True)
        return EXIT_REFUSED
    print(f"the Ray cluster at {args.address} has {shape.describe()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
