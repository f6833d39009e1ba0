"""deploy/ checked offline: Dockerfile lint, compose validation, Kubernetes schemas.

The compose stack itself runs in test_docker_stack.py; these checks need no
engine and fail fast on a file that an engine, a cluster or KServe would refuse.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.cli import build_parser, settings_from
from service.metrics import FAMILIES
from tests.docker_engine import compose_binary
from tests.process import ROOT

DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
KUBERNETES_VERSION = "1.37.0"
DOCKERFILES = [DEPLOY / "Dockerfile", ROOT / "tests" / "docker" / "tools.Dockerfile"]
# KServe's custom resources: not in the Kubernetes schemas, checked by hand below.
KSERVE_KINDS = {"ServingRuntime", "InferenceService"}
KSERVE_PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "hadolint"), "--no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    result = _hadolint(dockerfile)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(DEPLOY.joinpath("Dockerfile").read_text() + "RUN cd /tmp && pip install torch\n")
    result = _hadolint(bad)
    assert result.returncode != 0
    assert "DL3003" in result.stdout  # cd instead of WORKDIR


def _compose_config(*files: Path) -> dict[str, Any]:
    command = [str(compose_binary())]
    for file in files:
        command += ["--file", str(file)]
    result = subprocess.run(
        [*command, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


def test_compose_stack_is_valid_and_wired_as_documented() -> None:
    config = _compose_config(DEPLOY / "docker-compose.yml")
    services = config["services"]
    assert set(services) == {"server", "lb", "prometheus", "grafana"}
    server = services["server"]
    assert server["build"]["dockerfile"] == "deploy/Dockerfile"
    assert Path(server["build"]["context"]) == ROOT
    assert server["deploy"]["replicas"] == 2
    assert "ports" not in server, "replicas must not publish ports; the balancer does"
    assert server["healthcheck"]["test"][:3] == ["CMD", "batchwise", "health"]
    models = server["volumes"][0]
    assert (Path(models["source"]), models["target"], models["read_only"]) == (
        ROOT / "models" / "repository",
        "/models",
        True,
    )
    assert services["lb"]["depends_on"]["server"]["condition"] == "service_healthy"
    published = {
        name: [port["published"] for port in service.get("ports", [])]
        for name, service in services.items()
    }
    assert published == {
        "server": [],
        "lb": ["8001", "8000"],
        "prometheus": ["9090"],
        "grafana": ["3000"],
    }
    assert set(config["volumes"]) == {"prometheus-data", "grafana-data"}
    mounts = {
        volume["target"]: Path(volume["source"])
        for name in ("lb", "prometheus", "grafana")
        for volume in services[name]["volumes"]
        if volume["type"] == "bind"
    }
    assert mounts["/etc/nginx/nginx.conf"] == DEPLOY / "nginx" / "nginx.conf"
    assert mounts["/etc/nginx/run-nginx.sh"] == DEPLOY / "nginx" / "run-nginx.sh"
    assert services["lb"]["command"] == ["sh", "/etc/nginx/run-nginx.sh"]
    # Monitoring UIs (Grafana has a default admin password) stay on loopback by default.
    for name in ("prometheus", "grafana"):
        assert services[name]["ports"][0]["host_ip"] == "127.0.0.1"
    assert services["lb"]["ports"][0]["host_ip"] == "0.0.0.0"
    assert mounts["/etc/prometheus"] == DEPLOY / "prometheus"
    assert mounts["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
    # The provisioning file points Grafana at the folder the dashboards are mounted on.
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/batchwise.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    assert mounts["/etc/grafana/dashboards"] == DEPLOY / "grafana" / "dashboards"


def test_compose_gpu_override_reserves_nvidia_devices() -> None:
    config = _compose_config(DEPLOY / "docker-compose.yml", DEPLOY / "docker-compose.gpu.yml")
    server = config["services"]["server"]
    assert server["build"]["args"]["ONNXRUNTIME"] == "gpu"
    assert server["build"]["args"]["BASE_IMAGE"].startswith("nvidia/cuda:13.")
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]
    assert server["deploy"]["replicas"] == 2


def test_compose_validation_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    text = DEPLOY.joinpath("docker-compose.yml").read_text()
    broken.write_text(text.replace("    stop_grace_period: 30s", "    stop_grace_priod: 30s"))
    result = subprocess.run(
        [str(compose_binary()), "--file", str(broken), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "stop_grace_priod" in result.stderr


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    documents = []
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            documents.append((str(path.relative_to(KUBERNETES)), document))
    return documents


def _by_kind(kind: str) -> dict[str, Any]:
    [document] = [document for _, document in _manifests() if document["kind"] == kind]
    return document


def test_kubernetes_manifests_pass_strict_schema_validation() -> None:
    kinds = set()
    for _, document in _manifests():
        kinds.add(document["kind"])
        if document["kind"] in KSERVE_KINDS:
            continue
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
    } <= kinds, kinds


def test_schema_validation_rejects_a_wrong_manifest() -> None:
    deployment = copy.deepcopy(_by_kind("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = (
        "grpc"
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment = copy.deepcopy(_by_kind("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def _server_settings(container: dict[str, Any]) -> Any:
    """The Settings a container's args and env give the server (as the CLI would build them)."""
    arguments = build_parser().parse_args(container.get("args", ["serve"]))
    environment = {item["name"]: item["value"] for item in container.get("env", [])}
    import os
    from unittest import mock

    with mock.patch.dict(os.environ, environment):
        return settings_from(arguments)


def test_kubernetes_manifests_agree_with_each_other_and_the_image() -> None:
    deployment = _by_kind("Deployment")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [container] = pod["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    settings = _server_settings(container)
    assert ports == {
        "http": settings.http_port,
        "grpc": settings.grpc_port,
        "metrics": settings.metrics_port,
    }
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == settings.grpc_port
    # Readiness over HTTP: the server's own route (the metrics port would answer 404).
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(settings.metrics_port)
    # The image's numeric user (deploy/Dockerfile) is what runAsNonRoot verifies.
    assert "USER 10001:10001" in (DEPLOY / "Dockerfile").read_text()
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert (
        grace
        > settings.shutdown_grace_seconds
        + container["lifecycle"]["preStop"]["sleep"]["seconds"]
        - 1
    )

    services = [document for _, document in _manifests() if document["kind"] == "Service"]
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports

    autoscaler = _by_kind("HorizontalPodAutoscaler")
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    for metric in autoscaler["spec"]["metrics"]:
        if metric["type"] == "Pods":
            assert metric["pods"]["metric"]["name"] in FAMILIES
    adapter = yaml.safe_load(_by_kind("ConfigMap")["data"]["config.yaml"])
    assert adapter["rules"][0]["name"]["as"] == "batchwise_queue_depth"

    budget = _by_kind("PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()

    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (KUBERNETES / resource).is_file(), resource


def test_kserve_runtime_and_inference_service() -> None:
    runtime = _by_kind("ServingRuntime")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = runtime["spec"]
    formats = {entry["name"] for entry in spec["supportedModelFormats"]}
    assert "onnx" in formats
    assert set(spec["protocolVersions"]) <= KSERVE_PROTOCOLS
    assert "grpc-v2" in spec["protocolVersions"]
    # ServingRuntime containers are core Containers: validate them inside a Pod.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "servingruntime-containers"},
        "spec": {"containers": spec["containers"]},
    }
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    [container] = spec["containers"]
    assert container["name"] == "kserve-container"
    settings = _server_settings(container)
    # KServe's storage initializer puts the model in /mnt/models; gRPC goes to port "h2c".
    assert settings.model_repository == Path("/mnt/models")
    assert {port["name"]: port["containerPort"] for port in container["ports"]} == {
        "h2c": settings.grpc_port
    }
    assert runtime["metadata"]["annotations"]["prometheus.kserve.io/port"] == str(
        settings.metrics_port
    )

    services = [document for _, document in _manifests() if document["kind"] == "InferenceService"]
    assert {service["spec"]["predictor"]["model"]["protocolVersion"] for service in services} == {
        "grpc-v2",
        "v2",
    }
    for service in services:
        assert service["apiVersion"] == "serving.kserve.io/v1beta1"
        model = service["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"]
        assert model["modelFormat"]["name"] in formats
        assert model["protocolVersion"] in spec["protocolVersions"]
        if model["protocolVersion"] == "v2":  # REST goes to the runtime's HTTP port
            assert [port["containerPort"] for port in model["ports"]] == [settings.http_port]
