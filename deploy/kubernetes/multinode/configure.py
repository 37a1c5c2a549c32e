"""Configure the multi-node model once `dmr serve` answers and every node has joined Ray.

Runs in the leader pod beside `dmr serve` (its container starts it in the
background). It waits for the server at DMR_URL, then for the Ray cluster at the
configuration's `ray-address` to count LWS_GROUP_SIZE live nodes (LWS sets it in
every container) with tensor-parallel-size x pipeline-parallel-size GPUs, and
sends the body of DMR_CONFIGURE_FILE to `POST /engines/vllm/_configure`. Then it
writes DMR_CONFIGURED_MARKER, the file the leader's startupProbe waits for: the
Service sends no request before the model is configured, so none loads it with
vLLM's single-node defaults. On failure it exits 1 without the marker, and the
startupProbe's deadline restarts the group.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

# The server beside this script, not the Service: the Service sends nothing to the
# leader before this script has configured the model. Set before prepull reads it.
os.environ.setdefault("DMR_URL", "http://127.0.0.1:12434")

from dmr_vllm.ray_cluster import RayClusterError, check_cluster

# prepull.py sits beside this script in the ConfigMap (the shared pre-pull script): its
# wait for the server, its JSON POST with the API key and its report of a refusal.
from prepull import post_json, print_refusal, wait_for_server

CONFIGURE_FILE = os.environ.get("DMR_CONFIGURE_FILE", "/multinode/configure.json")
MARKER = os.environ.get("DMR_CONFIGURED_MARKER", "/tmp/dmr-configured")
WAIT_SECONDS = float(os.environ.get("DMR_WAIT_SECONDS", "1800"))
GROUP_SIZE = int(os.environ.get("LWS_GROUP_SIZE", "1"))


def wait_for_ray(address: str, gpus: int, deadline: float) -> None:
    """Until the cluster has the group's nodes and GPUs: the check the runner makes
    before vLLM starts (dmr_vllm.ray_cluster), repeated while the worker joins."""
    while True:
        try:
            shape = check_cluster(address, gpus)
            print(f"ray: {shape.describe()}", flush=True)
            if shape.nodes >= GROUP_SIZE:
                return
            reason = f"{shape.nodes} of {GROUP_SIZE} nodes"
        except RayClusterError as error:
            reason = str(error)
        if time.monotonic() > deadline:
            raise SystemExit(f"the Ray group did not form: {reason}")
        time.sleep(5)


def configure(body: dict[str, Any]) -> bool:
    request = post_json("/engines/vllm/_configure", body)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            print(f"{body['model']}: configured (HTTP {response.status})", flush=True)
            return True
    except urllib.error.HTTPError as error:
        print_refusal(body["model"], error)
        return False


def main() -> int:
    with open(CONFIGURE_FILE, encoding="utf-8") as handle:
        body = json.load(handle)
    vllm = body["vllm"]
    gpus = int(vllm.get("tensor-parallel-size", 1)) * int(vllm.get("pipeline-parallel-size", 1))
    deadline = time.monotonic() + WAIT_SECONDS
    wait_for_server()
    wait_for_ray(vllm["ray-address"], gpus, deadline)
    if not configure(body):
        return 1
    with open(MARKER, "w", encoding="utf-8") as marker:
        marker.write(body["model"] + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
