"""`deploy/kubernetes`: every overlay renders, validates against the Kubernetes schemas,
and the pre-pull Job's script pulls models through a real server and registry.

kustomize itself is a Go binary that pip cannot install, so the overlays keep to
what `render` below implements (resources, among them other kustomization folders;
strategic-merge `patches` from files and JSON6902 `replace` patches inline with a
`target`; `images`; a `configMapGenerator` with `files`, creating a ConfigMap or
merging into one a resource made) and it fails on anything else. Where `kubectl` is
on the PATH, its own kustomize renders every folder and must give the same objects.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dmr.distribution import packaging
from dmr.distribution.packaging import PackageOptions
from dmr.store import Store

from tests.fixtures.hf_hub import tiny_gguf
from tests.fixtures.registry import LocalRegistry
from tests.fixtures.server import DmrServer

ROOT = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
OVERLAYS = ["base", "overlays/cpu", "overlays/nvidia"]
# Every folder a user applies (the others are only listed as resources).
DEPLOYMENTS = [*OVERLAYS, "multinode", "raycluster"]
# The one pre-pull script, in the ConfigMap dmr-prepull of every folder above.
PREPULL_SCRIPT = ROOT / "prepull" / "script" / "prepull.py"
# An older supported release and the newest schemas the package ships.
KUBERNETES_VERSIONS = ["1.29", kubernetes_validate.latest_version()]

Manifest = dict[str, Any]
ServerFactory = Callable[..., DmrServer]

# --------------------------------------------------------------------------- renderer

_SUPPORTED = {
    "apiVersion",
    "kind",
    "resources",
    "patches",
    "images",
    "configMapGenerator",
    "generatorOptions",
}


def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge as kustomize does it for the fields used here: maps merge,
    lists of named items (containers, env, volumes) merge by name, others replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    named = isinstance(base, list) and isinstance(patch, list)
    if named and all(isinstance(item, dict) and "name" in item for item in [*base, *patch]):
        merged_list = list(base)
        for item in patch:
            index = next((i for i, b in enumerate(merged_list) if b["name"] == item["name"]), None)
            if index is None:
                merged_list.append(copy.deepcopy(item))
            else:
                merged_list[index] = _merge(merged_list[index], item)
        return merged_list
    return copy.deepcopy(patch)


def _set_images(node: Any, images: list[dict[str, str]]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                name = value.rsplit(":", 1)[0]
                for rule in images:
                    if rule["name"] == name:
                        new_name = rule.get("newName", name)
                        new_tag = rule.get("newTag", value.rsplit(":", 1)[-1])
                        node[key] = f"{new_name}:{new_tag}"
            else:
                _set_images(value, images)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, images)


def _named(manifests: list[Manifest], kind: str, name: str) -> list[Manifest]:
    return [m for m in manifests if (m["kind"], m["metadata"]["name"]) == (kind, name)]


def _generate(directory: Path, kustomization: dict[str, Any], manifests: list[Manifest]) -> None:
    """configMapGenerator: a new ConfigMap, or (`behavior: merge`) files and labels
    added to one that a resource of this kustomization made."""
    options = kustomization.get("generatorOptions", {})
    for generator in kustomization.get("configMapGenerator", []):
        assert options.get("disableNameSuffixHash"), "hashed names need kustomize's rewriting"
        assert set(generator) <= {"name", "files", "behavior"}
        data = {Path(f).name: (directory / f).read_text() for f in generator["files"]}
        labels = dict(options.get("labels", {}))
        found = _named(manifests, "ConfigMap", generator["name"])
        behavior = generator.get("behavior", "create")
        assert behavior in {"create", "merge"}, f"{directory}: behavior {behavior}"
        if behavior == "create":
            assert not found, f"{directory}: a second ConfigMap {generator['name']}"
            metadata = {"name": generator["name"], "labels": labels}
            manifests.append(
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}
            )
        else:
            assert len(found) == 1, f"{directory}: no ConfigMap {generator['name']} to merge into"
            (config,) = found
            config["metadata"]["labels"] = {**config["metadata"].get("labels", {}), **labels}
            config["data"] = {**config["data"], **data}


def _replace(manifest: Manifest, operations: list[dict[str, Any]]) -> None:
    """A JSON6902 patch of `replace` operations on paths of map keys."""
    for operation in operations:
        assert set(operation) == {"op", "path", "value"} and operation["op"] == "replace"
        *parents, last = operation["path"].lstrip("/").split("/")
        node = manifest
        for key in parents:
            node = node[key]
        assert last in node, f"replace of {operation['path']}, which is not there"
        node[last] = copy.deepcopy(operation["value"])


def _patch(directory: Path, entry: dict[str, Any], manifests: list[Manifest]) -> None:
    """A strategic-merge patch file (`path`), or JSON6902 operations inline (`target`
    and `patch`)."""
    if "target" in entry:
        assert set(entry) == {"target", "patch"}, "inline patches need a target, no options"
        assert set(entry["target"]) == {"kind", "name"}
        targets = _named(manifests, entry["target"]["kind"], entry["target"]["name"])
        assert len(targets) == 1, f"{directory}: {entry['target']} matches {len(targets)}"
        _replace(targets[0], yaml.safe_load(entry["patch"]))
        return
    assert set(entry) == {"path"}, "patch files are strategic-merge patches"
    patch = yaml.safe_load((directory / entry["path"]).read_text())
    targets = _named(manifests, patch["kind"], patch["metadata"]["name"])
    assert len(targets) == 1, f"patch {entry['path']} matches {len(targets)} resources"
    index = manifests.index(targets[0])
    manifests[index] = _merge(targets[0], patch)


def render(directory: Path) -> list[Manifest]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - _SUPPORTED
    assert not unknown, f"{directory}: the test renderer does not implement {unknown}"
    manifests: list[Manifest] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            manifests.extend(render(path))
        else:
            manifests.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    # kustomize's order: resources, then generators, then transformers.
    _generate(directory, kustomization, manifests)
    for patch_entry in kustomization.get("patches", []):
        _patch(directory, patch_entry, manifests)
    _set_images(manifests, kustomization.get("images", []))
    return manifests


def by_kind(manifests: list[Manifest], kind: str) -> Manifest:
    (found,) = [m for m in manifests if m["kind"] == kind]
    return found


# --------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_manifest_validates(overlay: str, version: str) -> None:
    manifests = render(ROOT / overlay)
    kinds = sorted(m["kind"] for m in manifests)
    assert kinds == ["ConfigMap", "Deployment", "Job", "PersistentVolumeClaim", "Service"]
    for manifest in manifests:
        # strict: an unknown or misspelt field fails too.
        kubernetes_validate.validate(manifest, version, strict=True)


def test_validation_catches_a_broken_manifest() -> None:
    deployment = by_kind(render(ROOT / "base"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_service_and_prepull_agree(overlay: str) -> None:
    manifests = render(ROOT / overlay)
    deployment, service = by_kind(manifests, "Deployment"), by_kind(manifests, "Service")
    job, config = by_kind(manifests, "Job"), by_kind(manifests, "ConfigMap")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MODEL_RUNNER_PORT"] == "12434"
    assert env["MODEL_RUNNER_BIND"] == "0.0.0.0"
    assert env["MODELS_PATH"] == "/models"
    (port,) = container["ports"]
    assert port["containerPort"] == int(env["MODEL_RUNNER_PORT"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/engines/status", "port": port["name"]}
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == env["MODELS_PATH"]
    (volume,) = pod["spec"]["volumes"]
    pvc = by_kind(manifests, "PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]

    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]

    job_spec = job["spec"]["template"]["spec"]
    (prepull,) = job_spec["containers"]
    job_env = {e["name"]: e.get("value") for e in prepull["env"]}
    assert job_env["DMR_URL"] == f"http://{service['metadata']['name']}:{service_port['port']}"
    (job_volume,) = job_spec["volumes"]
    assert job_volume["configMap"]["name"] == config["metadata"]["name"]
    mount_path = prepull["volumeMounts"][0]["mountPath"]
    assert prepull["command"] == ["python3", f"{mount_path}/prepull.py"]
    assert job_env["DMR_MODELS_FILE"] == f"{mount_path}/models.txt"
    assert "ai/smollm2" in config["data"]["models.txt"].split()


def test_nvidia_overlay_requests_gpus() -> None:
    deployment = by_kind(render(ROOT / "overlays/nvidia"), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"] == "dmr:cuda"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    # The patch merged into the base container rather than replacing it.
    assert container["readinessProbe"]["httpGet"]["path"] == "/engines/status"
    cpu = by_kind(render(ROOT / "overlays/cpu"), "Deployment")
    assert "nvidia.com/gpu" not in str(cpu)


def _sorted(manifests: list[Manifest]) -> list[Manifest]:
    return sorted(manifests, key=lambda m: (m["kind"], m["metadata"]["name"]))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl (kustomize) here")
@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_kustomize_renders_what_the_test_renderer_does(deployment: str) -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    rendered = subprocess.run(
        [kubectl, "kustomize", str(ROOT / deployment)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    theirs = [d for d in yaml.safe_load_all(rendered) if d]
    assert _sorted(theirs) == _sorted(render(ROOT / deployment))


# --------------------------------------------------------------------------- pre-pull


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_every_deployment_mounts_the_one_prepull_script(deployment: str) -> None:
    # The script is written once, in the kustomization prepull/script that each lists.
    assert sorted(ROOT.rglob("prepull.py")) == [PREPULL_SCRIPT]
    config = by_kind(render(ROOT / deployment), "ConfigMap")
    assert config["data"]["prepull.py"] == PREPULL_SCRIPT.read_text()
    # Beside it, the model list of the folder (the overlays': the base's).
    own = ROOT / ("base" if deployment.startswith("overlays/") else deployment)
    assert config["data"]["models.txt"] == (own / "models.txt").read_text()


@pytest.mark.registry
def test_prepull_script_pulls_through_the_server(
    oci_registry: LocalRegistry, dmr_server_factory: ServerFactory, tmp_path: Path
) -> None:
    config = by_kind(render(ROOT / "base"), "ConfigMap")
    server = dmr_server_factory(INSECURE_REGISTRY="true", DMR_API_KEY="prepull-key")
    tags = [f"{oci_registry.host}/tests/prepull-{n}:v1" for n in (1, 2)]
    for tag in tags:
        gguf = tmp_path / f"{tag.rsplit('/', 1)[1]}.gguf"
        gguf.write_bytes(tiny_gguf(tag, 200_000))
        artifact = packaging.package_gguf([gguf], PackageOptions(created="2024-01-01T00:00:00Z"))
        packaging.write_to_store(Store.open(server.models_path), artifact, [tag])
        pushed = server.cli("push", tag)
        assert pushed.returncode == 0, pushed.stderr + pushed.stdout
    with server.client() as client:
        auth = {"Authorization": "Bearer prepull-key"}
        for tag in tags:
            assert client.delete(f"/models/{tag}", headers=auth).status_code == 200
        assert client.get("/models", headers=auth).json() == []

    # The ConfigMap's own script and file format, with this test's model list.
    script = tmp_path / "prepull.py"
    script.write_text(config["data"]["prepull.py"])
    models = tmp_path / "models.txt"
    models.write_text("# pre-pulled in tests\n\n" + "\n".join(tags) + "\n")

    def run_prepull(**extra: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "DMR_API_KEY"}
        env.update(DMR_URL=server.url, DMR_MODELS_FILE=str(models), DMR_WAIT_SECONDS="5")
        env.update(extra)
        return subprocess.run(
            [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
        )

    denied = run_prepull()
    assert denied.returncode == 1 and "HTTP 401" in denied.stderr

    done = run_prepull(DMR_API_KEY="prepull-key")
    assert done.returncode == 0, done.stderr + done.stdout
    with server.client() as client:
        listed = client.get("/models", headers=auth).json()
    assert sorted(tag for model in listed for tag in model["tags"]) == sorted(tags)

    models.write_text(f"{oci_registry.host}/tests/not-there:v1\n")
    missing = run_prepull(DMR_API_KEY="prepull-key")
    assert missing.returncode == 1 and "not-there" in missing.stderr
