"""The Kubernetes example (``deploy/kubernetes/``), checked without a cluster (issue #17 point 6).

Every document of every manifest is loaded into the ``kubernetes`` client's model of its kind, field by field:
a field the model does not have (a misspelling, a field at the wrong level) or a value of the wrong shape fails
with its path — the client's own ``deserialize`` would drop it silently, so the walk is ours. Then what the
runbook promises of them: the probes, the PodDisruptionBudget and the HPA aimed at the Deployment, the config
from the ConfigMap (and a config the gateway accepts), keys and the Redis URL from the Secret.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config.parse import parse_config

kubernetes = pytest.importorskip("kubernetes", reason="the kubernetes client is a test extra (pip install -e '.[test]')")
from kubernetes import client as k8s  # noqa: E402

MANIFESTS = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
_PRIMITIVE = {"str": str, "int": int, "bool": bool, "float": (int, float), "bytes": str, "datetime": str}


class Invalid(AssertionError):
    pass


def model_name(doc: dict[str, Any]) -> str:
    """``apps/v1`` + ``Deployment`` → ``V1Deployment`` (the client's class)."""
    version = str(doc.get("apiVersion", "")).rsplit("/", 1)[-1]
    return version[:1].upper() + version[1:] + str(doc.get("kind", ""))


def check(value: Any, kind: str, path: str) -> None:
    """``value`` (parsed YAML) against the client's type ``kind`` ("V1Container", "List[V1EnvVar]",
    "Dict[str, str]", "str", "object" …): every key a field of the model, every value its field's shape."""
    if value is None:
        return
    if kind.startswith(("list[", "List[")):
        if not isinstance(value, list):
            raise Invalid(f"{path}: a list expected, got {type(value).__name__}")
        for i, item in enumerate(value):
            check(item, kind[5:-1], f"{path}[{i}]")
        return
    if kind.startswith(("dict(", "Dict[")):
        if not isinstance(value, dict):
            raise Invalid(f"{path}: a mapping expected, got {type(value).__name__}")
        inner = kind[5:-1].split(", ", 1)[1]
        for key, item in value.items():
            check(item, inner, f"{path}.{key}")
        return
    if kind == "object":  # IntOrString, quantities: the API takes either
        if not isinstance(value, (str, int, float)):
            raise Invalid(f"{path}: a string or a number expected, got {type(value).__name__}")
        return
    if kind in _PRIMITIVE:
        if not isinstance(value, _PRIMITIVE[kind]) or (kind == "int" and isinstance(value, bool)):
            raise Invalid(f"{path}: {kind} expected, got {value!r}")
        return
    model = getattr(k8s, kind, None)
    if model is None:
        raise Invalid(f"{path}: the client has no model {kind}")
    if not isinstance(value, dict):
        raise Invalid(f"{path}: a {kind} mapping expected, got {type(value).__name__}")
    fields = {json_name: model.openapi_types[attr] for attr, json_name in model.attribute_map.items()}
    for key, item in value.items():
        if key not in fields:
            raise Invalid(f"{path}.{key}: {kind} has no field {key!r}")
        check(item, fields[key], f"{path}.{key}")


def load(text: str, where: str) -> list[tuple[dict[str, Any], Any]]:
    """Every document of a manifest, checked, and the client's model made of it (required fields enforced)."""
    out = []
    for i, doc in enumerate(d for d in yaml.safe_load_all(text) if d is not None):
        name = model_name(doc)
        if getattr(k8s, name, None) is None:
            raise Invalid(f"{where} #{i}: no model for apiVersion {doc.get('apiVersion')!r} kind {doc.get('kind')!r}")
        check(doc, name, f"{where} #{i} {doc['kind']}")
        out.append((doc, k8s.ApiClient()._ApiClient__deserialize(doc, name)))
    return out


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], tuple[dict[str, Any], Any]]:
    found = {}
    files = sorted(MANIFESTS.glob("*.yaml"))
    assert files, f"no manifests in {MANIFESTS}"
    for path in files:
        for doc, model in load(path.read_text(), path.name):
            found[(doc["kind"], doc["metadata"]["name"])] = (doc, model)
    return found


def test_every_manifest_is_a_valid_object_of_its_kind(objects):
    kinds = {kind for kind, _ in objects}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ConfigMap", "Secret"} <= kinds


@pytest.mark.parametrize(("text", "error"), [
    ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  selector: {matchLabels: {a: b}}\n"
     "  template:\n    spec:\n      containers:\n        - name: c\n          readinesProbe: {httpGet: {path: /readyz, port: 80}}\n",
     "V1Container has no field 'readinesProbe'"),
    ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  replica: 2\n  selector: {}\n  template: {}\n",
     "V1DeploymentSpec has no field 'replica'"),
    ("apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata: {name: x}\nspec: {minAvailable: 1, selector: {app: x}}\n",
     "V1LabelSelector has no field 'app'"),
    ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  replicas: two\n  selector: {}\n  template: {}\n",
     "int expected"),
    ("apiVersion: autoscaling/v3\nkind: HorizontalPodAutoscaler\nmetadata: {name: x}\n", "no model"),
])
def test_a_misspelled_or_misplaced_field_fails(text, error):
    with pytest.raises(Invalid, match=re.escape(error)):
        load(text, "bad.yaml")


def test_a_missing_required_field_fails():
    with pytest.raises(ValueError, match="containers"):
        load("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {}\n", "bad.yaml")


def test_the_deployment_probes_drains_and_runs_as_the_image_user(objects):
    deployment = objects[("Deployment", "reliapi")][1]
    pod = deployment.spec.template.spec
    (container,) = pod.containers
    assert container.liveness_probe.http_get.path == "/livez"
    assert container.readiness_probe.http_get.path == "/readyz"
    assert container.startup_probe.http_get.path == "/livez"
    ports = {p.name: p.container_port for p in container.ports}
    assert {container.liveness_probe.http_get.port, container.readiness_probe.http_get.port} == {"http"} and "http" in ports
    assert pod.security_context.run_as_non_root and pod.security_context.run_as_user == 10001
    config = yaml.safe_load(objects[("ConfigMap", "reliapi-config")][0]["data"]["config.yaml"])
    assert pod.termination_grace_period_seconds > config["server"]["shutdown_grace_s"] + 5  # + the preStop pause
    assert container.resources.requests["cpu"]  # what the HPA's utilisation is measured against


def test_pdb_hpa_and_service_point_at_the_deployment(objects):
    deployment = objects[("Deployment", "reliapi")][1]
    labels = deployment.spec.template.metadata.labels
    assert deployment.spec.selector.match_labels.items() <= labels.items()
    pdb = objects[("PodDisruptionBudget", "reliapi")][1]
    assert pdb.spec.selector.match_labels.items() <= labels.items()
    assert pdb.spec.max_unavailable == 1 and deployment.spec.replicas >= 2
    hpa = objects[("HorizontalPodAutoscaler", "reliapi")][1]
    assert (hpa.spec.scale_target_ref.kind, hpa.spec.scale_target_ref.name) == ("Deployment", "reliapi")
    (metric,) = hpa.spec.metrics
    assert metric.resource.name == "cpu" and metric.resource.target.type == "Utilization"
    assert hpa.spec.min_replicas >= 2
    service = objects[("Service", "reliapi")][1]
    assert service.spec.selector.items() <= labels.items()


def test_config_comes_from_the_configmap_and_keys_and_the_redis_url_from_the_secret(objects):
    pod = objects[("Deployment", "reliapi")][1].spec.template.spec
    (container,) = pod.containers
    volumes = {v.name: v for v in pod.volumes}
    mounts = {m.name: m.mount_path for m in container.volume_mounts}
    config_map = volumes["config"].config_map.name
    assert (("ConfigMap", config_map)) in objects
    assert f"{mounts['config']}/config.yaml" in container.args  # the file the ConfigMap's key becomes
    env = {e.name: e for e in container.env}
    for name in ("REDIS_URL", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "RELIAPI_ADMIN_KEY"):
        ref = env[name].value_from.secret_key_ref  # never a literal value in the Deployment
        assert env[name].value is None and ("Secret", ref.name) in objects
        assert ref.key in objects[("Secret", ref.name)][0]["stringData"]
    text = objects[("ConfigMap", config_map)][0]["data"]["config.yaml"]
    assert not re.search(r"sk-[A-Za-z0-9]", text)  # no key in the config
    parsed = parse_config(text, env={"OPENAI_API_KEY": "sk-x", "ANTHROPIC_API_KEY": "x", "RELIAPI_ADMIN_KEY": "x",
                                     "REDIS_URL": "redis://redis:6379/0"})
    assert parsed.store.url.startswith("redis://")
