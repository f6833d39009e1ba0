"""The compose stack on a real Docker engine: image, balancer, replicas, Prometheus.

Everything runs on a private engine (tests/docker_engine.py): the server image
is built by `docker compose build` from deploy/Dockerfile on a local Debian base,
nginx and Prometheus come from Debian's packages on the same base (the
official images cannot be pulled here), and the stack is deploy/docker-compose.yml
itself with only images swapped by an override. Traffic goes to 127.0.0.1 (the
published ports) and to the stack's own containers (per-replica metrics).
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from docker.models.containers import Container
from tritonclient.utils import InferenceServerException

from tests.docker_engine import (
    DOCKER_API_VERSION,
    DockerEngine,
    EngineUnavailableError,
    compose_binary,
    import_base_image,
)
from tests.process import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(1200)]

DEPLOY = ROOT / "deploy"
PROJECT = "batchwise-e2e"
BASE_IMAGE = "batchwise-e2e/base"
SERVER_IMAGE = "batchwise-e2e/server:test"
TOOLS_IMAGE = "batchwise-e2e/tools:test"
REPLICAS = 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Stack:
    engine: DockerEngine
    docker: docker.DockerClient
    override: Path
    grpc_port: int
    prometheus_port: int
    http_port: int

    def compose(
        self, *args: str, timeout: float = 600, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        command = [
            str(compose_binary()),
            "--project-name",
            PROJECT,
            "--file",
            str(DEPLOY / "docker-compose.yml"),
            "--file",
            str(self.override),
            *args,
        ]
        environment = {
            **self.engine.environment(),
            "SERVER_REPLICAS": str(REPLICAS),
            "BIND_ADDRESS": "127.0.0.1",
            "MONITORING_BIND_ADDRESS": "127.0.0.1",
            "GRPC_PORT": str(self.grpc_port),
            "HTTP_PORT": str(self.http_port),
            "PROMETHEUS_PORT": str(self.prometheus_port),
        }
        result = subprocess.run(
            command, env=environment, capture_output=True, text=True, timeout=timeout
        )
        assert result.returncode == 0 or not check, (
            f"{' '.join(args)} failed:\n{result.stdout}{result.stderr}"
        )
        return result

    def docker_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The docker CLI on this engine (the SDK's exec and logs leak their raw sockets)."""
        return subprocess.run(
            ["docker", *args],
            env=self.engine.environment(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def replicas(self) -> list[Container]:
        labels = [f"com.docker.compose.project={PROJECT}", "com.docker.compose.service=server"]
        found = self.docker.containers.list(all=True, filters={"label": labels})
        return sorted(found, key=lambda container: str(container.name))

    def prometheus(self, query: str) -> list[dict[str, object]]:
        address = f"http://127.0.0.1:{self.prometheus_port}/api/v1/query?"
        with urllib.request.urlopen(address + urllib.parse.urlencode({"query": query})) as page:
            answer = json.load(page)
        assert answer["status"] == "success", answer
        return list(answer["data"]["result"])


def _address(container: Container) -> str:
    networks = container.attrs["NetworkSettings"]["Networks"]
    return str(next(iter(networks.values()))["IPAddress"])


def _replica_requests(container: Container, model: str) -> float:
    """batchwise_requests_total{code="OK"} for `model`, read from one replica's /metrics."""
    with urllib.request.urlopen(f"http://{_address(container)}:8002/metrics", timeout=10) as page:
        text = page.read().decode()
    prefix = f'batchwise_requests_total{{code="OK",model="{model}",version="1"}} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


@pytest.fixture(scope="module")
def engine() -> Iterator[DockerEngine]:
    try:
        engine = DockerEngine.start()
    except EngineUnavailableError as reason:
        pytest.skip(f"no Docker engine here: {reason}")
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def stack(engine: DockerEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = import_base_image(engine, BASE_IMAGE, "bookworm")
    with engine.client() as client:
        client.images.build(
            path=str(ROOT / "tests" / "docker"),
            dockerfile="tools.Dockerfile",
            buildargs={"BASE_IMAGE": base},
            tag=TOOLS_IMAGE,
            rm=True,
            forcerm=True,
        )
    override = tmp_path_factory.mktemp("compose") / "override.yml"
    override.write_text(
        "services:\n"
        "  server:\n"
        f"    build: {{args: {{BASE_IMAGE: '{base}'}}}}\n"
        f"    image: {SERVER_IMAGE}\n"
        "  lb:\n"
        f"    image: {TOOLS_IMAGE}\n"
        "    pull_policy: never\n"
        "  prometheus:\n"
        f"    image: {TOOLS_IMAGE}\n"
        "    entrypoint: [/usr/bin/prometheus]\n"
        "    pull_policy: never\n"
    )
    client = docker.DockerClient(base_url=engine.host, version=DOCKER_API_VERSION, timeout=600)
    stack = Stack(engine, client, override, _free_port(), _free_port(), _free_port())
    try:
        stack.compose("build", "server")
        # Grafana has no Debian package and cannot be pulled here: start the rest.
        stack.compose("up", "--detach", "--no-build", "--wait", "lb", "prometheus")
        yield stack
    finally:
        logs = stack.compose("logs", "--no-color", check=False)
        (tmp_path_factory.getbasetemp() / "compose.log").write_text(logs.stdout + logs.stderr)
        stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "30")
        client.close()


def _add_sub_inputs(value: float) -> list[grpcclient.InferInput]:
    tensors = []
    for name in ("INPUT0", "INPUT1"):
        tensor = grpcclient.InferInput(name, [1, 16], "FP32")
        tensor.set_data_from_numpy(np.full((1, 16), value, np.float32))
        tensors.append(tensor)
    return tensors


def test_image_is_small_non_root_and_has_no_training_stack(
    stack: Stack,
) -> None:
    image = stack.docker.images.get(SERVER_IMAGE)
    config = image.attrs["Config"]
    assert config["User"] == "10001:10001"
    assert config["Healthcheck"]["Test"][:3] == ["CMD", "batchwise", "health"]
    assert set(config["ExposedPorts"]) == {"8000/tcp", "8001/tcp", "8002/tcp"}
    assert "BATCHWISE_MODEL_REPOSITORY=/models" in config["Env"]
    # torch alone is larger than this; the Debian base is ~220 MB of it.
    assert image.attrs["Size"] < 600 * 2**20, image.attrs["Size"]
    replica = stack.replicas()[0]
    probe = stack.docker_cli(
        "exec",
        str(replica.name),
        "/opt/batchwise/bin/python",
        "-c",
        "import importlib.util as u, os;"
        "print(os.getuid(), [m for m in ('torch', 'onnx', 'sklearn', 'pip') if u.find_spec(m)])",
    )
    assert (probe.returncode, probe.stdout.strip()) == (0, "10001 []"), probe
    compilers = stack.docker_cli("exec", str(replica.name), "sh", "-c", "command -v gcc cc g++")
    assert compilers.returncode != 0 and compilers.stdout == "", compilers


def test_inference_through_the_balancer_lands_on_every_replica(stack: Stack) -> None:
    before = [_replica_requests(replica, "add_sub") for replica in stack.replicas()]
    sent = 40
    with grpcclient.InferenceServerClient(stack.url) as client:
        assert client.is_server_ready()
        metadata = client.get_model_metadata("digits_cnn")
        assert metadata.inputs[0].shape == [-1, 1, 8, 8]
        for index in range(sent):
            result = client.infer("add_sub", _add_sub_inputs(float(index)))
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 16), 2 * index))
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), np.zeros((1, 16)))
    after = [_replica_requests(replica, "add_sub") for replica in stack.replicas()]
    landed = [now - then for now, then in zip(after, before, strict=True)]
    assert sum(landed) == sent
    assert all(count > 0 for count in landed), f"requests per replica: {landed}"


def test_http_through_the_balancer_lands_on_every_replica(stack: Stack) -> None:
    """curl-style JSON requests to the published HTTP port, spread over the replicas."""
    before = [_replica_requests(replica, "add_sub") for replica in stack.replicas()]
    base = f"http://127.0.0.1:{stack.http_port}"
    with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=10) as page:
        assert page.status == 200
    sent = 40
    for index in range(sent):
        document = {
            "inputs": [
                {"name": name, "datatype": "FP32", "shape": [1, 16], "data": [index] * 16}
                for name in ("INPUT0", "INPUT1")
            ]
        }
        request = urllib.request.Request(
            f"{base}/v2/models/add_sub/infer", data=json.dumps(document).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as page:
            outputs = {output["name"]: output["data"] for output in json.load(page)["outputs"]}
        assert outputs == {"OUTPUT0": [2.0 * index] * 16, "OUTPUT1": [0.0] * 16}
    after = [_replica_requests(replica, "add_sub") for replica in stack.replicas()]
    landed = [now - then for now, then in zip(after, before, strict=True)]
    assert sum(landed) == sent
    assert all(count > 0 for count in landed), f"requests per replica: {landed}"


def test_prometheus_scrapes_every_replica_with_our_config(stack: Stack) -> None:
    with grpcclient.InferenceServerClient(stack.url) as client:
        for index in range(10):
            client.infer("add_sub", _add_sub_inputs(float(index)))
    deadline = time.monotonic() + 120
    targets: list[dict[str, object]] = []
    total = 0.0
    while time.monotonic() < deadline:
        targets = stack.prometheus('up{job="batchwise"} == 1')
        answer = stack.prometheus('sum(batchwise_requests_total{model="add_sub"})')
        total = float(answer[0]["value"][1]) if answer else 0.0  # type: ignore[index]
        if len(targets) == REPLICAS and total >= 10:
            break
        time.sleep(2)
    assert len(targets) == REPLICAS, targets
    assert total >= 10
    # Our recording and alerting rules are loaded, and healthy, in the stack's Prometheus.
    address = f"http://127.0.0.1:{stack.prometheus_port}/api/v1/rules"
    with urllib.request.urlopen(address) as page:
        groups = json.load(page)["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {rule["type"] for rule in rules} == {"recording", "alerting"}
    assert len(rules) == 13
    assert all(rule["health"] in ("ok", "unknown") for rule in rules), rules


def test_stopping_a_replica_loses_no_request_that_the_client_retries(stack: Stack) -> None:
    stopping, surviving = stack.replicas()[:2]
    failures: list[str] = []
    completed: list[int] = []
    retried: list[int] = []
    keep_sending = threading.Event()
    keep_sending.set()

    def send(worker: int) -> None:
        with grpcclient.InferenceServerClient(stack.url) as client:
            sequence = 0
            while keep_sending.is_set():
                value = float(worker * 100_000 + sequence)
                for attempt in range(20):
                    try:
                        result = client.infer("add_sub", _add_sub_inputs(value))
                    except InferenceServerException as error:
                        # UNAVAILABLE: refused by the draining replica. CANCELLED with gRPC's
                        # own message: reached the replica as it stopped, never processed.
                        retryable = error.status() == "StatusCode.UNAVAILABLE" or (
                            error.status() == "StatusCode.CANCELLED"
                            and error.message() == "CANCELLED"
                        )
                        if not retryable:
                            failures.append(f"{error.status()}: {error.message()}")
                            return
                        retried.append(attempt)
                        time.sleep(0.05)
                        continue
                    if not np.array_equal(result.as_numpy("OUTPUT0"), np.full((1, 16), 2 * value)):
                        failures.append(f"request {value} got another request's answer")
                    completed.append(worker)
                    break
                else:
                    failures.append(f"request {value} still UNAVAILABLE after 20 tries")
                sequence += 1

    workers = [threading.Thread(target=send, args=(worker,)) for worker in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(1.5)
    stopping.stop(timeout=30)
    sent_before_stop = len(completed)
    time.sleep(2)
    keep_sending.clear()
    for worker in workers:
        worker.join(60)

    assert failures == []
    assert len(completed) > sent_before_stop > 0
    stopping.reload()
    state = stopping.attrs["State"]
    # SIGTERM handled by the server as PID 1: drained and exited 0, not killed.
    assert (state["Status"], state["ExitCode"]) == ("exited", 0)
    logs = stack.docker_cli("logs", str(stopping.name))
    assert "shutting down" in logs.stderr and "server stopped" in logs.stderr, logs
    # The balancer now sends everything to the survivor.
    before = _replica_requests(surviving, "add_sub")
    with grpcclient.InferenceServerClient(stack.url) as client:
        for index in range(6):
            client.infer("add_sub", _add_sub_inputs(float(index)))
    assert _replica_requests(surviving, "add_sub") - before == 6


def test_the_balancer_follows_a_new_replica_without_a_reload(stack: Stack) -> None:
    # Runs after a replica was stopped: scale to three (the stopped one comes back and a
    # new one starts, at addresses nginx has never resolved) and wait for traffic to reach
    # both, with no one touching nginx.
    stack.compose(
        "up", "--detach", "--no-build", "--wait", "--scale", f"server={REPLICAS + 1}", "server"
    )
    replicas = [replica for replica in stack.replicas() if replica.status == "running"]
    assert len(replicas) == REPLICAS + 1
    before = {str(replica.name): _replica_requests(replica, "add_sub") for replica in replicas}
    deadline = time.monotonic() + 60
    reached: set[str] = set()
    with grpcclient.InferenceServerClient(stack.url) as client:
        while time.monotonic() < deadline and len(reached) < len(replicas):
            for index in range(12):
                client.infer("add_sub", _add_sub_inputs(float(index)))
            reached = {
                str(replica.name)
                for replica in replicas
                if _replica_requests(replica, "add_sub") > before[str(replica.name)]
            }
            time.sleep(1)
    assert reached == set(before), f"replicas that got traffic: {sorted(reached)}"
    logs = stack.compose("logs", "--no-color", "lb")
    assert "reloading nginx" in logs.stdout + logs.stderr
