"""The command line and the process lifecycle: flags, env vars, port 0, SIGTERM drain."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from service.settings import Settings
from tests import onnx_models as models
from tests.process import ROOT, ServerProcess, start_on_loopback

SLOW_ROWS = 1024


@pytest.fixture(scope="module")
def slow_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slow")
    models.save(
        models.slow_matmul(512, 256),
        root,
        "slow",
        config=(
            "max_batch_size: 0\n"
            'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n'
            "instance_group [ { count: 2 kind: KIND_CPU } ]\n"
        ),
    )
    models.save(models.scale(2.0, ["batch", 4]), root, "quick")
    return root


@pytest.fixture()
def running(slow_repository: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(
        "serve",
        "--model-repository",
        str(slow_repository),
        "--grpc-host",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--http-port",
        "0",
        "--metrics-host",
        "127.0.0.1",
        "--metrics-port",
        "0",
    )
    server.wait_for("server ready:")
    yield server
    server.kill()


def test_help_explains_every_flag_and_its_environment_variable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    import dataclasses

    for spec in dataclasses.fields(Settings):
        flag = "--" + spec.name.replace("_", "-")
        assert flag in result.stdout, flag
        assert f"BATCHWISE_{spec.name.upper()}" in result.stdout, spec.name


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "batchwise"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("batchwise ")


def test_port_zero_is_logged_and_models_are_described(running: ServerProcess) -> None:
    port = running.grpc_port()
    assert port > 0
    assert "loaded model 'quick' version 1" in running.log
    line = running.wait_for("loaded model 'quick'")
    assert "CPUExecutionProvider" in line and "inputs: x FP32 [-1, 4]" in line
    with grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
        assert client.is_server_ready()
    with urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port()}/metrics") as page:
        metrics = page.read()
    assert b'batchwise_model_ready{model="quick",version="1"} 1.0' in metrics


def test_the_gil_switch_interval_is_python_s_unless_set(
    running: ServerProcess, slow_repository: Path
) -> None:
    assert "GIL switch interval 5 ms" in running.log
    server = start_on_loopback(slow_repository, "--gil-switch-interval-ms", "0.5")
    try:
        assert "GIL switch interval 0.5 ms" in server.log  # read back from the interpreter
    finally:
        server.kill()


def test_environment_variables_configure_the_server(slow_repository: Path) -> None:
    server = ServerProcess(
        "serve",
        env={
            "BATCHWISE_MODEL_REPOSITORY": str(slow_repository),
            "BATCHWISE_GRPC_HOST": "127.0.0.1",
            "BATCHWISE_GRPC_PORT": "0",
            "BATCHWISE_HTTP_PORT": "0",
            "BATCHWISE_METRICS_PORT": "-1",
            "BATCHWISE_LOG_LEVEL": "DEBUG",
        },
    )
    try:
        server.wait_for("server ready:")
        assert "metrics endpoint" not in server.log
        assert " DEBUG " in server.log
    finally:
        server.kill()


def test_flags_override_environment(slow_repository: Path) -> None:
    server = ServerProcess(
        "serve",
        "--grpc-port",
        "0",
        "--http-port",
        "0",
        "--metrics-port",
        "-1",
        "--grpc-host",
        "127.0.0.1",
        env={"BATCHWISE_MODEL_REPOSITORY": str(slow_repository), "BATCHWISE_GRPC_PORT": "1"},
    )
    try:
        assert server.grpc_port() != 1
    finally:
        server.kill()


@pytest.mark.parametrize(
    ("arguments", "environment", "message"),
    [
        (["--grpc-port", "70000"], {}, "grpc_port = 70000 is out of range"),
        (["--log-level", "LOUD"], {}, "invalid choice: 'LOUD'"),
        ([], {"BATCHWISE_GRPC_PORT": "eighty"}, "BATCHWISE_GRPC_PORT='eighty' is not a valid int"),
        (["--grpc-port", "9000", "--metrics-port", "9000"], {}, "give them different ports"),
        (["--gil-switch-interval-ms", "0"], {}, "gil_switch_interval_ms = 0.0 is out of range"),
    ],
)
def test_bad_settings_exit_2_with_a_clear_message(
    arguments: list[str], environment: dict[str, str], message: str
) -> None:
    import os

    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **environment},
    )
    assert result.returncode == 2
    assert message in result.stderr


def test_missing_repository_exits_1(tmp_path: Path) -> None:
    server = ServerProcess(
        "serve",
        "--model-repository",
        str(tmp_path / "absent"),
        "--grpc-port",
        "0",
        "--http-port",
        "0",
        "--metrics-port",
        "-1",
    )
    assert server.wait_exit() == 1
    assert "is not a folder" in server.log


def _in_flight(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as page:
        text = page.read().decode()
    for line in text.splitlines():
        if line.startswith('batchwise_requests_in_flight{model="slow"'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _slow_input() -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("x", [SLOW_ROWS, 512], "FP32")
    tensor.set_data_from_numpy(np.full((SLOW_ROWS, 512), 0.01, np.float32))
    return tensor


def test_sigterm_drains_in_flight_requests_and_exits_0(running: ServerProcess) -> None:
    port, metrics_port = running.grpc_port(), running.metrics_port()
    outcomes: list[object] = []

    def slow_call() -> None:
        with grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
            try:
                outcomes.append(client.infer("slow", [_slow_input()]).as_numpy("y").shape)
            except InferenceServerException as error:
                outcomes.append(error)

    callers = [threading.Thread(target=slow_call) for _ in range(2)]
    for caller in callers:
        caller.start()
    deadline = time.monotonic() + 30
    while _in_flight(metrics_port) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _in_flight(metrics_port) == 2, "the slow requests never started"

    running.process.send_signal(signal.SIGTERM)
    # Health turns NOT_SERVING and new work is refused while the two finish.
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = None
        while time.monotonic() < deadline:
            status = health.Check(health_pb2.HealthCheckRequest(service="")).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    with grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
        with pytest.raises(InferenceServerException) as refused:
            x = grpcclient.InferInput("x", [1, 4], "FP32")
            x.set_data_from_numpy(np.ones((1, 4), np.float32))
            client.infer("quick", [x])
        assert refused.value.status() == "StatusCode.UNAVAILABLE"
        assert "shutting down" in refused.value.message()

    for caller in callers:
        caller.join(60)
    assert outcomes == [(SLOW_ROWS, 512), (SLOW_ROWS, 512)]
    assert running.wait_exit() == 0
    assert "shutting down: 2 request(s) in flight" in running.log
    assert "server stopped" in running.log


def test_sigint_with_nothing_in_flight_exits_promptly(running: ServerProcess) -> None:
    running.process.send_signal(signal.SIGINT)
    assert running.wait_exit(timeout=20) == 0


def test_readme_documents_every_flag() -> None:
    import dataclasses

    readme = (ROOT / "README.md").read_text()
    for spec in dataclasses.fields(Settings):
        assert "--" + spec.name.replace("_", "-") in readme, spec.name


def _health_command(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "service", "health", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def test_health_command_reports_serving_server_and_models(running: ServerProcess) -> None:
    port = running.grpc_port()
    result = _health_command("--address", f"127.0.0.1:{port}")
    assert (result.returncode, result.stdout.strip()) == (0, f"127.0.0.1:{port}: SERVING")
    # The port can also come from the server's own variable, as in the container image.
    result = _health_command("--model", "quick", env={"BATCHWISE_GRPC_PORT": str(port)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(quick): SERVING" in result.stdout
    unknown = _health_command("--address", f"127.0.0.1:{port}", "--model", "absent")
    assert unknown.returncode == 1
    assert "NOT_FOUND" in unknown.stdout


def test_health_command_fails_while_draining_and_when_nobody_listens(
    running: ServerProcess,
) -> None:
    port = running.grpc_port()
    running.process.send_signal(signal.SIGTERM)
    assert running.wait_exit(timeout=20) == 0
    result = _health_command("--address", f"127.0.0.1:{port}", "--timeout", "1")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stdout
    bad = _health_command("--timeout", "0")
    assert bad.returncode == 2 and "--timeout 0.0: expected" in bad.stderr
