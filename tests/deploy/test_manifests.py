"""deploy/: every Kubernetes manifest against the Kubernetes schemas, the compose file against
the compose-spec schema, both offline (kubernetes-validate and check-jsonschema ship them)."""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
# The oldest Kubernetes release the manifests promise to work on (autoscaling/v2, policy/v1).
K8S_VERSION = "1.29.0"


def _manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _by_kind() -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for path in _manifests():
        for doc in _load(path):
            kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: p.name)
def test_manifest_validates_against_the_kubernetes_schema(path: Path):
    for doc in _load(path):
        # strict: unknown fields (typos) are errors too.
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    "break_it",
    [
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(
            containerPort="eight thousand"
        ),
        lambda d: d["spec"]["template"]["spec"]["containers"][0].update(readinesProbe={}),
        lambda d: d["spec"].pop("selector"),
    ],
    ids=["wrong-type", "misspelt-field", "missing-required"],
)
def test_a_broken_manifest_fails_validation(break_it):
    """The validator is real: the same check rejects a broken copy of the gateway Deployment."""
    doc = copy.deepcopy(_load(K8S / "gateway-deployment.yaml")[0])
    break_it(doc)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(p.name for p in _manifests())


def test_the_k8s_deployment_has_what_the_issue_asks_for():
    kinds = _by_kind()
    for kind in ("Deployment", "Service", "ConfigMap", "Secret", "HorizontalPodAutoscaler",
                 "PodDisruptionBudget"):  # fmt: skip
        assert kind in kinds, kind
    deployments = {d["metadata"]["name"]: d for d in kinds["Deployment"]}
    gateway = deployments["obliviate-gateway"]["spec"]["template"]["spec"]
    container = gateway["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert gateway["securityContext"]["runAsNonRoot"] is True
    refs = {r.get("configMapRef", r.get("secretRef", {}))["name"] for r in container["envFrom"]}
    assert refs == {"obliviate-gateway"}
    secret = kinds["Secret"][0]["stringData"]
    assert {"OBLIVIATE_ADMIN_TOKEN", "OBLIVIATE_REGISTRY_URL"} <= set(secret)
    assert secret["OBLIVIATE_REGISTRY_URL"].startswith("postgresql://")
    config = kinds["ConfigMap"][0]["data"]
    assert config["OBLIVIATE_ENGINE"] == "openai_upstream"
    # The drain (shutdown_grace_seconds) fits inside Kubernetes' own grace period.
    assert (
        float(config["OBLIVIATE_SHUTDOWN_GRACE_SECONDS"]) < gateway["terminationGracePeriodSeconds"]
    )
    vllm = deployments["vllm"]["spec"]["template"]["spec"]["containers"][0]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--enable-prompt-embeds" in vllm["args"]
    services = {s["metadata"]["name"] for s in kinds["Service"]}
    assert config["OBLIVIATE_UPSTREAM__URL"].split("//")[1].split(":")[0] in services
    hpa = kinds["HorizontalPodAutoscaler"][0]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "obliviate-gateway" and hpa["minReplicas"] >= 2
    pdb = kinds["PodDisruptionBudget"][0]["spec"]
    assert (
        pdb["selector"]["matchLabels"]
        == deployments["obliviate-gateway"]["spec"]["selector"]["matchLabels"]
    )


def test_every_setting_in_the_configmap_exists():
    """A misspelt OBLIVIATE_* variable would be ignored silently: build Settings from them."""
    from server.settings import Settings

    env = {**_by_kind()["ConfigMap"][0]["data"], **_by_kind()["Secret"][0]["stringData"]}
    nested: dict[str, Any] = {}
    for key, value in env.items():
        parts = key.removeprefix("OBLIVIATE_").lower().split("__")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    settings = Settings.model_validate(nested)
    assert settings.engine == "openai_upstream" and settings.registry_poll_interval == 1


def _compose_schema() -> dict[str, Any]:
    schema = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    loaded: dict[str, Any] = json.loads(schema.read_text())
    return loaded


def test_compose_file_validates_against_the_compose_spec():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    jsonschema.validate(compose, _compose_schema())
    broken = copy.deepcopy(compose)
    broken["services"]["obliviate"]["depends_on"] = 42
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _compose_schema())


def test_compose_wires_gateway_vllm_postgres_prometheus():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"obliviate", "vllm", "postgres", "prometheus"} <= set(services)
    env = services["obliviate"]["environment"]
    assert env["OBLIVIATE_ENGINE"] == "openai_upstream"
    assert env["OBLIVIATE_UPSTREAM__URL"].startswith("http://vllm:")
    assert (
        env["OBLIVIATE_REGISTRY_URL"].startswith("postgresql://")
        and "@postgres:" in env["OBLIVIATE_REGISTRY_URL"]
    )
    assert "--enable-prompt-embeds" in services["vllm"]["command"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["obliviate"]["metrics_path"] == "/metrics"
    assert jobs["obliviate"]["dns_sd_configs"][0]["names"] == ["obliviate"]
    mounted = services["prometheus"]["volumes"][0].split(":")[0]
    assert (DEPLOY / mounted).resolve() == (DEPLOY / "prometheus.yml").resolve()


def test_the_pod_runs_as_the_images_user():
    """runAsNonRoot needs a numeric uid; it must be the one the Dockerfile creates."""
    import re

    dockerfile = (DEPLOY.parent / "Dockerfile").read_text()
    uids = set(re.findall(r"useradd [^\n]*--uid (\d+)", dockerfile))
    deployment = _load(K8S / "gateway-deployment.yaml")[0]
    assert uids == {str(deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"])}


def test_metrics_are_off_the_api_port_and_scraped_where_they_are():
    """/metrics leaks what the guard flags: served on its own port, which no Service exposes."""
    config = _by_kind()["ConfigMap"][0]["data"]
    port = int(config["OBLIVIATE_METRICS__PORT"])
    deployment = _load(K8S / "gateway-deployment.yaml")[0]["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in deployment["spec"]["containers"][0]["ports"]}
    assert ports["metrics"] == port != ports["http"]
    assert deployment["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    service = _load(K8S / "gateway-service.yaml")[0]["spec"]
    assert [p["targetPort"] for p in service["ports"]] == ["http"]

    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    env = compose["obliviate"]["environment"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["obliviate"]["dns_sd_configs"][0]["port"] == int(env["OBLIVIATE_METRICS__PORT"])
    assert all(str(env["OBLIVIATE_METRICS__PORT"]) not in p for p in compose["obliviate"]["ports"])
    assert env["OBLIVIATE_LIMITS__BACKEND"] == "redis"
    assert env["OBLIVIATE_LIMITS__REDIS_URL"].startswith("redis://redis:")
    assert "redis" in compose["obliviate"]["depends_on"]
