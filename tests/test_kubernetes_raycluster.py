"""`deploy/kubernetes/raycluster`: one dmr endpoint over a KubeRay RayCluster,
validated offline (no cluster, no KubeRay operator, no Ray; nothing is started).

- Every object but the RayCluster (PersistentVolumeClaim, Service, ConfigMap, Job)
  validates strictly with `kubernetes-validate` for the Kubernetes versions of
  tests/test_kubernetes.py.
- Each pod template of the RayCluster (the head group's and every worker group's) is
  wrapped into a `v1` `PodTemplate` and validated the same way.
- The RayCluster's own fields are checked with `RAYCLUSTER_SCHEMA` below, a small JSON
  schema distilled from the `v1` openAPIV3Schema of KubeRay's CRD
  (`ray-operator/config/crd/bases/ray.io_rayclusters.yaml` of ray-project/kuberay,
  v1.7.0), plus what the operator itself refuses
  (`ray-operator/controllers/ray/utils/validation.go`: the name a DNS-1035 label of at
  most 53 characters; without the autoscaler, minReplicas and maxReplicas set, not
  negative, min <= max). The CRD (930 kB) cannot be fetched offline and is not
  vendored; the schema covers the fields this deployment uses and leaves the pod specs
  to the PodTemplate validation.
- Behaviour: the head starts a Ray head with no CPUs for runners and `dmr serve
  --ray-address` on that head; every worker joins the head's Ray port (through
  `FQ_RAY_IP`, which KubeRay sets) offering Ray no more than its pod may use, with its
  own node store; one image everywhere; the Service selects the head only, on dmr's
  port; the head serves like the base deployment; the pre-pull Job reaches the head
  through the Service.

Broken copies of the manifests must fail `validate_raycluster`, which shows that each
check can fail. What this cannot show: that KubeRay, Ray and dmr's Ray scheduler
actually run the cluster (docs/deployment.md).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from tests.test_kubernetes import KUBERNETES_VERSIONS, PREPULL_SCRIPT, ROOT, by_kind, render

RAYCLUSTER = ROOT / "raycluster"
RAY_API_VERSION = "ray.io/v1"
OVERWRITE_COMMAND = "ray.io/overwrite-container-cmd"
# KubeRay's defaults when rayStartParams has no `port` (utils.DefaultRedisPort).
DEFAULT_GCS_PORT = 6379
GPU = "nvidia.com/gpu"
# KubeRay probes Ray nodes over HTTP from this Ray version (supportsUnifiedHealthCheck);
# before, with `wget`, which the slim image lacks.
HTTP_PROBES_FROM = (2, 53)

Manifest = dict[str, Any]

# --------------------------------------------------------------------------- schema

_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
_NON_NEGATIVE_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

# The groups' `template`: the CRD's embedded PodTemplateSpec. Its metadata keeps only
# these fields (anything else is pruned by the API server); the pod spec is validated
# as a v1 PodTemplate instead (the CRD requires `containers`).
_POD_TEMPLATE = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "annotations": _STRING_MAP,
                "finalizers": {"type": "array", "items": {"type": "string"}},
                "labels": _STRING_MAP,
                "name": {"type": "string"},
                "namespace": {"type": "string"},
            },
        },
        "spec": {"type": "object", "required": ["containers"]},
    },
}

_HEAD_GROUP = {
    "type": "object",
    "required": ["template"],
    "additionalProperties": False,
    "properties": {
        "enableIngress": {"type": "boolean"},
        "headService": {"type": "object"},
        "ingressOptions": {"type": "object"},
        "labels": _STRING_MAP,
        # Every value a string: `num-cpus: 0` is refused, `num-cpus: "0"` is not.
        "rayStartParams": _STRING_MAP,
        "resources": _STRING_MAP,
        "serviceType": {"type": "string"},
        "template": _POD_TEMPLATE,
    },
}

_WORKER_GROUP = {
    "type": "object",
    "required": ["groupName", "maxReplicas", "minReplicas", "template"],
    "additionalProperties": False,
    "properties": {
        "groupName": {"type": "string", "minLength": 1},
        "idleTimeoutSeconds": _INT32,
        "labels": _STRING_MAP,
        # validation.go: negative minReplicas / maxReplicas are refused.
        "maxReplicas": _NON_NEGATIVE_INT32,
        "minReplicas": _NON_NEGATIVE_INT32,
        "numOfHosts": _INT32,
        "priority": _INT32,
        "rayStartParams": _STRING_MAP,
        "replicas": _INT32,
        "resources": _STRING_MAP,
        "scaleStrategy": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"workersToDelete": {"type": "array", "items": {"type": "string"}}},
        },
        "suspend": {"type": "boolean"},
        "template": _POD_TEMPLATE,
    },
}

RAYCLUSTER_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": RAY_API_VERSION},
        "kind": {"const": "RayCluster"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                # ValidateRayClusterMetadata: a DNS-1035 label, at most 53 characters.
                "name": {
                    "type": "string",
                    "maxLength": 53,
                    "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$",
                },
                "annotations": _STRING_MAP,
                "labels": _STRING_MAP,
            },
        },
        "spec": {
            "type": "object",
            "required": ["headGroupSpec"],
            "additionalProperties": False,
            "properties": {
                "authOptions": {"type": "object"},
                "autoscalerOptions": {"type": "object"},
                "enableInTreeAutoscaling": {"type": "boolean"},
                "gcsFaultToleranceOptions": {"type": "object"},
                "headGroupSpec": _HEAD_GROUP,
                "headServiceAnnotations": _STRING_MAP,
                "historyServerOptions": {"type": "object"},
                "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
                "networkPolicy": {"type": "object"},
                "rayVersion": {"type": "string"},
                "suspend": {"type": "boolean"},
                "tlsOptions": {"type": "object"},
                "upgradeStrategy": {"type": "object"},
                "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
            },
        },
    },
}

# --------------------------------------------------------------------------- validation


class ManifestError(Exception):
    """A rule of the Ray cluster deployment that no schema expresses is broken."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ManifestError(message)


def _groups(cluster: Manifest) -> dict[str, Manifest]:
    """The head group as `head`, each worker group by its name."""
    spec = cluster["spec"]
    return {"head": spec["headGroupSpec"]} | {
        f"worker group {g['groupName']}": g for g in spec.get("workerGroupSpecs", [])
    }


def _as_pod_template(cluster: Manifest, role: str, template: Manifest) -> Manifest:
    name = f"{cluster['metadata']['name']}-{role.replace('worker group ', '')}"
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": name},
        "template": template,
    }


def _containers(template: Manifest) -> list[Manifest]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _env(container: Manifest) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _script(container: Manifest) -> str:
    return " ".join([*container.get("command", []), *container.get("args", [])])


def _flag(name: str, script: str) -> int | None:
    """The number after `--name` (or `--name=`) in `script`; None when absent."""
    found = re.findall(rf"--{name}[= ](\d+)", script)
    _check(len(found) <= 1, f"--{name} is given {len(found)} times")
    return int(found[0]) if found else None


def _quantity(text: str) -> int:
    """A Kubernetes quantity of bytes or CPUs (the suffixes used here) as a number."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", str(text))
    _check(match is not None and match.group(2) in {"", *units}, f"unexpected quantity {text}")
    assert match is not None
    return int(match.group(1)) * units.get(match.group(2), 1)


def _mount(template: Manifest, container: Manifest, path: str) -> Manifest:
    """The volume `container` mounts at `path`."""
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == path]
    _check(len(mounts) == 1, f"{container['name']} mounts no volume at {path}")
    volumes = [v for v in template["spec"]["volumes"] if v["name"] == mounts[0]["name"]]
    _check(len(volumes) == 1, f"{container['name']} mounts a volume the pod lacks")
    return dict(volumes[0])


def _check_operator_rules(cluster: Manifest) -> None:
    """What KubeRay's validation.go refuses beyond the CRD's schema, and what it needs
    to run the containers' own commands and to probe the workers."""
    spec = cluster["spec"]
    if not spec.get("enableInTreeAutoscaling", False):
        for group in spec.get("workerGroupSpecs", []):
            name, low, high = group["groupName"], group["minReplicas"], group["maxReplicas"]
            _check(low <= high, f"worker group {name} has minReplicas {low} > maxReplicas {high}")
            replicas = group.get("replicas", low)
            _check(
                low <= replicas <= high,
                f"worker group {name}: replicas {replicas} not in [{low}, {high}]",
            )
    names = [g["groupName"] for g in spec.get("workerGroupSpecs", [])]
    _check(len(names) == len(set(names)), f"worker group names repeat: {names}")
    _check(
        cluster["metadata"].get("annotations", {}).get(OVERWRITE_COMMAND) == "true",
        "KubeRay would replace the head's command with its own `ray start --block`",
    )
    version = tuple(int(part) for part in spec["rayVersion"].split(".")[:2])
    _check(
        version >= HTTP_PROBES_FROM, f"rayVersion {spec['rayVersion']}: KubeRay probes with wget"
    )


def _check_head(cluster: Manifest, service: Manifest) -> int:
    """The head: a Ray head for no runners, `dmr serve` on it behind the Service.
    Returns the head's Ray port."""
    head_group = cluster["spec"]["headGroupSpec"]
    (server,) = head_group["template"]["spec"]["containers"]
    script, env = _script(server), _env(server)
    heads = re.findall(r"ray start --head --port=(\d+)", script)
    _check(len(heads) == 1, "the head starts no Ray head (or several)")
    port = int(heads[0])
    # KubeRay derives FQ_RAY_IP:port and RAY_ADDRESS from rayStartParams, not the command.
    params_port = int(head_group.get("rayStartParams", {}).get("port", DEFAULT_GCS_PORT))
    _check(
        params_port == port, f"KubeRay tells the workers port {params_port}, the head uses {port}"
    )
    exposed = {p["containerPort"] for p in server["ports"] if p["name"] == "gcs-server"}
    _check(exposed == {port}, f"the head exposes Ray port {exposed}, not {port}")
    ray_start = script[script.index("ray start --head") :].split("\n")[0]
    _check(_flag("num-cpus", ray_start) == 0, "the head offers CPUs: runners would land on it")
    _check("--disable-usage-stats" in ray_start, "the head's Ray sends usage statistics")

    serve = re.findall(r"exec dmr serve (.*)", script)
    _check(len(serve) == 1, "the head does not end by running dmr serve")
    _check(
        f"--ray-address 127.0.0.1:{port}" in serve[0],
        f"dmr serve does not join the head's Ray (127.0.0.1:{port}): {serve[0]}",
    )
    _check("--host 0.0.0.0" in serve[0], "dmr serve does not listen beyond loopback")
    (service_port,) = service["spec"]["ports"]
    (http,) = [p for p in server["ports"] if p["name"] == service_port["targetPort"]]
    serve_port = _flag("port", serve[0])
    _check(
        http["containerPort"]
        == service_port["port"]
        == serve_port
        == int(str(env["MODEL_RUNNER_PORT"])),
        "the Service's port is not dmr serve's",
    )

    # The Service: the head only, by the labels KubeRay sets (and lets no template
    # override); not KubeRay's own head Service name.
    name = cluster["metadata"]["name"]
    selector = service["spec"]["selector"]
    _check(
        selector == {"ray.io/cluster": name, "ray.io/node-type": "head"},
        f"the Service selects {selector}, not the head only",
    )
    _check(service["metadata"]["name"] != f"{name}-head-svc", "Service name taken by KubeRay")
    return port


def _check_worker(role: str, group: Manifest, port: int) -> None:
    """A worker group: joins the head's Ray with what its pods may use, own store."""
    template = group["template"]
    (worker,) = template["spec"]["containers"]
    script = _script(worker)
    joined = re.findall(r"ray start --address=\$\(FQ_RAY_IP\):(\d+) --block", script)
    _check(len(joined) == 1, f"the {role} does not join the head's Ray cluster")
    _check(int(joined[0]) == port, f"the {role} joins Ray port {joined[0]}, not {port}")
    _check("--disable-usage-stats" in script, f"the {role}'s Ray sends usage statistics")
    _check("dmr serve" not in script, f"the {role} runs a second dmr serve")

    # Ray schedules runners by these numbers: none may exceed what the pod gets.
    resources = worker.get("resources", {})
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    cpus = _flag("num-cpus", script)
    _check(
        cpus is not None and cpus == _quantity(requests.get("cpu", "0")),
        f"the {role} offers {cpus} CPUs, its pods request {requests.get('cpu')}",
    )
    memory, store = _flag("memory", script), _flag("object-store-memory", script)
    _check(memory is not None and memory > 0, f"the {role} gives Ray no --memory")
    _check("memory" in limits, f"the {role} has no memory limit")
    assert memory is not None
    _check(
        memory + (store or 0) < _quantity(limits["memory"]),
        f"the {role} offers Ray {memory} + {store} bytes, its limit is {limits['memory']}",
    )
    if store is not None:
        shm = _mount(template, worker, "/dev/shm")
        _check(
            store <= _quantity(shm["emptyDir"]["sizeLimit"]),
            f"the {role}'s object store is larger than its /dev/shm",
        )
    gpus = {kind.get(GPU) for kind in (requests, limits)}
    offered = _flag("num-gpus", script)
    _check(
        gpus == ({None} if offered is None else {str(offered)}),
        f"the {role} offers Ray {offered} GPUs, its pods get {gpus}",
    )

    # Its own node store, on a volume of the pod (not the container's layer).
    node_store = _env(worker).get("DMR_RAY_NODE_STORE")
    _check(bool(node_store), f"the {role} sets no DMR_RAY_NODE_STORE")
    _check(
        "emptyDir" in _mount(template, worker, str(node_store)),
        f"the {role}'s store is not its own",
    )


def check_behaviour(manifests: list[Manifest]) -> None:
    cluster = by_kind(manifests, "RayCluster")
    service, pvc = by_kind(manifests, "Service"), by_kind(manifests, "PersistentVolumeClaim")
    job, config = by_kind(manifests, "Job"), by_kind(manifests, "ConfigMap")
    _check_operator_rules(cluster)
    groups = _groups(cluster)
    _check(len(groups) > 1, "the cluster has no worker group")

    # dmr, its engines, dmr-ray and Ray: one image on every pod (Ray wants the same
    # Ray and Python everywhere); the Job's too, so one image is all that is built.
    templates = [g["template"] for g in groups.values()]
    images = {c.get("image") for t in templates for c in _containers(t)}
    images |= {c.get("image") for c in job["spec"]["template"]["spec"]["containers"]}
    _check(None not in images and "" not in images, "a container has no image")
    _check(len(images) == 1, f"the pods use different images: {sorted(map(str, images))}")

    port = _check_head(cluster, service)
    for role, group in groups.items():
        if role != "head":
            _check_worker(role, group, port)

    # The head's store on the claim; the pre-pull Job fills it through the Service.
    head = groups["head"]["template"]
    (server,) = head["spec"]["containers"]
    models_path = str(_env(server)["MODELS_PATH"])
    store = _mount(head, server, models_path)
    _check(
        store.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"],
        "the head's store is not the PersistentVolumeClaim",
    )
    (prepull,) = job["spec"]["template"]["spec"]["containers"]
    (service_port,) = service["spec"]["ports"]
    _check(
        _env(prepull)["DMR_URL"] == f"http://{service['metadata']['name']}:{service_port['port']}",
        "the pre-pull Job does not reach the head through the Service",
    )
    (volume,) = job["spec"]["template"]["spec"]["volumes"]
    _check(volume["configMap"]["name"] == config["metadata"]["name"], "the Job mounts no list")


def validate_raycluster(manifests: list[Manifest], version: str) -> None:
    """Raise jsonschema.ValidationError, kubernetes_validate.ValidationError or
    ManifestError for the first problem found."""
    cluster = by_kind(manifests, "RayCluster")
    jsonschema.Draft202012Validator(RAYCLUSTER_SCHEMA).validate(cluster)
    for manifest in manifests:
        if manifest is not cluster:
            # strict: an unknown or misspelt field fails too.
            kubernetes_validate.validate(manifest, version, strict=True)
    for role, group in _groups(cluster).items():
        pod_template = _as_pod_template(cluster, role, group["template"])
        kubernetes_validate.validate(pod_template, version, strict=True)
    check_behaviour(manifests)


# --------------------------------------------------------------------------- tests


def test_the_raycluster_schema_is_a_valid_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(RAYCLUSTER_SCHEMA)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates(version: str) -> None:
    manifests = render(RAYCLUSTER)
    kinds = sorted(m["kind"] for m in manifests)
    assert kinds == ["ConfigMap", "Job", "PersistentVolumeClaim", "RayCluster", "Service"]
    validate_raycluster(manifests, version)


def test_the_cluster() -> None:
    cluster = by_kind(render(RAYCLUSTER), "RayCluster")
    assert cluster["apiVersion"] == RAY_API_VERSION
    assert cluster["spec"]["enableInTreeAutoscaling"] is False
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert group["groupName"] == "cpu" and group["replicas"] == 2
    (worker,) = group["template"]["spec"]["containers"]
    assert GPU not in worker["resources"]["limits"]
    (server,) = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert (
        server["args"][-1]
        .strip()
        .endswith("exec dmr serve --host 0.0.0.0 --port 12434 --ray-address 127.0.0.1:6379")
    )
    # The shared store is opt-in: commented out, next to what it needs.
    assert "DMR_RAY_SHARED_STORE" not in _env(server)


def test_the_head_serves_like_the_base_deployment() -> None:
    base = by_kind(render(ROOT / "base"), "Deployment")["spec"]["template"]
    (base_server,) = base["spec"]["containers"]
    head = by_kind(render(RAYCLUSTER), "RayCluster")["spec"]["headGroupSpec"]["template"]
    (server,) = head["spec"]["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert server[probe] == base_server[probe]
    assert _env(server) == _env(base_server)
    assert head["spec"]["securityContext"] == base["spec"]["securityContext"]
    assert base_server["ports"][0] in server["ports"]
    base_pvc = by_kind(render(ROOT / "base"), "PersistentVolumeClaim")
    assert by_kind(render(RAYCLUSTER), "PersistentVolumeClaim") == base_pvc


def test_the_prepull_job_and_script_are_the_base_ones() -> None:
    # Both list the kustomization prepull (its Job, its ConfigMap with prepull.py) and
    # merge their own models.txt into the ConfigMap.
    manifests, base = render(RAYCLUSTER), render(ROOT / "base")
    config, base_config = by_kind(manifests, "ConfigMap"), by_kind(base, "ConfigMap")
    assert config["metadata"] == base_config["metadata"]
    assert config["data"].keys() == base_config["data"].keys() == {"models.txt", "prepull.py"}
    assert config["data"]["prepull.py"] == PREPULL_SCRIPT.read_text()
    assert config["data"]["models.txt"] == (RAYCLUSTER / "models.txt").read_text()
    job = by_kind(manifests, "Job")
    base_job = by_kind(base, "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    container["image"] = "dmr:latest"
    assert job == base_job


def test_the_docs_describe_this_folder() -> None:
    guide = (ROOT.parents[1] / "docs" / "deployment.md").read_text()
    ray_version = by_kind(render(RAYCLUSTER), "RayCluster")["spec"]["rayVersion"]
    assert "deploy/kubernetes/raycluster" in guide
    assert f"ray[default]=={ray_version}" in guide
    for name in ("DMR_RAY_ADDRESS", "DMR_RAY_NODE_STORE", "DMR_RAY_SHARED_STORE"):
        assert name in guide


# --------------------------------------------------------------------------- broken copies

Breakage = Callable[[list[Manifest]], None]


def _cluster(manifests: list[Manifest]) -> Manifest:
    cluster: Manifest = by_kind(manifests, "RayCluster")
    return cluster


def _head(manifests: list[Manifest]) -> Manifest:
    container: Manifest = _cluster(manifests)["spec"]["headGroupSpec"]["template"]["spec"][
        "containers"
    ][0]
    return container


def _worker(manifests: list[Manifest]) -> Manifest:
    container: Manifest = _cluster(manifests)["spec"]["workerGroupSpecs"][0]["template"]["spec"][
        "containers"
    ][0]
    return container


def _set(path: str, value: Any) -> Breakage:
    """Set a dotted path below the RayCluster (list indices as numbers)."""

    def breakage(manifests: list[Manifest]) -> None:
        node: Any = _cluster(manifests)
        *parents, last = path.split(".")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value

    return breakage


def _edit(which: Callable[[list[Manifest]], Manifest], old: str, new: str) -> Breakage:
    """Replace `old` by `new` in a container's script (it must be there)."""

    def breakage(manifests: list[Manifest]) -> None:
        container = which(manifests)
        assert old in container["args"][-1], old
        container["args"][-1] = container["args"][-1].replace(old, new)

    return breakage


def _no_image(manifests: list[Manifest]) -> None:
    del _worker(manifests)["image"]


def _other_worker_image(manifests: list[Manifest]) -> None:
    _worker(manifests)["image"] = "dmr:other"


def _misspelt_pod_field(manifests: list[Manifest]) -> None:
    _worker(manifests)["imagePullPolicyy"] = "Always"


def _service_selects_every_pod(manifests: list[Manifest]) -> None:
    del by_kind(manifests, "Service")["spec"]["selector"]["ray.io/node-type"]


def _service_port_as_text(manifests: list[Manifest]) -> None:
    by_kind(manifests, "Service")["spec"]["ports"][0]["port"] = "12434"


def _worker_gpu_without_num_gpus(manifests: list[Manifest]) -> None:
    resources = _worker(manifests)["resources"]
    resources["requests"][GPU] = resources["limits"][GPU] = "1"


def _no_overwrite(manifests: list[Manifest]) -> None:
    del _cluster(manifests)["metadata"]["annotations"][OVERWRITE_COMMAND]


def _worker_store_in_the_layer(manifests: list[Manifest]) -> None:
    del _worker(manifests)["volumeMounts"][0]


def _job_elsewhere(manifests: list[Manifest]) -> None:
    job = by_kind(manifests, "Job")
    job["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] = "http://dmr-ray:12434"


WORKERS = "spec.workerGroupSpecs.0"
# name: (breakage, the error it must raise, a fragment of its message)
JS, KV = jsonschema.ValidationError, kubernetes_validate.ValidationError
BROKEN: dict[str, tuple[Breakage, type[Exception], str]] = {
    "other API version": (_set("apiVersion", "ray.io/v1alpha1"), JS, "was expected"),
    "name not DNS-1035": (_set("metadata.name", "1dmr"), JS, "does not match"),
    "misspelt spec field": (
        _set("spec.workerGroupSpec", []),
        JS,
        "'workerGroupSpec' was unexpected",
    ),
    "head without template": (
        lambda m: _cluster(m)["spec"]["headGroupSpec"].pop("template"),
        JS,
        "'template' is a required property",
    ),
    "worker without maxReplicas": (
        lambda m: _cluster(m)["spec"]["workerGroupSpecs"][0].pop("maxReplicas"),
        JS,
        "'maxReplicas' is a required property",
    ),
    "negative minReplicas": (_set(f"{WORKERS}.minReplicas", -1), JS, "less than the minimum of 0"),
    "rayStartParams number": (
        _set(f"{WORKERS}.rayStartParams", {"num-cpus": 4}),
        JS,
        "not of type 'string'",
    ),
    "template metadata field": (
        _set(f"{WORKERS}.template.metadata.generateName", "x"),
        JS,
        "'generateName' was unexpected",
    ),
    "worker without containers": (
        _set(f"{WORKERS}.template.spec", {}),
        JS,
        "'containers' is a required property",
    ),
    "misspelt pod field": (_misspelt_pod_field, KV, "'imagePullPolicyy' was unexpected"),
    "containers as text": (
        _set(f"{WORKERS}.template.spec.containers", "ray"),
        KV,
        "'ray' is not of type 'array'",
    ),
    "service port as text": (_service_port_as_text, KV, "'12434' is not of type 'integer'"),
    "min above max": (
        _set(f"{WORKERS}.minReplicas", 9),
        ManifestError,
        "minReplicas 9 > maxReplicas 8",
    ),
    "replicas above max": (
        _set(f"{WORKERS}.replicas", 9),
        ManifestError,
        "replicas 9 not in [1, 8]",
    ),
    "no overwrite annotation": (_no_overwrite, ManifestError, "its own `ray start --block`"),
    "old rayVersion": (_set("spec.rayVersion", "2.46.0"), ManifestError, "probes with wget"),
    "no worker group": (_set("spec.workerGroupSpecs", []), ManifestError, "no worker group"),
    "container without image": (_no_image, ManifestError, "a container has no image"),
    "worker on another image": (_other_worker_image, ManifestError, "different images"),
    "head on another Ray port": (
        _edit(_head, "--port=6379", "--port=6380"),
        ManifestError,
        "KubeRay tells the workers port 6379, the head uses 6380",
    ),
    "head takes runners": (
        _edit(_head, "--num-cpus 0", "--num-cpus 4"),
        ManifestError,
        "offers CPUs",
    ),
    "serve without Ray": (
        _edit(_head, " --ray-address 127.0.0.1:6379", ""),
        ManifestError,
        "does not join the head's Ray",
    ),
    "serve on another port": (
        _edit(_head, "--port 12434", "--port 8080"),
        ManifestError,
        "not dmr serve's",
    ),
    "worker joins another Ray port": (
        _edit(_worker, "$(FQ_RAY_IP):6379", "$(FQ_RAY_IP):6380"),
        ManifestError,
        "joins Ray port 6380",
    ),
    "worker joins no head": (
        _edit(_worker, "--address=$(FQ_RAY_IP):6379", "--address=dmr:6379"),
        ManifestError,
        "does not join the head's Ray cluster",
    ),
    "worker offers more CPUs": (
        _edit(_worker, "--num-cpus 4", "--num-cpus 8"),
        ManifestError,
        "offers 8 CPUs",
    ),
    "worker offers all its memory": (
        _edit(_worker, "--memory 12884901888", "--memory 17179869184"),
        ManifestError,
        "its limit is 16Gi",
    ),
    "object store above /dev/shm": (
        _edit(_worker, "--object-store-memory 1073741824", "--object-store-memory 3221225472"),
        ManifestError,
        "larger than its /dev/shm",
    ),
    "worker GPU not offered to Ray": (
        _worker_gpu_without_num_gpus,
        ManifestError,
        "offers Ray None GPUs",
    ),
    "worker store in the container layer": (
        _worker_store_in_the_layer,
        ManifestError,
        "no volume at /ray-node-store",
    ),
    "service selects the workers too": (
        _service_selects_every_pod,
        ManifestError,
        "not the head only",
    ),
    "job past the Service": (_job_elsewhere, ManifestError, "through the Service"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_a_broken_copy_fails_validation(name: str) -> None:
    breakage, error, message = BROKEN[name]
    manifests = copy.deepcopy(render(RAYCLUSTER))
    breakage(manifests)
    with pytest.raises(error, match=re.escape(message)):
        validate_raycluster(manifests, KUBERNETES_VERSIONS[0])
