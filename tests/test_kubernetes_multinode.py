"""`deploy/kubernetes/multinode`: vLLM across two nodes with Ray on a LeaderWorkerSet,
validated offline (no cluster, no LWS operator, no GPU; nothing is started).

- Every object but the LeaderWorkerSet (Service, ConfigMap) validates strictly with
  `kubernetes-validate` for the Kubernetes versions of tests/test_kubernetes.py.
- Each pod template of the LeaderWorkerSet (`leaderTemplate`, `workerTemplate`) is
  wrapped into a `v1` `PodTemplate` and validated the same way.
- The LeaderWorkerSet's own fields are checked with `LWS_SCHEMA` below, a small JSON
  schema distilled from the `v1` openAPIV3Schema of the LWS CRD
  (`config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml` of
  kubernetes-sigs/lws, API version `leaderworkerset.x-k8s.io/v1`), plus the minimums
  LWS's validating webhook adds (`pkg/webhooks/leaderworkerset_webhook.go`: size at
  least 1, replicas at least 0). The CRD itself (1.2 MB) cannot be fetched offline and
  is not vendored; the schema covers the fields this deployment uses and leaves the
  pod specs to the PodTemplate validation.
- Behaviour: the worker joins the leader's Ray port, pipeline-parallel-size equals the
  group size, tensor-parallel-size equals each pod's GPUs, the Service selects the
  leader only, leader and worker share image, store path and model list.
- The ConfigMap's `configure.py`, run in-process with a fake `ray` module and a fake
  `urlopen` for `dmr serve`: it waits for the second node and its GPU, posts
  `configure.json` to `/engines/vllm/_configure` and writes the startupProbe's marker,
  and writes none when the server refuses the configuration.

Broken copies of the manifests must fail `validate_multinode`, which shows that each
check can fail. What this cannot show: that the LWS operator, Ray and vLLM actually
run the group (docs/deployment.md).
"""

from __future__ import annotations

import copy
import io
import json
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from email.message import Message
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from tests.test_kubernetes import KUBERNETES_VERSIONS, PREPULL_SCRIPT, ROOT, by_kind, render

MULTINODE = ROOT / "multinode"
LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
LWS_WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
GPU = "nvidia.com/gpu"

Manifest = dict[str, Any]

# --------------------------------------------------------------------------- LWS schema

_INT32_MAX = 2**31 - 1
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

# leaderTemplate / workerTemplate: the CRD's embedded PodTemplateSpec. Its metadata
# keeps only these fields (anything else is pruned by the API server); the pod spec is
# validated as a v1 PodTemplate instead (the CRD requires `containers`).
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

LWS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": LWS_API_VERSION},
        "kind": {"const": "LeaderWorkerSet"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["leaderWorkerTemplate"],
            "additionalProperties": False,
            "properties": {
                "replicas": {"type": "integer", "minimum": 0, "maximum": _INT32_MAX},
                "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
                "networkConfig": {
                    "type": "object",
                    "required": ["subdomainPolicy"],
                    "additionalProperties": False,
                    "properties": {"subdomainPolicy": {"type": "string"}},
                },
                "rolloutStrategy": {
                    "type": "object",
                    "required": ["type"],
                    "additionalProperties": False,
                    "properties": {
                        "type": {"enum": ["RollingUpdate"]},
                        "rollingUpdateConfiguration": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "maxSurge": {"type": ["integer", "string"]},
                                "maxUnavailable": {"type": ["integer", "string"]},
                            },
                        },
                    },
                },
                "leaderWorkerTemplate": {
                    "type": "object",
                    "required": ["workerTemplate"],
                    "additionalProperties": False,
                    "properties": {
                        "size": {"type": "integer", "minimum": 1, "maximum": _INT32_MAX},
                        "restartPolicy": {"enum": ["Default", "RecreateGroupOnPodRestart"]},
                        "subGroupPolicy": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "subGroupSize": {"type": "integer", "maximum": _INT32_MAX}
                            },
                        },
                        "leaderTemplate": _POD_TEMPLATE,
                        "workerTemplate": _POD_TEMPLATE,
                    },
                },
            },
        },
    },
}

# --------------------------------------------------------------------------- validation


class ManifestError(Exception):
    """A rule of the multi-node deployment that no schema expresses is broken."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ManifestError(message)


def _templates(lws: Manifest) -> dict[str, Manifest]:
    group = lws["spec"]["leaderWorkerTemplate"]
    return {"leader": group["leaderTemplate"], "worker": group["workerTemplate"]}


def _as_pod_template(lws: Manifest, role: str, template: Manifest) -> Manifest:
    metadata = {"name": f"{lws['metadata']['name']}-{role}"}
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": metadata, "template": template}


def _containers(template: Manifest) -> list[Manifest]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _env(container: Manifest) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _script(container: Manifest) -> str:
    return " ".join([*container.get("command", []), *container.get("args", [])])


def _ports(pattern: str, text: str) -> set[int]:
    return {int(port) for port in re.findall(pattern, text)}


def _mount(template: Manifest, container: Manifest, path: str) -> Manifest:
    """The volume `container` mounts at `path`."""
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == path]
    _check(len(mounts) == 1, f"{container['name']} mounts no volume at {path}")
    volumes = [v for v in template["spec"]["volumes"] if v["name"] == mounts[0]["name"]]
    _check(len(volumes) == 1, f"{container['name']} mounts a volume the pod lacks")
    return dict(volumes[0])


def check_behaviour(manifests: list[Manifest]) -> None:
    lws = by_kind(manifests, "LeaderWorkerSet")
    service, config = by_kind(manifests, "Service"), by_kind(manifests, "ConfigMap")
    group = lws["spec"]["leaderWorkerTemplate"]
    templates = _templates(lws)
    leader, worker = templates["leader"], templates["worker"]
    (server,) = leader["spec"]["containers"]
    (ray_worker,) = worker["spec"]["containers"]
    body = json.loads(config["data"]["configure.json"])
    vllm = body["vllm"]

    # Every container names an image (optional in the Pod schema), all the same one.
    images = {c.get("image") for t in templates.values() for c in _containers(t)}
    _check(None not in images and "" not in images, "a container has no image")
    _check(len(images) == 1, f"leader and worker use different images: {sorted(map(str, images))}")

    # Ray: the leader's head port is what the worker joins and what vLLM is told.
    head = _ports(r"ray start --head --port=(\d+)", _script(server))
    _check(len(head) == 1, "the leader starts no Ray head (or several)")
    joined = _ports(
        r"ray start --address=\$\(LWS_LEADER_ADDRESS\):(\d+) --block", _script(ray_worker)
    )
    _check(len(joined) == 1, "the worker does not join the leader's Ray cluster")
    waited = _ports(r'"\$\(LWS_LEADER_ADDRESS\)" (\d+)', _script(ray_worker))
    _check(joined | waited == head, f"the worker joins Ray port {joined | waited}, not {head}")
    exposed = {p["containerPort"] for p in server["ports"] if p["name"] == "ray"}
    _check(exposed == head, f"the leader exposes Ray port {exposed}, not {head}")
    _check(vllm["distributed-executor-backend"] == "ray", "vLLM does not use the Ray executor")
    _check(
        vllm["ray-address"] == f"127.0.0.1:{min(head)}",
        f"vLLM's ray-address {vllm['ray-address']} is not the leader's Ray head",
    )

    # One pipeline stage per pod of the group; each stage over one pod's GPUs.
    _check(
        vllm["pipeline-parallel-size"] == group["size"],
        f"pipeline-parallel-size {vllm['pipeline-parallel-size']} != size {group['size']}",
    )
    for role, container in (("leader", server), ("worker", ray_worker)):
        resources = container.get("resources", {})
        gpus = {resources.get(kind, {}).get(GPU) for kind in ("requests", "limits")}
        _check(
            gpus == {str(vllm["tensor-parallel-size"])},
            f"the {role} requests {gpus} GPUs, tensor-parallel-size is "
            f"{vllm['tensor-parallel-size']}",
        )

    # The same store path, model list and pull in both pods, so the model's bundle has
    # the same path on both nodes.
    models_path = _env(server)["MODELS_PATH"]
    pulls = [
        c
        for t in templates.values()
        for c in t["spec"].get("initContainers", [])
        if c["name"] == "pull"
    ]
    _check(len(pulls) == 2, "leader and worker do not both pull the models first")
    _check(pulls[0] == pulls[1], "leader and worker pull differently")
    for (role, template), pull in zip(templates.items(), pulls, strict=True):
        for container in (pull, *template["spec"]["containers"]):
            _check(
                _env(container).get("MODELS_PATH") == models_path,
                f"the {role}'s {container['name']} has another MODELS_PATH",
            )
            store = _mount(template, container, str(models_path))
            _check("emptyDir" in store, f"the {role}'s store is not its own emptyDir")
            listed = _mount(template, container, "/multinode")
            _check(
                listed["configMap"]["name"] == config["metadata"]["name"],
                f"the {role} does not mount the {config['metadata']['name']} ConfigMap",
            )
    pull_env = _env(pulls[0])
    models = [
        line.strip()
        for line in config["data"]["models.txt"].splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    _check(pull_env["DMR_MODELS_FILE"] == "/multinode/models.txt", "the pull reads another list")
    _check(body["model"] in models, f"{body['model']} is configured but not pulled")

    # The configuration is posted by the leader, which is ready only once it is.
    server_env = _env(server)
    _check(server_env["DMR_CONFIGURE_FILE"] == "/multinode/configure.json", "no configuration")
    _check("python3 /multinode/configure.py &" in _script(server), "configure.py is not started")
    marker = server_env["DMR_CONFIGURED_MARKER"]
    _check(
        server["startupProbe"]["exec"]["command"] == ["test", "-f", marker],
        "the startupProbe does not wait for the configuration",
    )

    # The Service: the leader only, on dmr's port; not the name LWS gives its headless one.
    selector = service["spec"]["selector"]
    _check(
        selector == {LWS_NAME_LABEL: lws["metadata"]["name"], LWS_WORKER_INDEX_LABEL: "0"},
        f"the Service selects {selector}, not the leader only",
    )
    _check(service["metadata"]["name"] != lws["metadata"]["name"], "Service name taken by LWS")
    (service_port,) = service["spec"]["ports"]
    (http,) = [p for p in server["ports"] if p["name"] == service_port["targetPort"]]
    _check(
        http["containerPort"] == service_port["port"] == int(str(server_env["MODEL_RUNNER_PORT"])),
        "the Service's port is not dmr's",
    )


def validate_multinode(manifests: list[Manifest], version: str) -> None:
    """Raise jsonschema.ValidationError, kubernetes_validate.ValidationError or
    ManifestError for the first problem found."""
    lws = by_kind(manifests, "LeaderWorkerSet")
    jsonschema.Draft202012Validator(LWS_SCHEMA).validate(lws)
    for manifest in manifests:
        if manifest is not lws:
            # strict: an unknown or misspelt field fails too.
            kubernetes_validate.validate(manifest, version, strict=True)
    for role, template in _templates(lws).items():
        kubernetes_validate.validate(_as_pod_template(lws, role, template), version, strict=True)
    check_behaviour(manifests)


# --------------------------------------------------------------------------- tests


def test_the_lws_schema_is_a_valid_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(LWS_SCHEMA)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates(version: str) -> None:
    manifests = render(MULTINODE)
    assert sorted(m["kind"] for m in manifests) == ["ConfigMap", "LeaderWorkerSet", "Service"]
    validate_multinode(manifests, version)


def test_the_group() -> None:
    lws = by_kind(render(MULTINODE), "LeaderWorkerSet")
    assert lws["apiVersion"] == LWS_API_VERSION
    assert lws["spec"]["replicas"] == 1
    assert lws["spec"]["startupPolicy"] == "LeaderCreated"
    group = lws["spec"]["leaderWorkerTemplate"]
    assert group["size"] == 2
    assert group["restartPolicy"] == "RecreateGroupOnPodRestart"
    config = json.loads(by_kind(render(MULTINODE), "ConfigMap")["data"]["configure.json"])
    assert config["vllm"] == {
        "tensor-parallel-size": 1,
        "pipeline-parallel-size": 2,
        "distributed-executor-backend": "ray",
        "ray-address": "127.0.0.1:6379",
    }


def test_the_leader_serves_like_the_base_deployment() -> None:
    base = by_kind(render(ROOT / "base"), "Deployment")["spec"]["template"]
    (base_server,) = base["spec"]["containers"]
    leader = _templates(by_kind(render(MULTINODE), "LeaderWorkerSet"))["leader"]
    (server,) = leader["spec"]["containers"]
    assert server["args"][-1].strip().endswith("exec dmr serve")
    for probe in ("readinessProbe", "livenessProbe"):
        assert server[probe] == base_server[probe]
    env, base_env = _env(server), _env(base_server)
    for name in ("MODEL_RUNNER_PORT", "MODEL_RUNNER_BIND", "MODELS_PATH"):
        assert env[name] == base_env[name]
    assert leader["spec"]["securityContext"] == base["spec"]["securityContext"]
    assert base_server["ports"][0] in server["ports"]


def test_the_configmap_holds_the_shared_prepull_script() -> None:
    # prepull/script's ConfigMap with this folder's files merged in, renamed.
    config = by_kind(render(MULTINODE), "ConfigMap")
    assert config["metadata"]["name"] == "dmr-multinode"
    keys = ["configure.json", "configure.py", "models.txt", "prepull.py"]
    assert sorted(config["data"]) == keys
    assert config["data"]["prepull.py"] == PREPULL_SCRIPT.read_text()
    assert not (MULTINODE / "prepull.py").exists()


class _FakeRay:
    """`ray` for configure.py: the worker node and its GPU appear on the third poll."""

    def __init__(self) -> None:
        self.polls = 0
        self.address: str | None = None

    def init(self, address: str, **_: Any) -> None:
        self.address = address

    def nodes(self) -> list[dict[str, Any]]:
        self.polls += 1
        node = {"Alive": True, "Resources": {"GPU": 1.0}}
        return [node] * (2 if self.polls >= 3 else 1) + [{"Alive": False}]

    def shutdown(self) -> None:
        pass


class _Answer:
    status = 202

    def __enter__(self) -> _Answer:
        return self

    def __exit__(self, *_: object) -> None:
        pass


def _load_configure(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, refuse: bool = False
) -> tuple[ModuleType, _FakeRay, list[urllib.request.Request | str]]:
    """configure.py from the ConfigMap, with a fake Ray and a fake `dmr serve`."""
    config = by_kind(render(MULTINODE), "ConfigMap")["data"]
    (tmp_path / "configure.json").write_text(config["configure.json"])
    monkeypatch.setenv("DMR_CONFIGURE_FILE", str(tmp_path / "configure.json"))
    monkeypatch.setenv("DMR_CONFIGURED_MARKER", str(tmp_path / "configured"))
    monkeypatch.setenv("DMR_WAIT_SECONDS", "60")
    monkeypatch.setenv("LWS_GROUP_SIZE", "2")
    ray = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", ray)
    sent: list[urllib.request.Request | str] = []

    def urlopen(request: urllib.request.Request | str, timeout: float | None = None) -> _Answer:
        sent.append(request)
        if isinstance(request, urllib.request.Request) and refuse:
            body = io.BytesIO(b'{"error": "unknown vllm option"}')
            raise urllib.error.HTTPError(request.full_url, 400, "Bad Request", Message(), body)
        return _Answer()

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(time, "sleep", lambda _: None)
    # configure.py imports prepull.py from its own folder, as in the pod.
    (tmp_path / "prepull.py").write_text(config["prepull.py"])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "prepull", raising=False)
    monkeypatch.delenv("DMR_URL", raising=False)
    module = ModuleType("configure")
    exec(compile(config["configure.py"], "configure.py", "exec"), module.__dict__)
    return module, ray, sent


def test_configure_script_waits_for_the_group_then_posts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    module, ray, sent = _load_configure(monkeypatch, tmp_path)
    assert module.main() == 0
    assert ray.address == "127.0.0.1:6379" and ray.polls == 3
    assert sent[0] == "http://127.0.0.1:12434/"
    (request,) = [r for r in sent if isinstance(r, urllib.request.Request)]
    assert request.full_url == "http://127.0.0.1:12434/engines/vllm/_configure"
    assert request.get_method() == "POST"
    assert isinstance(request.data, bytes)
    assert json.loads(request.data) == json.loads((tmp_path / "configure.json").read_text())
    assert (tmp_path / "configured").read_text() == "ai/smollm2-vllm\n"


def test_configure_script_leaves_no_marker_when_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module, _, _ = _load_configure(monkeypatch, tmp_path, refuse=True)
    assert module.main() == 1
    assert not (tmp_path / "configured").exists()
    # The refusal as prepull.py reports one: the model, the status and the answer.
    refusal = 'ai/smollm2-vllm: HTTP 400 {"error": "unknown vllm option"}'
    assert refusal in capsys.readouterr().err


# --------------------------------------------------------------------------- broken copies

Breakage = Callable[[list[Manifest]], None]


def _group(manifests: list[Manifest]) -> Manifest:
    group: Manifest = by_kind(manifests, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    return group


def _leader(manifests: list[Manifest]) -> Manifest:
    container: Manifest = _group(manifests)["leaderTemplate"]["spec"]["containers"][0]
    return container


def _worker(manifests: list[Manifest]) -> Manifest:
    container: Manifest = _group(manifests)["workerTemplate"]["spec"]["containers"][0]
    return container


def _configure(key: str, value: Any) -> Breakage:
    """Set a key of the vllm block in configure.json."""

    def breakage(manifests: list[Manifest]) -> None:
        config = by_kind(manifests, "ConfigMap")
        body = json.loads(config["data"]["configure.json"])
        body["vllm"][key] = value
        config["data"]["configure.json"] = json.dumps(body)

    return breakage


def _set(path: str, value: Any) -> Breakage:
    """Set a dotted path below the LeaderWorkerSet (list indices as numbers)."""

    def breakage(manifests: list[Manifest]) -> None:
        node: Any = by_kind(manifests, "LeaderWorkerSet")
        *parents, last = path.split(".")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value

    return breakage


def _worker_port(manifests: list[Manifest]) -> None:
    worker = _worker(manifests)
    worker["args"] = [arg.replace(":6379", ":6380") for arg in worker["args"]]


def _no_image(manifests: list[Manifest]) -> None:
    del _worker(manifests)["image"]


def _other_worker_image(manifests: list[Manifest]) -> None:
    _worker(manifests)["image"] = "dmr:other"


def _worker_store_elsewhere(manifests: list[Manifest]) -> None:
    _worker(manifests)["volumeMounts"][0]["mountPath"] = "/data"


def _service_selects_every_pod(manifests: list[Manifest]) -> None:
    del by_kind(manifests, "Service")["spec"]["selector"][LWS_WORKER_INDEX_LABEL]


def _misspelt_pod_field(manifests: list[Manifest]) -> None:
    _worker(manifests)["imagePullPolicyy"] = "Always"


def _service_port_as_text(manifests: list[Manifest]) -> None:
    by_kind(manifests, "Service")["spec"]["ports"][0]["port"] = "12434"


def _worker_without_gpu(manifests: list[Manifest]) -> None:
    del _worker(manifests)["resources"]["limits"][GPU]


SPEC = "spec.leaderWorkerTemplate"
# name: (breakage, the error it must raise, a fragment of its message)
JS, KV = jsonschema.ValidationError, kubernetes_validate.ValidationError
BROKEN: dict[str, tuple[Breakage, type[Exception], str]] = {
    "size 0": (_set(f"{SPEC}.size", 0), JS, "less than the minimum of 1"),
    "size as text": (_set(f"{SPEC}.size", "2"), JS, "is not of type 'integer'"),
    "unknown restartPolicy": (_set(f"{SPEC}.restartPolicy", "Always"), JS, "'Always' is not one"),
    "unknown startupPolicy": (
        _set("spec.startupPolicy", "LeaderStarted"),
        JS,
        "'LeaderStarted' is not one",
    ),
    "negative replicas": (_set("spec.replicas", -1), JS, "less than the minimum of 0"),
    "misspelt group field": (_set(f"{SPEC}.sizes", 2), JS, "'sizes' was unexpected"),
    "template metadata field": (
        _set(f"{SPEC}.workerTemplate.metadata.generateName", "x"),
        JS,
        "'generateName' was unexpected",
    ),
    "other API version": (_set("apiVersion", "leaderworkerset.x-k8s.io/v2"), JS, "was expected"),
    "worker without containers": (
        _set(f"{SPEC}.workerTemplate.spec", {}),
        JS,
        "'containers' is a required property",
    ),
    "misspelt pod field": (_misspelt_pod_field, KV, "'imagePullPolicyy' was unexpected"),
    "containers as text": (
        _set(f"{SPEC}.workerTemplate.spec.containers", "ray"),
        KV,
        "'ray' is not of type 'array'",
    ),
    "service port as text": (_service_port_as_text, KV, "'12434' is not of type 'integer'"),
    "container without image": (_no_image, ManifestError, "a container has no image"),
    "worker on another image": (_other_worker_image, ManifestError, "different images"),
    "worker joins another Ray port": (_worker_port, ManifestError, "joins Ray port"),
    "pipeline size != group size": (
        _configure("pipeline-parallel-size", 3),
        ManifestError,
        "pipeline-parallel-size 3 != size 2",
    ),
    "group size != pipeline size": (
        _set(f"{SPEC}.size", 3),
        ManifestError,
        "pipeline-parallel-size 2 != size 3",
    ),
    "tensor size != GPUs": (
        _configure("tensor-parallel-size", 2),
        ManifestError,
        "tensor-parallel-size is 2",
    ),
    "worker without GPU": (_worker_without_gpu, ManifestError, "the worker requests"),
    "mp executor": (
        _configure("distributed-executor-backend", "mp"),
        ManifestError,
        "not use the Ray executor",
    ),
    "ray-address elsewhere": (
        _configure("ray-address", "10.0.0.1:6379"),
        ManifestError,
        "not the leader's Ray head",
    ),
    "worker store elsewhere": (_worker_store_elsewhere, ManifestError, "no volume at /models"),
    "service selects the worker too": (
        _service_selects_every_pod,
        ManifestError,
        "not the leader only",
    ),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_a_broken_copy_fails_validation(name: str) -> None:
    breakage, error, message = BROKEN[name]
    manifests = copy.deepcopy(render(MULTINODE))
    breakage(manifests)
    with pytest.raises(error, match=re.escape(message)):
        validate_multinode(manifests, KUBERNETES_VERSIONS[0])
